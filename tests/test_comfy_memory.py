"""The nodes under ComfyUI's REAL model management (a ComfyUI checkout's ``comfy.model_management`` and
``ModelPatcher``), on a simulated GPU of 8, 12 and 24 GiB whose byte counts are the released models'.

What is simulated (tests/harness/real_comfy.py): only the device (ComfyUI asks its free and total
memory; weights moved there are set aside and restored when moved back) and, where a test says so,
the model computations (recorders that note what ComfyUI holds at that moment). What is real: the
loader nodes and files, ComfyUI's ``load_models_gpu`` / ``free_memory`` / ``ModelPatcher``, the
pack's bridge and the VACE Sampler node. Sizes are the released ones (bf16 transformer and umT5,
fp32 VAE), computed from the shipped configs on the meta device.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from harness import real_comfy
from harness.fixtures import (  # noqa: F401 - fixtures
    QWEN_NAME,
    TEXT_ENCODER_NAME,
    TRANSFORMER_NAME,
    VAE_NAME,
    comfy,
    install_models,
    tiny_models,
)
from harness.real_comfy import GPU, GiB

import nodes.vram_estimate as estimate
from nodes import comfy_bridge
from nodes._runtime import runtime_module
from nodes.generation import UnisonVaceSampler
from nodes.loaders import UnisonPlannerLoader, UnisonVaceLoader
from nodes.planning import UnisonPlanner, UnisonTaskRouter
from unison_runtime.errors import UnisonError

CHECKOUT = real_comfy.find_checkout()
MISSING = "no ComfyUI checkout (set UNISON_TEST_COMFYUI to one; DEVELOPERS.md)" if CHECKOUT is None else \
    "einops is missing (ComfyUI imports it; pip install -e '.[test]')" if importlib.util.find_spec("einops") is None \
    else None


def approx(value):
    """Byte counts scaled from tiny models to the released ones agree to a few bytes (float rounding)."""
    return pytest.approx(value, abs=64)

pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
CONFIGS = Path(__file__).resolve().parents[1] / "unison_runtime" / "configs"
TRUE_SIZE = comfy_bridge.true_size  # the pack's own, before a test scales it


@pytest.fixture(scope="module")
def released() -> SimpleNamespace:
    """Released shapes: bytes per part as loaded for a GPU, and the configs the estimate reads."""
    from diffusers import AutoencoderKLWan, WanVACETransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    transformer_config = json.loads((CONFIGS / "wan2.1-vace-1.3b-transformer" / "config.json").read_text())
    with torch.device("meta"):
        transformer = WanVACETransformer3DModel.from_config(transformer_config)
        vae = AutoencoderKLWan.from_config(json.loads((CONFIGS / "wan2.1-vae" / "config.json").read_text()))
        umt5 = UMT5EncoderModel(UMT5Config.from_pretrained(CONFIGS / "umt5-xxl-encoder"))
    count = {name: sum(p.numel() for p in m.parameters())
             for name, m in (("transformer", transformer), ("vae", vae), ("umt5", umt5))}
    memory = runtime_module("memory_estimate")
    sizes = {"transformer": count["transformer"] * 2, "vae": count["vae"] * 4, "umt5": count["umt5"] * 2}
    return SimpleNamespace(
        **sizes,
        footprint=memory.ModelFootprint(transformer=sizes["transformer"], vae=sizes["vae"],
                                        text_encoder=sizes["umt5"], transformer_config=dict(transformer.config),
                                        vae_config=dict(vae.config)),
        text_models=SimpleNamespace(text_encoder=SimpleNamespace(config=umt5.config, dtype=torch.bfloat16)))


def real(monkeypatch, env, tiny, released, gib: float, **options) -> real_comfy.RealComfy:
    """Real ComfyUI over the fake folders of ``env``, a ``gib`` GiB GPU, sizes and estimates at released scale."""
    install_models(env, tiny)
    rc = real_comfy.install(monkeypatch, CHECKOUT, int(gib * GiB), **options)
    files = runtime_module("vace.files")
    load = files.load_vace_from_files
    rc.disk_loads = []

    def load_and_scale(*args, **kwargs):
        models = load(*args, **kwargs)
        rc.disk_loads.append(models)
        rc.gpu.register(models.transformer, released.transformer)
        rc.gpu.register(models.vae, released.vae)
        rc.gpu.register(models.text_encoder, released.umt5)
        return models

    monkeypatch.setattr(files, "load_vace_from_files", load_and_scale)
    monkeypatch.setattr(estimate, "footprint", lambda m: released.footprint)
    monkeypatch.setattr(estimate, "run_settings", lambda m, o, r: dataclasses.replace(
        _original_settings(m, o, r), transformer_dtype="bf16", vae_dtype="fp32"))
    monkeypatch.setattr(estimate, "text_encoding_bytes", lambda m, **kw: _original_text(released.text_models, **kw))
    return rc


_original_settings, _original_text = estimate.run_settings, estimate.text_encoding_bytes


def on_gpu(module) -> bool:
    return all(t.device == GPU for t in [*module.parameters(), *module.buffers()])


def on_cpu(module) -> bool:
    return all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()])


def plan_for(width: int, height: int, frames: int):
    kind = "A short video of" if frames else "A photo of"
    packet = UnisonPlanner().run(f"{kind} a lighthouse at dusk, waves rolling in.")["result"][0]
    routed = UnisonTaskRouter().route(packet, "auto", width, height, frames, "auto", 0)["result"][0]
    assert (routed.plan.width, routed.plan.height, routed.plan.num_frames) == (width, height, frames or 1)
    return routed


def record_stages(monkeypatch, rc, vace) -> list[dict]:
    """Replace the two computations with recorders of what ComfyUI holds when each would run."""
    seen: list[dict] = []

    def snapshot(stage: str) -> None:
        seen.append({"stage": stage, "loaded": rc.loaded(), "umt5_on_gpu": on_gpu(vace.models.text_encoder),
                     "umt5_on_cpu": on_cpu(vace.models.text_encoder),
                     "sampling_on_gpu": on_gpu(vace.models.transformer) and on_gpu(vace.models.vae),
                     "used": rc.gpu.used()})

    def contexts(models, prompt, tokens=None, **_):
        snapshot("encode")
        return SimpleNamespace(cond=None, neg=None)

    def sample(models, plan, inputs, cond, neg, options, **kwargs):
        snapshot("sample")
        return runtime_module("vace.sampler").Generation(frames=torch.zeros(1, 8, 8, 3), fps=24)

    monkeypatch.setattr(runtime_module("vace.text"), "text_contexts", contexts)
    monkeypatch.setattr(runtime_module("vace.sampler"), "sample", sample)
    monkeypatch.setattr(runtime_module("vace.sources"), "prepare_vace_inputs",
                        lambda plan, media, salient=None: SimpleNamespace(
                            references=torch.zeros(0, 1, 1, 3), notes=[], used_plan=lambda given: given))
    return seen


def run_sampler(vace, packet) -> None:
    UnisonVaceSampler().sample(vace, packet, 0, 50, 5.0, 5.0, "blurry")


def load_vace(unique_id: str = "7", **choices):
    options = {"dtype": "auto", "text_encoder_device": "auto", "text_encoder_dtype": "auto", **choices}
    return UnisonVaceLoader().load(TRANSFORMER_NAME, VAE_NAME, TEXT_ENCODER_NAME, unique_id=unique_id, **options)[0]


# --------------------------------------------------------------------------- sizes


def test_true_sizes_registered_umt5_tied_embedding_counted_once(monkeypatch, comfy, tiny_models, released):  # noqa: F811
    install_models(comfy, tiny_models)
    rc = real_comfy.install(monkeypatch, CHECKOUT, 24 * GiB)
    monkeypatch.setattr(comfy_bridge, "true_size", TRUE_SIZE)  # the pack's own count, unscaled
    vace = load_vace()
    encoder = vace.models.text_encoder
    embedding = encoder.shared.weight
    assert encoder.encoder.embed_tokens.weight is embedding  # tied: one tensor under two names
    by_storage = {t.data_ptr(): t for t in encoder.state_dict().values()}  # tied names share one storage
    distinct = sum(t.numel() * t.element_size() for t in by_storage.values())
    # What the module holds: every distinct tensor once, non-saved buffers (fp8 weight scales) included.
    held = {t.data_ptr(): t for t in [*encoder.parameters(), *encoder.buffers()]}
    patcher = vace.text_patcher
    assert patcher.model_size() == sum(t.numel() * t.element_size() for t in held.values())
    # ComfyUI's own module_size (the state dict) would have counted the embedding twice.
    assert rc.mm.module_size(patcher.model) == distinct + embedding.numel() * embedding.element_size()
    for part, module in (("transformer", vace.models.transformer), ("vae", vace.models.vae)):
        expected = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        assert getattr(vace, f"{part}_patcher").model_size() == expected
    # At the released shapes the double count is 1.05 B values: 2.1 GB of bf16 ComfyUI would reserve for nothing.
    assert released.umt5 == 5_680_910_336 * 2


def test_comfyui_load_log_counts_the_tied_umt5_embedding_once(monkeypatch, caplog, comfy, tiny_models,  # noqa: F811
                                                               released):
    # ComfyUI's ModelPatcher.load logs "loaded completely <budget> <MB> <full>", summing module_size over the
    # modules named_modules() yields. umT5's tied embedding used to be two modules (shared and
    # encoder.embed_tokens), so the line counted it twice (8423 MB for the released scaled-fp8 file).
    rc = real(monkeypatch, comfy, tiny_models, released, 24)
    vace = load_vace()
    encoder = vace.models.text_encoder
    assert encoder.encoder.embed_tokens is encoder.shared  # one module for the one tied weight
    assert [n for n, m in vace.text_patcher.model.named_modules() if m is encoder.shared] == [
        "text_encoder.shared"]
    caplog.set_level("INFO")
    comfy_bridge.load_for_use([vace.text_patcher])
    assert on_gpu(encoder) and encoder.encoder.embed_tokens.weight is encoder.shared.weight
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded completely")]
    assert len(logged) == 1
    logged_bytes = float(logged[0].split()[3]) * 2**20
    # ComfyUI's module_size reads state dicts: each distinct saved tensor once now (the fp8 weight scales
    # are unsaved buffers, so they are the only bytes of the true size the line leaves out).
    saved = {id(t): t for t in encoder.state_dict(keep_vars=True).values()}
    scale = rc.gpu.scales[id(encoder)]
    assert logged_bytes == pytest.approx(sum(t.numel() * t.element_size() for t in saved.values()) * scale,
                                         rel=1e-6)
    embedding = encoder.shared.weight.numel() * encoder.shared.weight.element_size() * scale
    assert logged_bytes == pytest.approx(released.umt5, rel=0.01) and logged_bytes < released.umt5 + embedding / 2
    assert rc.mm.module_size(encoder) > released.umt5 + embedding / 2  # the whole state dict still names it twice


def test_weights_load_to_the_offload_device_and_comfyui_moves_them(monkeypatch, comfy, tiny_models,  # noqa: F811
                                                                   released):
    rc = real(monkeypatch, comfy, tiny_models, released, 24)
    vace = load_vace()
    assert all(on_cpu(p.model) for p in vace.patchers) and rc.gpu.used() == 0 and rc.loaded() == []
    assert [p.load_device for p in vace.patchers] == [GPU, GPU, GPU]
    comfy_bridge.load_for_use(vace.sampling_patchers)
    assert on_gpu(vace.models.transformer) and on_gpu(vace.models.vae) and on_cpu(vace.models.text_encoder)
    assert rc.gpu.used() == approx(released.transformer + released.vae)
    assert {id(p) for p in rc.loaded()} == {id(vace.transformer_patcher), id(vace.vae_patcher)}
    assert [lm.model_loaded_memory() for lm in rc.mm.current_loaded_models] == [
        lm.model.model_size() for lm in rc.mm.current_loaded_models]  # ComfyUI's bookkeeping matches


# --------------------------------------------------------------------------- staging


@pytest.mark.parametrize(("gib", "size", "umt5_encodes_on_gpu", "umt5_evicted"), [
    (8, (832, 480, 81), False, None),  # 10.6 GiB of umT5 never fits: it encodes on the CPU
    (12, (832, 480, 81), True, "whole"),
    # ComfyUI offloads just enough of umT5, module by module: 480P's sampling reserve (~7.5 GiB: the Wan VAE's
    # feature cache + one 4-frame chunk, or batched guidance) needs part of umT5's 10.6 GiB out of the way.
    (24, (832, 480, 81), True, "part"),
    (24, (256, 256, 0), True, "no"),  # room for all: ComfyUI keeps umT5 (nothing forces it out)
])
def test_umt5_loaded_to_encode_and_evicted_before_sampling(monkeypatch, comfy, tiny_models, released,  # noqa: F811
                                                          gib, size, umt5_encodes_on_gpu, umt5_evicted):
    rc = real(monkeypatch, comfy, tiny_models, released, gib)
    vace = load_vace()
    seen = record_stages(monkeypatch, rc, vace)
    run_sampler(vace, plan_for(*size))
    encode, sample = seen
    assert encode["umt5_on_gpu"] is umt5_encodes_on_gpu and encode["umt5_on_cpu"] is not umt5_encodes_on_gpu
    assert sample["sampling_on_gpu"]
    sampling_weights = released.transformer + released.vae
    if not umt5_encodes_on_gpu:
        assert vace.models.text_device == "cpu" and vace.text_patcher.load_device.type == "cpu"
        assert sample["used"] == approx(sampling_weights)  # umT5 never took GPU memory
        return
    assert vace.text_patcher.load_device == GPU and encode["used"] == approx(released.umt5)
    umt5_left = sample["used"] - sampling_weights
    if umt5_evicted == "whole":
        assert vace.text_patcher not in sample["loaded"] and sample["umt5_on_cpu"] and umt5_left == approx(0)
    elif umt5_evicted == "part":
        assert not sample["umt5_on_gpu"] and 0 < umt5_left < released.umt5
        options = runtime_module("vace.sampler").SamplingOptions(steps=50, guidance=5.0)
        reserve = estimate.sampling_bytes(plan_for(*size).plan, estimate.footprint(vace.models),
                                          estimate.run_settings(vace.models, options, 0))
        assert sample["used"] + reserve <= rc.gpu.total  # the room the sampler asked for is there
    else:
        assert sample["umt5_on_gpu"] and umt5_left == approx(released.umt5)


def test_nothing_loaded_twice(monkeypatch, comfy, tiny_models, released):  # noqa: F811
    rc = real(monkeypatch, comfy, tiny_models, released, 24)
    vace = load_vace()
    assert load_vace() is vace and len(rc.disk_loads) == 1  # same choices: the same copy, read from disk once
    record_stages(monkeypatch, rc, vace)
    packet = plan_for(256, 256, 0)
    run_sampler(vace, packet)
    everything = released.umt5 + released.transformer + released.vae
    assert rc.gpu.moved_in == approx(everything)  # each part moved to the GPU once
    run_sampler(vace, packet)
    run_sampler(vace, packet)
    assert rc.gpu.moved_in == approx(everything)  # later runs move nothing: all is still where ComfyUI put it
    assert len(rc.mm.current_loaded_models) == 3


def test_changed_choice_frees_the_previous_copy_before_loading(monkeypatch, comfy, tiny_models,  # noqa: F811
                                                               released):
    rc = real(monkeypatch, comfy, tiny_models, released, 24)
    first = load_vace(dtype="fp32")
    comfy_bridge.load_for_use(first.sampling_patchers)
    assert rc.gpu.used() > 0
    files = runtime_module("vace.files")
    loading = files.load_vace_from_files
    state_at_load = {}

    def load_second(*args, **kwargs):
        state_at_load.update(gpu=rc.gpu.used(), loaded=rc.loaded(), old_transformer=first.models.transformer)
        return loading(*args, **kwargs)

    monkeypatch.setattr(files, "load_vace_from_files", load_second)
    second = load_vace(dtype="bf16")  # the same loader node, another choice
    assert second is not first
    assert state_at_load == {"gpu": 0, "loaded": [], "old_transformer": None}  # freed before the new load
    other = load_vace(unique_id="8", dtype="bf16")
    assert other is second  # another loader node with the same choices shares the copy, frees nothing


# --------------------------------------------------------------------------- placement (--novram, --lowvram)


def test_novram_partial_load_is_completed(monkeypatch, comfy, tiny_models, released):  # noqa: F811
    rc = real(monkeypatch, comfy, tiny_models, released, 12)
    rc.set_vram_state("NO_VRAM")
    vace = load_vace()
    # What ComfyUI itself does under --novram, even with force_full_load: it "loads" the model without
    # moving weights that are not ComfyUI ops, yet records it as on the GPU.
    rc.mm.load_models_gpu([vace.transformer_patcher], force_full_load=True)
    assert on_cpu(vace.models.transformer) and vace.transformer_patcher.current_loaded_device() == GPU
    comfy_bridge.load_for_use(vace.sampling_patchers)
    assert on_gpu(vace.models.transformer) and on_gpu(vace.models.vae)
    for lm in rc.mm.current_loaded_models:
        assert lm.model_loaded_memory() == lm.model.model_size()


def test_novram_sampler_inputs_and_weights_on_the_same_device(monkeypatch, comfy, tiny_models,  # noqa: F811
                                                              released):
    rc = real(monkeypatch, comfy, tiny_models, released, 12)
    rc.set_vram_state("NO_VRAM")
    vace = load_vace()
    seen = record_stages(monkeypatch, rc, vace)
    run_sampler(vace, plan_for(256, 256, 0))
    assert seen[-1]["sampling_on_gpu"] and vace.models.device == str(GPU)


def test_lowvram_partially_evicted_model_comes_back_whole(monkeypatch, comfy, tiny_models, released):  # noqa: F811
    rc = real(monkeypatch, comfy, tiny_models, released, 12)
    rc.set_vram_state("LOW_VRAM")
    vace = load_vace()
    comfy_bridge.load_for_use([vace.transformer_patcher])
    # Another model needs 1 GiB: ComfyUI partially unloads the transformer (module by module).
    rc.mm.free_memory(rc.gpu.free() + GiB, GPU)
    assert not on_gpu(vace.models.transformer) and not on_cpu(vace.models.transformer)
    comfy_bridge.load_for_use([vace.transformer_patcher])
    assert on_gpu(vace.models.transformer)


def test_placement_that_cannot_be_completed_is_a_clear_error(monkeypatch, comfy, tiny_models,  # noqa: F811
                                                             released):
    rc = real(monkeypatch, comfy, tiny_models, released, 12)
    rc.set_vram_state("NO_VRAM")
    vace = load_vace()
    monkeypatch.setattr(rc.model_patcher.ModelPatcher, "partially_load", lambda self, *a, **k: 0)
    with pytest.raises(UnisonError, match=r"Unison VACE .*asked to load it on meta, but \d+ of its weights stayed "
                                          r"elsewhere \(.* on cpu"):
        comfy_bridge.load_for_use([vace.transformer_patcher])


# --------------------------------------------------------------------------- decode (real computation on the CPU)


def test_decode_out_of_memory_retried_tiled_without_losing_the_latents(monkeypatch, comfy, tiny_models):  # noqa: F811
    install_models(comfy, tiny_models)
    rc = real_comfy.install(monkeypatch, CHECKOUT, 24 * GiB)
    for name in ("get_torch_device", "text_encoder_device"):  # ComfyUI's --cpu devices: real computation
        monkeypatch.setattr(rc.mm, name, lambda: torch.device("cpu"))
    vace = load_vace()
    packet = plan_for(32, 32, 0)
    node = UnisonVaceSampler()
    expected = node.sample(vace, packet, 3, 2, 5.0, 5.0, "blurry")["result"][0]
    vae = vace.models.vae
    decode = type(vae).decode
    calls = []

    def failing_once(self, *args, **kwargs):
        calls.append(self.use_tiling)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (simulated)")
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(type(vae), "decode", failing_once)
    steps = []
    monkeypatch.setattr(comfy_bridge, "progress_bar", lambda total: SimpleNamespace(
        update_absolute=lambda step, total, preview=None: steps.append(step)))
    out = node.sample(vace, packet, 3, 2, 5.0, 5.0, "blurry")
    assert calls == [False, True]  # untiled, then tiled
    assert steps == [1, 2]  # the denoising ran once: the same latents were decoded again
    torch.testing.assert_close(out["result"][0], expected)  # tiny frames fit one tile: the same pixels
    assert "decoding ran out of memory; decoded again in 256x256 tiles" in out["ui"]["text"][0]
    assert vace.transformer_patcher not in rc.loaded()  # freed for the retry
    assert vae.use_tiling is False  # the VAE's own setting is back


def test_on_the_cpu_stored_weights_give_their_ram_back_and_stay_loaded(monkeypatch, comfy, tiny_models):  # noqa: F811
    """ComfyUI's --cpu: the offload device is the compute device, so its unload would free nothing. umT5's mapped
    pages go back after encoding and the transformer's before decoding; ComfyUI keeps all three loaded, and the next
    prompt computes the same from pages read back from the files."""
    mapped_pages = runtime_module("mapped_pages")
    install_models(comfy, tiny_models)
    rc = real_comfy.install(monkeypatch, CHECKOUT, 24 * GiB)
    for name in ("get_torch_device", "text_encoder_device"):  # ComfyUI's --cpu devices: real computation
        monkeypatch.setattr(rc.mm, name, lambda: torch.device("cpu"))
    vace = load_vace()
    assert [p.load_device.type for p in vace.patchers] == ["cpu", "cpu", "cpu"]
    umt5, transformer = (mapped_pages.tensors_of(m) for m in (vace.models.text_encoder, vace.models.transformer))
    assert mapped_pages.mapped_bytes(umt5) > 0 and mapped_pages.mapped_bytes(transformer) > 0
    packet = plan_for(32, 32, 0)
    node = UnisonVaceSampler()
    first = node.sample(vace, packet, 3, 2, 5.0, 5.0, "blurry")["result"][0]
    assert mapped_pages.resident_mapped_bytes(umt5) == 0 and mapped_pages.resident_mapped_bytes(transformer) == 0
    assert {id(p) for p in rc.loaded()} == {id(p) for p in vace.patchers}  # ComfyUI still holds each, once
    again = node.sample(vace, packet, 3, 2, 5.0, 5.0, "blurry")["result"][0]
    assert torch.equal(first, again)


def test_on_the_cpu_the_planner_is_not_kept_beside_stage_two(monkeypatch, comfy, tiny_models):  # noqa: F811
    """ComfyUI's --cpu: after planning, the Qwen planner leaves ComfyUI's loaded models and its RAM is freed; the
    next plan loads it again and ComfyUI holds it once."""
    install_models(comfy, tiny_models)
    rc = real_comfy.install(monkeypatch, CHECKOUT, 24 * GiB)
    monkeypatch.setattr(rc.mm, "get_torch_device", lambda: torch.device("cpu"))
    loaded = UnisonPlannerLoader().load(QWEN_NAME, "none", "auto", "auto", "sdpa")[0]
    assert rc.loaded() == [loaded.patcher]  # registered as loaded right away
    first = UnisonPlanner().run("A photo of a lighthouse at dusk.", planner=loaded)["result"][0]
    assert rc.loaded() == [] and not loaded.planner.loaded
    again = UnisonPlanner().run("A photo of a lighthouse at dusk.", planner=loaded)["result"][0]
    assert again.plan == first.plan and rc.loaded() == [] and not loaded.planner.loaded
