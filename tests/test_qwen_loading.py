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
    monkeypatch.setattr(qwen_loading, "flash_attention_available", lambda: False)
    with pytest.raises(UnisonError, match="flash-attn package is not installed"):
        qwen_loading.resolve_attention("flash_attention_2", torch.device("cpu"), torch.bfloat16)


def test_flash_attention_is_the_default_where_it_runs(monkeypatch):
    monkeypatch.setattr(qwen_loading, "flash_attention_available", lambda: True)
    cuda = torch.device("cuda")
    assert qwen_loading.resolve_attention(None, cuda, torch.bfloat16) == "flash_attention_2"
    assert qwen_loading.resolve_attention(None, cuda, torch.float32) == "sdpa"
    assert qwen_loading.resolve_attention(None, torch.device("cpu"), torch.bfloat16) == "sdpa"


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
