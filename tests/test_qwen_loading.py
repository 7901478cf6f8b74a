"""Stage-one loading: base + Unison LoRA merged in memory, merged directories (tie bug), bad inputs."""

from __future__ import annotations

import json
import shutil
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unison_runtime.errors import UnisonError, WeightsError
from unison_runtime.plan import PLANNER_TOKENS
from unison_runtime.planner import qwen_loading
from unison_runtime.planner.base import Planner
from unison_runtime.planner.qwen import QwenPlanner, load_planner
from unison_runtime.testing.tiny_qwen import (
    build_tiny_qwen,
    build_tiny_unison_lora,
)

PROBE = "Make a video <IMGPAD> of a lion <BORES>768,480<EORES><BONF>72<EONF><CFV> walking"


@pytest.fixture(scope="module")
def lora_planner(tiny_qwen) -> QwenPlanner:
    return load_planner(tiny_qwen.base, lora=tiny_qwen.lora, device="cpu")


def _peft_reference(base: Path, lora: Path):
    """The adapter applied the plain peft way, unmerged: what the merge must reproduce."""
    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(lora, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(tie_word_embeddings|is_gradient_checkpointing).*")
        return PeftModel.from_pretrained(model, lora).eval(), tokenizer


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _probe_ids(tokenizer) -> torch.Tensor:
    return tokenizer(PROBE, return_tensors="pt").input_ids


def test_planner_satisfies_the_shared_interface(lora_planner):
    assert isinstance(lora_planner, Planner)
    assert lora_planner.name.startswith("qwen2.5-vl:")


def test_merged_lora_equals_peft_adapter_and_differs_from_base(tiny_qwen, lora_planner):
    reference, tokenizer = _peft_reference(tiny_qwen.base, tiny_qwen.lora)
    ids = _probe_ids(tokenizer)
    assert ids.equal(_probe_ids(lora_planner.processor.tokenizer))
    merged = _logits(lora_planner.model, ids)
    torch.testing.assert_close(merged, _logits(reference, ids), atol=1e-4, rtol=1e-4)

    base = load_planner(tiny_qwen.base, device="cpu")
    plain_ids = base.processor.tokenizer("Make a video of a lion walking", return_tensors="pt").input_ids
    assert (_logits(lora_planner.model, plain_ids) - _logits(base.model, plain_ids)).abs().max() > 1e-2


def test_merge_unties_the_trained_lm_head(tiny_qwen, lora_planner):
    adapter = load_file(tiny_qwen.lora / "adapter_model.safetensors")
    model = lora_planner.model
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(model.lm_head.weight, adapter["base_model.model.lm_head.weight"])
    torch.testing.assert_close(
        model.get_input_embeddings().weight, adapter["base_model.model.model.language_model.embed_tokens.weight"]
    )
    assert any("untied" in note for note in lora_planner.notes)


def test_planner_tokens_are_single_tokens_and_survive_decode(lora_planner):
    tokenizer = lora_planner.processor.tokenizer
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PLANNER_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(PLANNER_TOKENS)
    text = "<BORES>768,480<EORES><BONF>72<EONF><BOFIDX>0<EOFIDX><BOEDIT>1,0<EOEDIT><REF><CTRL><CFI><CFV>"
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(encoded, skip_special_tokens=False) == text
    assert lora_planner.has_planning_lora


def test_base_alone_has_no_planning_lora(tiny_qwen):
    planner = load_planner(tiny_qwen.base, device="cpu")
    assert not planner.has_planning_lora
    assert planner.model.lm_head.weight is planner.model.get_input_embeddings().weight  # the 3B ties them


def test_merged_dir_with_tied_config_loads_untied(tiny_qwen, lora_planner):
    config = json.loads((tiny_qwen.merged_tied / "config.json").read_text())
    assert config["tie_word_embeddings"] is True  # the reference bug is in the file
    planner = load_planner(tiny_qwen.merged_tied, device="cpu")
    assert planner.has_planning_lora
    assert any("loaded untied" in note for note in planner.notes)
    ids = _probe_ids(planner.processor.tokenizer)
    expected = _logits(lora_planner.model, ids)
    torch.testing.assert_close(_logits(planner.model, ids), expected, atol=1e-4, rtol=1e-4)
    # The trained head from the checkpoint is used, not the embeddings a tied load would put there.
    checkpoint = load_file(tiny_qwen.merged_tied / "model.safetensors")
    head = planner.model.lm_head.weight
    torch.testing.assert_close(head, checkpoint["lm_head.weight"])
    assert (head - checkpoint["model.embed_tokens.weight"]).abs().max() > 1e-2
    assert planner.model.config.tie_word_embeddings is False
    assert json.loads((tiny_qwen.merged_tied / "config.json").read_text()) == config  # never edited on disk


def test_merged_dir_with_fixed_config_loads_as_is(tiny_qwen, lora_planner):
    planner = load_planner(tiny_qwen.merged_fixed, device="cpu")
    assert planner.has_planning_lora
    assert not any("untied" in note for note in planner.notes)
    ids = _probe_ids(planner.processor.tokenizer)
    torch.testing.assert_close(_logits(planner.model, ids), _logits(lora_planner.model, ids), atol=1e-4, rtol=1e-4)


def test_embeddings_grow_when_the_tokens_do_not_fit(tmp_path):
    base = build_tiny_qwen(tmp_path / "base", seed=3, spare_vocab=0)
    lora = build_tiny_unison_lora(base, tmp_path / "lora", seed=4)
    planner = load_planner(base, lora=lora, device="cpu")
    rows = planner.model.get_input_embeddings().weight.shape[0]
    assert rows == len(planner.processor.tokenizer)
    assert any("resized" in note for note in planner.notes)
    reference, tokenizer = _peft_reference(base, lora)
    ids = _probe_ids(tokenizer)
    torch.testing.assert_close(_logits(planner.model, ids), _logits(reference, ids), atol=1e-4, rtol=1e-4)


def _legacy_key(key: str) -> str:
    return key.replace("base_model.model.model.language_model.", "base_model.model.model.")


def test_adapter_in_the_old_transformers_layout_loads_the_same(tiny_qwen, lora_planner, tmp_path):
    legacy = tmp_path / "legacy-lora"
    shutil.copytree(tiny_qwen.lora, legacy)
    state = load_file(legacy / "adapter_model.safetensors")
    save_file({_legacy_key(k): v.contiguous() for k, v in state.items()}, legacy / "adapter_model.safetensors")
    config = json.loads((legacy / "adapter_config.json").read_text())
    # LLaMA-Factory's pattern for "all linear layers, vision tower frozen" in the old layout.
    config["target_modules"] = "^(?!visual).*(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    (legacy / "adapter_config.json").write_text(json.dumps(config))
    assert all("language_model" not in k for k in load_file(legacy / "adapter_model.safetensors"))

    planner = load_planner(tiny_qwen.base, lora=legacy, device="cpu")
    ids = _probe_ids(planner.processor.tokenizer)
    torch.testing.assert_close(_logits(planner.model, ids), _logits(lora_planner.model, ids), atol=1e-5, rtol=1e-5)


def test_adapter_without_a_tokenizer_gets_the_tokens_in_training_order(tiny_qwen, lora_planner, tmp_path):
    bare = tmp_path / "bare-lora"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tiny_qwen.lora / name, bare / name)
    planner = load_planner(tiny_qwen.base, lora=bare, device="cpu")
    assert planner.has_planning_lora
    expected = lora_planner.processor.tokenizer.convert_tokens_to_ids(list(PLANNER_TOKENS))
    assert planner.processor.tokenizer.convert_tokens_to_ids(list(PLANNER_TOKENS)) == expected
    ids = _probe_ids(planner.processor.tokenizer)
    torch.testing.assert_close(_logits(planner.model, ids), _logits(lora_planner.model, ids), atol=1e-5, rtol=1e-5)


def test_bf16_on_request(tiny_qwen):
    planner = load_planner(tiny_qwen.base, lora=tiny_qwen.lora, device="cpu", dtype="bf16")
    assert planner.dtype is torch.bfloat16
    assert planner.model.lm_head.weight.dtype is torch.bfloat16
    assert planner.model.model.language_model.layers[0].self_attn.q_proj.weight.dtype is torch.bfloat16


def test_unload_frees_the_model(tiny_qwen):
    planner = load_planner(tiny_qwen.base, device="cpu")
    ref = weakref.ref(planner.model)
    planner.unload()
    assert not planner.loaded
    assert ref() is None
    with pytest.raises(UnisonError, match="unloaded"):
        _ = planner.model


# --------------------------------------------------------------------------- choices


def test_dtype_and_device_defaults():
    cpu = torch.device("cpu")
    assert qwen_loading.resolve_dtype(None, cpu) is torch.float32
    assert qwen_loading.resolve_dtype("auto", cpu) is torch.float32
    assert qwen_loading.resolve_dtype("bf16", cpu) is torch.bfloat16
    assert qwen_loading.resolve_dtype("fp16", cpu) is torch.float16
    with pytest.raises(UnisonError, match="fp8"):
        qwen_loading.resolve_dtype("fp8", cpu)
    assert qwen_loading.resolve_attention(None, cpu, torch.float32) == "sdpa"
    with pytest.raises(UnisonError, match="bogus"):
        qwen_loading.resolve_attention("bogus", cpu, torch.float32)


def test_flash_attention_requested_without_the_package(monkeypatch):
    from unison_runtime import attention

    monkeypatch.setattr(attention, "flash_attention_available", lambda: False)
    with pytest.raises(UnisonError, match="flash-attn package is not installed"):
        qwen_loading.resolve_attention("flash_attention_2", torch.device("cpu"), torch.bfloat16)


# Where flash_attention_2 is the default (a working flash-attn on an sm80+ card) and where it falls
# back to sdpa: tests/test_attention.py, on simulated cards and flash-attn builds.


# --------------------------------------------------------------------------- bad inputs


def test_missing_directories(tiny_qwen, tmp_path):
    with pytest.raises(WeightsError, match=r"Qwen2.5-VL model directory .*nowhere does not exist"):
        load_planner(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match=r"LoRA adapter directory .*no-lora does not exist"):
        load_planner(tiny_qwen.base, lora=tmp_path / "no-lora")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"has no adapter_config\.json"):
        load_planner(tiny_qwen.base, lora=tmp_path / "empty")
    with pytest.raises(WeightsError, match=r"config\.json is missing"):
        load_planner(tmp_path / "empty")


def test_lora_on_an_already_merged_planner_is_refused(tiny_qwen):
    with pytest.raises(WeightsError, match="looks merged into it already"):
        load_planner(tiny_qwen.merged_fixed, lora=tiny_qwen.lora, device="cpu")


def test_directory_of_another_model_type(tiny_qwen, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_qwen.base, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="model_type 'llama'; expected 'qwen2_5_vl'"):
        load_planner(other)


def test_adapter_for_another_base_is_refused_clearly(tiny_qwen, tmp_path):
    wide = build_tiny_qwen(tmp_path / "wide-base", text_hidden=128)
    wide_lora = build_tiny_unison_lora(wide, tmp_path / "wide-lora")
    with pytest.raises(WeightsError) as info:
        load_planner(tiny_qwen.base, lora=wide_lora, device="cpu")
    message = str(info.value)
    assert "adapter_model.safetensors" in message
    assert "does not fit" in message
    assert "wide-base" in message  # the base it was trained for, from adapter_config.json
    assert "another base model" in message


def test_adapter_targeting_modules_the_base_lacks(tiny_qwen, tmp_path):
    odd = tmp_path / "odd-lora"
    shutil.copytree(tiny_qwen.lora, odd)
    state = load_file(odd / "adapter_model.safetensors")
    state = {k.replace("layers.1.", "layers.7."): v.contiguous() for k, v in state.items()}
    save_file(state, odd / "adapter_model.safetensors")
    with pytest.raises(WeightsError, match=r"layers\.7\..*a module the base does not have"):
        load_planner(tiny_qwen.base, lora=odd, device="cpu")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_model_safetensors_is_named(tiny_qwen, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen.merged_fixed, broken)
    _truncate(broken / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model\.safetensors.*truncated"):
        load_planner(broken)


def test_corrupt_adapter_safetensors_is_named(tiny_qwen, tmp_path):
    broken = tmp_path / "broken-lora"
    shutil.copytree(tiny_qwen.lora, broken)
    _truncate(broken / "adapter_model.safetensors")
    with pytest.raises(WeightsError, match=r"adapter_model\.safetensors.*truncated"):
        load_planner(tiny_qwen.base, lora=broken, device="cpu")


def test_missing_shard_is_named(tiny_qwen, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_qwen.base, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    names = load_file(sharded / "model-00001-of-00002.safetensors").keys()
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightsError, match=r"model-00002-of-00002\.safetensors"):
        load_planner(sharded)


# --------------------------------------------------------------------------- checkpoints stored in bf16


def _store_as(src: Path, dst: Path, dtype: torch.dtype, *, shards: int = 1) -> Path:
    """A copy of ``src`` whose floating tensors are stored in ``dtype`` (as the 3B is released), maybe sharded."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: state[k] for k in part}, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture
def load_spy(monkeypatch):
    """Records each from_pretrained call's kwargs and every file transformers memory-maps with safe_open."""
    import transformers.modeling_utils as modeling_utils
    from transformers import Qwen2_5_VLForConditionalGeneration

    calls: list[dict] = []
    mapped: list[Path] = []
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained.__func__
    real_safe_open = modeling_utils.safe_open

    def from_pretrained(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    def safe_open(path, *args, **kwargs):
        mapped.append(Path(path))
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(modeling_utils, "safe_open", safe_open)
    return calls, mapped


def _direct_load(model_dir: Path, *, untie: bool = False):
    """Today's path, independent of the stored dtype: transformers maps the file and converts to fp32."""
    return qwen_loading._load_model(
        model_dir, untie=untie, device=torch.device("cpu"), dtype=torch.float32, attention="sdpa", stored=None
    )


def _assert_identical(model, reference) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = dict(reference.named_parameters(remove_duplicate=False))
    assert params.keys() == expected.keys()
    for name, tensor in expected.items():
        assert params[name].dtype == tensor.dtype, name
        assert torch.equal(params[name], tensor), name
    buffers = dict(model.named_buffers(remove_duplicate=False))
    expected_buffers = dict(reference.named_buffers(remove_duplicate=False))
    assert buffers.keys() == expected_buffers.keys()
    assert any(name.endswith("inv_freq") for name in buffers)
    for name, tensor in expected_buffers.items():
        assert buffers[name].dtype == tensor.dtype, name
        assert torch.equal(buffers[name], tensor), name
    assert qwen_loading.embeddings_tied(model) == qwen_loading.embeddings_tied(reference)
    assert model.config.to_dict() == reference.config.to_dict()
    assert model.training is reference.training is False


@pytest.mark.parametrize("shards", [1, 2])
def test_bf16_stored_base_on_cpu_loads_unmapped_and_equals_a_direct_fp32_load(tiny_qwen, tmp_path, load_spy, shards):
    calls, mapped = load_spy
    folder = _store_as(tiny_qwen.base, tmp_path / "bf16", torch.bfloat16, shards=shards)
    whole = qwen_loading.load_qwen(folder, device="cpu", cast_per_layer=False).model  # converted whole
    assert [(c["dtype"], c.get("disable_mmap")) for c in calls] == [(torch.bfloat16, True)]
    assert not [p for p in mapped if p.parent == folder]  # read into memory, no mapping kept
    assert {p.dtype for p in whole.parameters()} == {torch.float32}

    reference = _direct_load(folder)
    assert calls[-1]["dtype"] is torch.float32 and "disable_mmap" not in calls[-1]
    assert any(p.parent == folder for p in mapped)  # the spy does see transformers' mapped load
    _assert_identical(whole, reference)
    assert qwen_loading.embeddings_tied(whole)  # the 3B ties them, and still does after the upcast

    # The default keeps the stored bf16 matrices (loaded mapped) and casts them per layer: half the memory,
    # same outputs.
    planner = load_planner(folder, device="cpu")
    assert calls[-1]["dtype"] is torch.bfloat16 and "disable_mmap" not in calls[-1]
    assert planner.dtype is torch.float32
    layer = planner.model.model.language_model.layers[0]
    assert layer.self_attn.q_proj.weight.dtype is torch.bfloat16 and layer.input_layernorm.weight.dtype is torch.float32
    assert planner.model.get_input_embeddings().weight.dtype is torch.bfloat16
    assert any("cast to float32 layer by layer" in note for note in planner.notes)
    assert qwen_loading.embeddings_tied(planner.model)
    ids = planner.processor.tokenizer("Make a video of a lion walking", return_tensors="pt").input_ids
    assert torch.equal(_logits(planner.model, ids), _logits(reference, ids))
    assert layer.self_attn.q_proj.weight.dtype is torch.bfloat16  # put back after the forward
    with torch.no_grad():
        generated = planner.model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        expected = reference.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, expected)


def test_bf16_stored_merged_planner_with_the_tie_bug_loads_untied_and_identical(tiny_qwen, tmp_path, load_spy):
    calls, _ = load_spy
    folder = _store_as(tiny_qwen.merged_tied, tmp_path / "merged-bf16", torch.bfloat16)
    planner = load_planner(folder, device="cpu")
    assert calls[0]["dtype"] is torch.bfloat16 and "disable_mmap" not in calls[0]  # kept as stored: mapped
    assert any("loaded untied" in note for note in planner.notes)
    assert not qwen_loading.embeddings_tied(planner.model)
    reference = _direct_load(folder, untie=True)
    _assert_identical(qwen_loading.load_qwen(folder, device="cpu", cast_per_layer=False).model, reference)
    head = load_file(folder / "model.safetensors")["lm_head.weight"]
    assert torch.equal(planner.model.lm_head.weight, head)  # kept as stored
    ids = _probe_ids(planner.processor.tokenizer)
    assert torch.equal(_logits(planner.model, ids), _logits(reference, ids))


def test_fp32_stored_folder_keeps_the_direct_load(tiny_qwen, load_spy):
    calls, mapped = load_spy
    planner = load_planner(tiny_qwen.base, device="cpu")
    assert [(c["dtype"], c.get("disable_mmap")) for c in calls] == [(torch.float32, None)]
    assert tiny_qwen.base / "model.safetensors" in mapped
    assert planner.model.lm_head.weight.dtype is torch.float32


def test_bf16_stored_folder_asked_for_bf16_keeps_the_direct_load(tiny_qwen, tmp_path, load_spy):
    calls, _ = load_spy
    folder = _store_as(tiny_qwen.base, tmp_path / "bf16", torch.bfloat16)
    planner = load_planner(folder, device="cpu", dtype="bf16")
    assert [(c["dtype"], c.get("disable_mmap")) for c in calls] == [(torch.bfloat16, None)]
    assert {p.dtype for p in planner.model.parameters()} == {torch.bfloat16}


def test_lora_on_a_bf16_stored_base_equals_the_direct_load(tiny_qwen, tmp_path, load_spy, monkeypatch):
    calls, _ = load_spy
    folder = _store_as(tiny_qwen.base, tmp_path / "bf16", torch.bfloat16)
    whole = qwen_loading.load_qwen(folder, lora=tiny_qwen.lora, device="cpu", cast_per_layer=False)
    assert calls[0]["disable_mmap"] is True
    assert whole.model.lm_head.weight is not whole.model.get_input_embeddings().weight
    adapter = load_file(tiny_qwen.lora / "adapter_model.safetensors")
    assert torch.equal(whole.model.lm_head.weight, adapter["base_model.model.lm_head.weight"])
    kept = load_planner(folder, lora=tiny_qwen.lora, device="cpu")  # the default: merged into the stored bf16
    assert kept.has_planning_lora and kept.model.lm_head.weight.dtype is torch.bfloat16

    monkeypatch.setattr(qwen_loading, "stored_float_dtype", lambda headers: None)  # today's direct path
    direct = load_planner(folder, lora=tiny_qwen.lora, device="cpu")
    assert "disable_mmap" not in calls[-1]
    _assert_identical(whole.model, direct.model)
    assert list(whole.notes) == list(direct.notes)
    ids = _probe_ids(whole.processor.tokenizer)
    expected = _logits(direct.model, ids)
    assert torch.equal(_logits(whole.model, ids), expected)
    # Merged in bf16 (rounded once, as a bf16 run merges), computed in fp32: within bf16 tolerance.
    got = _logits(kept.model, ids)
    assert not torch.equal(got, expected)
    assert torch.allclose(got, expected, rtol=0.02, atol=0.02 * float(expected.abs().max()))


def test_stored_float_dtype_reads_the_headers(tiny_qwen, tmp_path):
    folder = _store_as(tiny_qwen.base, tmp_path / "fp16", torch.float16, shards=2)
    assert qwen_loading.stored_float_dtype(qwen_loading.checkpoint_headers(folder)) is torch.float16
    assert qwen_loading.stored_float_dtype(qwen_loading.checkpoint_headers(tiny_qwen.base)) is torch.float32
    mixed = {"a": {"dtype": "BF16"}, "b": {"dtype": "F32"}, "ids": {"dtype": "I64"}}
    assert qwen_loading.stored_float_dtype(mixed) is None  # an fp32 norm in a bf16 file: no single stored dtype
    assert qwen_loading.stored_float_dtype({"a": {"dtype": "BF16"}, "ids": {"dtype": "I64"}}) is torch.bfloat16


def test_stored_then_convert_only_for_a_cpu_upcast():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    choose = qwen_loading.load_stored_then_convert
    assert choose(torch.bfloat16, cpu, torch.float32)
    assert choose(torch.float16, cpu, torch.float32)
    assert not choose(torch.bfloat16, cuda, torch.float32)  # the device copy releases the mapping
    assert not choose(torch.float32, cpu, torch.bfloat16)  # reading a wider file into memory costs more
    assert not choose(torch.bfloat16, cpu, torch.float16)
    assert not choose(torch.bfloat16, cpu, torch.bfloat16)
    assert not choose(None, cpu, torch.float32)
    assert not choose(torch.float8_e4m3fn, cpu, torch.float32)
