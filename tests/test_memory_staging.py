"""Issue 16 (runtime): stored precision cast per layer, staged pipelines, the CLI's memory choice.

Every comparison is against the same job done the old way (weights converted whole at load time,
every model resident), so "results unchanged" is checked bit for bit where the dtype is unchanged.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.harness.counting import CountingLoader
from unison_runtime import memory_estimate
from unison_runtime.__main__ import main
from unison_runtime.devices import cpu_has_native_bf16
from unison_runtime.memory_estimate import GIB, choose_memory_mode
from unison_runtime.pipeline import UnisonPipeline
from unison_runtime.planner.rules import RulePlanner
from unison_runtime.testing import tiny_wan_files as tw
from unison_runtime.vace import files
from unison_runtime.vace.sampler import SamplingOptions
from unison_runtime.vace.stored_precision import weight_bytes

PROMPT = "A red fox runs through the snow at dawn."
T2I = "Create an image of a red car parked on a street at night, 32x32"
T2V = "Create a video of a lion walking around in its habitat, 32x32, 4 frames"


@pytest.fixture(scope="module")
def comfy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_models")
    paths = tw.build_tiny_comfy_models_dir(root)
    (root / "unison").mkdir(exist_ok=True)
    return root, paths


def _encode(model, tokenizer, text=PROMPT):
    ids = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state


def _transformer_inputs(config):
    g = torch.Generator().manual_seed(7)
    return dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([730]),
                encoder_hidden_states=torch.randn(1, 6, config["text_dim"], generator=g),
                control_hidden_states=torch.randn(1, 96, 2, 4, 4, generator=g),
                control_hidden_states_scale=torch.tensor([1.0, 0.6]))


def _run(model, inputs, dtype):
    with torch.no_grad():
        return model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}).sample.float()


# --------------------------------------------------------------------------- stored precision


@pytest.mark.parametrize(("precision", "dtype"), [("fp8_scaled", torch.float32), ("fp8_scaled", torch.bfloat16),
                                                 ("fp16", torch.float32)])  # fp16 -> bf16 is no narrower: converted
def test_umt5_kept_stored_encodes_exactly_as_converted_whole(tmp_path, precision, dtype):
    model, _, proto = tw.build_tiny_umt5(seed=5)
    path = tw.write_umt5_comfy(model, proto, tmp_path / f"umt5_{precision}.safetensors", precision=precision)
    whole, tok = files.load_text_encoder(path, dtype=dtype, cast_per_layer=False)
    kept, tok2 = files.load_text_encoder(path, dtype=dtype)
    layer = kept.encoder.block[1].layer[1].DenseReluDense
    stored = torch.float8_e4m3fn if precision == "fp8_scaled" else torch.float16
    assert layer.wo.weight.dtype == layer.wi_0.weight.dtype == stored  # kept as stored between calls
    if dtype == torch.float32:  # the fp16 embedding stays: rows are cast when looked up (bf16 is no narrower)
        assert kept.shared.weight.dtype == torch.float16
    if precision == "fp8_scaled":
        assert layer.wo.weight_scale.ndim == 0  # the per-tensor scale rides along as a buffer
    assert weight_bytes(kept) < weight_bytes(whole)
    for text in (PROMPT, "Zwei Katzen spielen im Garten, 480P."):
        out = _encode(kept, tok2, text)
        assert out.dtype == dtype
        assert torch.equal(out, _encode(whole, tok, text))  # bit for bit: same arithmetic, one layer at a time
    assert layer.wo.weight.dtype == stored  # and put back after each call


def test_umt5_stored_weights_are_restored_when_a_forward_fails(tmp_path):
    model, _, proto = tw.build_tiny_umt5(seed=5)
    path = tw.write_umt5_comfy(model, proto, tmp_path / "umt5.safetensors", precision="fp8_scaled")
    kept, _ = files.load_text_encoder(path)
    wi = kept.encoder.block[0].layer[1].DenseReluDense.wi_0
    with pytest.raises(RuntimeError):
        wi(torch.zeros(1, 3, wi.in_features + 1))  # wrong width: the matmul raises inside the layer
    assert wi.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("precision", ["fp16", "fp8_scaled"])
def test_transformer_kept_stored_gives_the_same_output(tmp_path, precision):
    model = tw.build_tiny_transformer(tw.tiny_transformer_config(), seed=3)
    path = tw.write_wan_transformer(model, tmp_path / "vace.safetensors", layout="comfy", precision=precision)
    whole = files.load_transformer_file(path, dtype=torch.float32, cast_per_layer=False)
    kept = files.load_transformer_file(path, dtype=torch.float32)
    assert kept.blocks[0].ffn.net[0].proj.weight.dtype != torch.float32
    assert kept.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32  # skipped, as diffusers does
    assert kept.dtype == torch.float32
    inputs = _transformer_inputs(model.config)
    assert torch.equal(_run(kept, inputs, torch.float32), _run(whole, inputs, torch.float32))
    assert weight_bytes(kept) < weight_bytes(whole)


def test_bf16_compute_within_bf16_tolerance_of_fp32(tmp_path):
    model = tw.build_tiny_transformer(tw.tiny_transformer_config(), seed=3)
    path = tw.write_wan_transformer(model, tmp_path / "vace.safetensors", layout="comfy", precision="fp16")
    fp32 = files.load_transformer_file(path, dtype=torch.float32)
    bf16 = files.load_transformer_file(path, dtype=torch.bfloat16)
    inputs = _transformer_inputs(model.config)
    expected = _run(fp32, inputs, torch.float32)
    got = _run(bf16, inputs, torch.bfloat16)
    assert (got - expected).norm() / expected.norm() < 2e-2


# --------------------------------------------------------------------------- CPU bf16 policy


def test_cpu_bf16_detection_and_default_dtypes(monkeypatch):
    from unison_runtime import devices
    from unison_runtime.vace.loading import resolve_dtype

    assert cpu_has_native_bf16("processor: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags\t\t: fpu sse avx2 avx512f f16c\n")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype(None, "cpu", role="transformer") == torch.bfloat16
    assert resolve_dtype(None, "cpu", role="text_encoder") == torch.bfloat16
    assert resolve_dtype(None, "cpu", role="vae") == torch.float32
    assert resolve_dtype("fp32", "cpu", role="transformer") == torch.float32  # an explicit choice wins
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype(None, "cpu", role="transformer") == torch.float32


# --------------------------------------------------------------------------- staging


class Events:
    """Records each loader call and what was loaded at that moment."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def loader(self, name, pipeline_ref, load):
        def call():
            self.calls.append((name, list(pipeline_ref[0].loaded()) if pipeline_ref else []))
            return load()
        return call


def _staged_pipeline(paths, *, staged):
    ref: list[UnisonPipeline] = []
    events = Events()
    args = (paths["transformer"], paths["vae"], paths["text_encoder"])
    if staged:
        vace = events.loader("vace", ref, lambda: files.load_vace_from_files(*args, device="cpu",
                                                                            parts=files.SAMPLING_PARTS))
        text = events.loader("text_encoder", ref, lambda: files.load_vace_from_files(*args, device="cpu",
                                                                                    parts=files.TEXT_PARTS))
    else:
        vace = events.loader("vace", ref, lambda: files.load_vace_from_files(*args, device="cpu"))
        text = None
    pipeline = UnisonPipeline(planner=RulePlanner(), vace=vace, text_encoder=text, staged=staged,
                              options=SamplingOptions(steps=2))
    ref.append(pipeline)
    return pipeline, events


@pytest.mark.parametrize("instruction", [T2I, T2V])
def test_staged_pipeline_gives_the_same_frames_one_model_at_a_time(comfy_dir, instruction):
    _, paths = comfy_dir
    plain, _ = _staged_pipeline(paths, staged=False)
    staged, events = _staged_pipeline(paths, staged=True)
    expected = plain.run(instruction)
    got = staged.run(instruction)
    assert torch.equal(got.frames, expected.frames)
    # umT5 loaded first, alone (the rule planner is no model); the transformer + VAE once it was released.
    assert events.calls == [("text_encoder", ["planner"]), ("vace", ["planner"])]
    assert staged.loaded() == ["planner", "vace"] and staged.vace.text_encoder is None
    # A second job: the cached negative embedding is reused, umT5 loads again for the prompt, alone.
    again = staged.run(instruction)
    assert torch.equal(again.frames, expected.frames)
    assert events.calls[2:] == [("text_encoder", ["planner"]), ("vace", ["planner"])]


def test_staged_pipeline_releases_stage_one_before_umt5(comfy_dir):
    from unison_runtime.planner.qwen import load_planner
    from unison_runtime.projector import load_projector
    from unison_runtime.testing.tiny_projector import build_tiny_projector
    from unison_runtime.testing.tiny_qwen import TEXT_HIDDEN, build_tiny_qwen

    root, paths = comfy_dir
    qwen_dir = build_tiny_qwen(root / "unison" / "qwen")
    projector = build_tiny_projector(root / "unison" / "projector.pth", input_dim=TEXT_HIDDEN, t5_dim=32)
    staged, events = _staged_pipeline(paths, staged=True)
    stage_one = CountingLoader(lambda: load_planner(qwen_dir, None, device="cpu"))
    staged.set_source("stage_one", stage_one)
    staged.set_source("projector", lambda: load_projector(projector))
    result = staged.run(T2I)
    assert stage_one.calls == 1 and not any("umT5 embedding alone" in note for note in result.notes)
    assert events.calls[0] == ("text_encoder", ["planner", "projector"])  # Qwen was let go before umT5 loaded
    with pytest.raises(Exception, match="already loaded"):
        staged.set_source("vace", None)


# --------------------------------------------------------------------------- the CLI's choice


#: The released sizes as held on a CPU by default: Qwen bf16 kept (7 GiB), scaled-fp8 umT5 kept (6.3 GiB),
#: fp16 transformer kept (4 GiB), fp32 VAE.
HELD = memory_estimate.ModelFootprint(
    transformer=4 * GIB, vae=int(0.47 * GIB), text_encoder=int(6.3 * GIB), stage_one=7 * GIB,
    transformer_config=memory_estimate._json_config(None, "wan2.1-vace-1.3b-transformer"),
    vae_config=memory_estimate._json_config(None, "wan2.1-vae"),
    text_config=memory_estimate._json_config(None, "umt5-xxl-encoder"))


def test_memory_choice_from_free_memory():
    from unison_runtime.plan import default_plan

    settings = memory_estimate.RunSettings(device="cuda", transformer_dtype="bf16", vae_tiling=True)
    video = default_plan("text_to_video", width=832, height=480, num_frames=81)
    image = default_plan("text_to_image", width=64, height=64)

    def peak(plan, staged, batched):
        return memory_estimate.estimate_run(plan, HELD, dataclasses.replace(
            settings, low_memory=staged, batch_cfg=batched)).peak

    # The choice is the estimate's: staged when everything resident would not fit, batched when its peak fits.
    assert peak(image, True, True) < peak(image, False, True)  # staging lowers the peak
    tight = peak(image, False, False) + memory_estimate.HEADROOM_BYTES - 1
    small = choose_memory_mode(image, HELD, settings, available=tight)
    assert small.staged and small.batch_cfg == (peak(image, True, True) + memory_estimate.HEADROOM_BYTES <= tight)
    assert "staged" in small.reason and f"{tight / GIB:.1f} GiB free" in small.reason
    big = choose_memory_mode(image, HELD, settings, available=96 * GIB)
    assert not big.staged and big.batch_cfg and "all models resident" in big.reason
    unknown = choose_memory_mode(image, HELD, settings, available=None)
    assert unknown.staged and not unknown.batch_cfg
    forced = choose_memory_mode(image, HELD, settings, available=96 * GIB, staged=True, batch_cfg=False)
    assert forced.staged and not forced.batch_cfg and "as asked" in forced.reason
    # Batching doubles the sampler's activations: at 832x480x81 it fits only with more room.
    between = (peak(video, True, False) + peak(video, True, True)) // 2 + memory_estimate.HEADROOM_BYTES
    assert peak(video, True, False) < peak(video, True, True)
    mid = choose_memory_mode(video, HELD, settings, available=between, single_job=True)
    assert mid.staged and not mid.batch_cfg and "one job" in mid.reason
    one_job = choose_memory_mode(image, HELD, settings, available=96 * GIB, single_job=True)
    assert one_job.staged and one_job.batch_cfg


def _cli(*argv, capsys=None):
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, json.loads(out.getvalue()) if out.getvalue() else None


def test_cli_default_says_what_it_chose_and_staging_changes_nothing(comfy_dir, tmp_path, capsys, monkeypatch):
    root, _ = comfy_dir
    base = ("run", T2I, "--models", str(root), "--steps", "2", "--input-dir", str(tmp_path), "--device", "cpu")
    monkeypatch.setattr(memory_estimate, "free_memory", lambda device=None: 1 * GIB)
    code, tight = _cli(*base, "--out", str(tmp_path / "tight"))
    assert code == 0
    err = capsys.readouterr().err
    assert "memory: staged" in err and "two-pass guidance" in err and "1.0 GiB free" in err
    assert any(note.startswith("memory: staged") for note in tight["notes"])
    monkeypatch.setattr(memory_estimate, "free_memory", lambda device=None: 512 * GIB)
    code, roomy = _cli(*base, "--out", str(tmp_path / "roomy"), "--no-batch-cfg", "--no-low-memory")
    assert code == 0 and "memory: all models resident, two-pass guidance (as asked)" in capsys.readouterr().err
    code, _ = _cli(*base, "--out", str(tmp_path / "auto"))  # one job: staged anyway; roomy: batched
    assert code == 0 and "memory: staged" in (err := capsys.readouterr().err) and "batched guidance" in err
    with Image.open(tight["path"]) as a, Image.open(roomy["path"]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # staged or not: the same image
    code, _ = _cli(*base, "--out", str(tmp_path / "x"), "--low-memory", "--batch-cfg", "--text-dtype", "fp32")
    assert code == 0 and "(as asked)" in capsys.readouterr().err


# --------------------------------------------------------------------------- lean LoRA merge


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_lora_merge_equals_peft_direct_merge(tmp_path, dtype):
    """The merge that never copies a vocabulary matrix twice gives peft's own merge, bit for bit."""
    import warnings

    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from unison_runtime.planner.qwen import load_planner
    from unison_runtime.testing.tiny_qwen import build_tiny_qwen, build_tiny_unison_lora

    base = build_tiny_qwen(tmp_path / "qwen")
    lora = build_tiny_unison_lora(base, tmp_path / "lora")
    planner = load_planner(base, lora, device="cpu", dtype=dtype)
    assert any("merged in memory" in note for note in planner.notes)

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, local_files_only=True, dtype=dtype)
    rows = planner.model.get_input_embeddings().weight.shape[0]  # the adapter's vocabulary (padded)
    model.resize_token_embeddings(rows, mean_resizing=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(tie_word_embeddings|is_gradient_checkpointing).*")
        direct = PeftModel.from_pretrained(model, lora).merge_and_unload()
    got, want = planner.model.state_dict(), direct.state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    lean = planner.model
    assert lean.lm_head.weight.data_ptr() != lean.get_input_embeddings().weight.data_ptr()  # untied, as trained


def test_a_single_file_transformer_is_costed_at_its_own_size(comfy_dir):
    from unison_runtime.models_dir import find_models

    root, _ = comfy_dir
    footprint = memory_estimate.footprint_from_paths(find_models(root), transformer_dtype="fp32")
    model = tw.build_tiny_transformer(tw.tiny_transformer_config(text_dim=32))
    config = model.config
    read = footprint.transformer_config
    assert (read["num_layers"], len(read["vace_layers"]), read["ffn_dim"]) == \
        (config.num_layers, len(config.vace_layers), config.ffn_dim)
    assert read["num_attention_heads"] * read["attention_head_dim"] == \
        config.num_attention_heads * config.attention_head_dim
    # The text K/V it keeps while sampling follows (the 1.3B's would be 2.1 GiB in fp32).
    width = config.num_attention_heads * config.attention_head_dim
    expected = (2 * (config.num_layers + len(config.vace_layers)) + 1) * 2 * memory_estimate.CONTEXT_TOKENS * width * 4
    assert memory_estimate.text_kv_bytes(read, contexts=2, dtype_bytes=4) == expected
