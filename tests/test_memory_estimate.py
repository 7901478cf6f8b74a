"""The memory preflight: its accounting, its decisions, and how it compares with measured peaks.

The comparison runs tiny random models in fresh processes (bench.bench_memory_estimate's child:
peak RSS via the kernel's high-water mark) and requires the estimate to be at least 0.9x and at
most 2x the measured peak, at an image size and a video size.
"""

from __future__ import annotations

import dataclasses

import pytest

from unison_runtime import memory_estimate as memory
from unison_runtime.plan import default_plan
from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_vace_diffusers(tmp_path_factory.mktemp("vace") / "vace")


REAL = memory.ModelFootprint(
    transformer=1_420_000_000 * 2, vae=127_000_000 * 4, text_encoder=5_680_000_000 * 2,
    transformer_config=memory._json_config(None, "wan2.1-vace-1.3b-transformer"),
    vae_config=memory._json_config(None, "wan2.1-vae"), stage_one=3_750_000_000 * 2,
    text_config=memory._json_config(None, "umt5-xxl-encoder"), text_dtype="bf16")


def test_weight_bytes_from_headers_match_the_loaded_parameters(tiny_dir):
    from unison_runtime.models_dir import ModelPaths
    from unison_runtime.vace.loading import load_vace_diffusers

    models = load_vace_diffusers(tiny_dir, device="cpu")
    loaded = memory.footprint_from_models(models)
    read = memory.footprint_from_paths(ModelPaths(diffusers_dir=tiny_dir), transformer_dtype="fp32")
    stored = sum(t.numel() * t.element_size() for t in models.transformer.state_dict().values())
    assert read.transformer == stored <= loaded.transformer  # loaded adds the rotary tables (not in the file)
    assert read.vae == loaded.vae
    assert read.text_encoder == pytest.approx(loaded.text_encoder, rel=0.02)  # tied embeddings are stored once
    half = memory.footprint_from_paths(ModelPaths(diffusers_dir=tiny_dir), transformer_dtype="bf16")
    assert half.transformer * 2 == read.transformer


def test_latent_tokens_follow_wan_geometry():
    config, vae = REAL.transformer_config, REAL.vae_config
    assert memory.latent_tokens(832, 480, 81, config, vae) == 21 * 30 * 52
    assert memory.latent_tokens(832, 480, 1, config, vae, num_references=1) == 2 * 30 * 52


def test_parts_grow_with_what_they_depend_on():
    settings = memory.RunSettings(device="cuda:0", transformer_dtype="bf16", text_device="cpu")
    small = memory.estimate_run(default_plan("text_to_video", width=832, height=480), REAL, settings)
    large = memory.estimate_run(default_plan("text_to_video", width=1280, height=720), REAL, settings)
    for part in ("sampling: VACE hints", "sampling: block activations", "decoding: VAE", "decoding: frames"):
        assert large.parts[part] > small.parts[part]
    assert small.other_devices == {"cpu": REAL.text_encoder}  # umT5 on the CPU is not counted on the GPU
    two_pass = memory.estimate_run(default_plan("text_to_video"), REAL, dataclasses.replace(settings, batch_cfg=False))
    assert two_pass.parts["sampling: VACE hints"] * 2 == small.parts["sampling: VACE hints"]
    math_attention = memory.estimate_run(default_plan("text_to_video"), REAL,
                                         dataclasses.replace(settings, attention="math"))
    assert math_attention.parts["sampling: attention scores"] > 100 * 1024**3  # 32760 tokens squared, 12 heads
    tiled = memory.estimate_run(default_plan("text_to_video"), REAL, dataclasses.replace(settings, vae_tiling=True))
    assert tiled.parts["decoding: VAE"] < small.parts["decoding: VAE"]
    low = memory.estimate_run(default_plan("text_to_video"), REAL,
                              dataclasses.replace(settings, text_device=None, low_memory=True))
    resident = memory.estimate_run(default_plan("text_to_video"), REAL,
                                   dataclasses.replace(settings, text_device=None, low_memory=False))
    # Staged: stage one and umT5 are gone before the transformer loads, and each is held alone while it runs.
    assert resident.phases["sampling"] - low.phases["sampling"] == REAL.text_encoder + REAL.stage_one
    assert low.phases["planning"] == REAL.stage_one + memory.RUNTIME_OVERHEAD["cuda"]
    assert low.phases["encoding the prompt"] == (REAL.text_encoder + low.parts["encoding the prompt: umT5"]
                                                 + memory.RUNTIME_OVERHEAD["cuda"])
    assert low.peak < resident.peak


def test_text_kv_cache_is_counted_while_sampling_as_the_sampler_holds_it(tiny_dir):
    from unison_runtime.vace import text_kv
    from unison_runtime.vace.loading import load_vace_diffusers

    # The released 1.3B: 30 + 15 cross-attentions, 12 x 128 wide, 2048 context rows, both guidance branches.
    settings = memory.RunSettings(device="cuda:0", transformer_dtype="bf16", text_device="cpu")
    plan = default_plan("text_to_video", width=832, height=480)
    cached = memory.estimate_run(plan, REAL, settings)
    uncached = memory.estimate_run(plan, REAL, dataclasses.replace(settings, text_kv_cache=False))
    expected = (2 * (30 + 15) + 1) * 2 * 2048 * 1536 * 2
    assert cached.parts["sampling: text K/V (computed once)"] == expected
    assert cached.phases["sampling"] - uncached.phases["sampling"] == expected
    assert cached.phases["decoding"] == uncached.phases["decoding"]  # the memo is cleared when sampling ends
    one_branch = memory.estimate_run(plan, REAL, dataclasses.replace(settings, guidance=1.0))
    assert one_branch.parts["sampling: text K/V (computed once)"] * 2 == expected
    # The config-only count equals the runtime's count on a loaded model.
    models = load_vace_diffusers(tiny_dir, device="cpu")
    config = dict(models.transformer.config)
    assert memory.text_kv_bytes(config, contexts=2, dtype_bytes=4, context_tokens=64) == \
        text_kv.cache_bytes(models.transformer, 64)


def test_2048_video_is_refused_with_a_size_that_fits_and_the_flags():
    plan = default_plan("text_to_video", width=2048, height=2048, num_frames=121)
    settings = memory.RunSettings(device="cpu", transformer_dtype="fp32")
    with pytest.raises(memory.MemoryWontFit) as refused:
        memory.check_fits(plan, REAL, settings, free=48 * 1024**3)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("2048x2048, 121 frames needs about")
    assert refused.value.estimate.peak > 100 * 1024**3
    size = message.split("(e.g. ")[1].split(")")[0]
    w, rest = size.split("x")
    h, frames = rest.split(", ")
    fitting = default_plan("text_to_video", width=int(w), height=int(h), num_frames=int(frames.split()[0]))
    memory.check_fits(fitting, REAL, dataclasses.replace(settings, vae_tiling=True, low_memory=True),
                      free=48 * 1024**3)  # the advice is a size that really passes the same check
    for flag in ("--low-memory", "--vae-tiling", "guidance 1"):
        assert flag in message
    with pytest.raises(memory.MemoryWontFit, match="VAE tiling"):
        memory.check_fits(plan, REAL, settings, free=24 * 1024**3, where="comfyui")


def test_tiling_is_switched_on_when_only_the_decode_does_not_fit():
    plan = default_plan("text_to_video", width=832, height=480, num_frames=81)
    settings = memory.RunSettings(device="cuda", transformer_dtype="bf16", text_device="cpu", low_memory=True)
    whole = memory.estimate_run(plan, REAL, settings)
    tiled = memory.estimate_run(plan, REAL, dataclasses.replace(settings, vae_tiling=True))
    assert whole.peak_phase in ("decoding", "encoding") and tiled.peak < whole.peak
    free = int((tiled.peak + whole.peak) / 2 / 0.9)
    decision = memory.check_fits(plan, REAL, settings, free=free)
    assert decision.tiling_switched_on and decision.estimate.settings.vae_tiling
    assert not memory.check_fits(plan, REAL, settings, free=whole.peak * 2).tiling_switched_on


def test_text_kv_is_recomputed_when_keeping_it_is_what_does_not_fit():
    plan = default_plan("text_to_video", width=832, height=480, num_frames=81)
    settings = memory.RunSettings(device="cuda", transformer_dtype="bf16", text_device="cpu", low_memory=True,
                                  vae_tiling=True)
    kept = memory.estimate_run(plan, REAL, settings)
    dropped = memory.estimate_run(plan, REAL, dataclasses.replace(settings, text_kv_cache=False))
    assert kept.peak_phase == "sampling"
    assert kept.peak - dropped.peak == kept.parts["sampling: text K/V (computed once)"]
    decision = memory.check_fits(plan, REAL, settings, free=int((kept.peak + dropped.peak) / 2 / 0.9))
    assert decision.text_kv_switched_off and not decision.tiling_switched_on
    assert not decision.estimate.settings.text_kv_cache and decision.estimate.peak == dropped.peak
    # Room for both: nothing is switched.
    untouched = memory.check_fits(plan, REAL, settings, free=kept.peak * 2)
    assert not untouched.text_kv_switched_off and untouched.estimate.settings.text_kv_cache
    # Only both together fit: both are switched.
    whole = dataclasses.replace(settings, vae_tiling=False)
    both = memory.estimate_run(plan, REAL, dataclasses.replace(whole, vae_tiling=True, text_kv_cache=False))
    tiled_only = memory.estimate_run(plan, REAL, dataclasses.replace(whole, vae_tiling=True))
    assert tiled_only.peak > both.peak and dropped.peak < tiled_only.peak
    decision = memory.check_fits(plan, REAL, whole, free=both.peak / 0.9)
    assert decision.tiling_switched_on and decision.text_kv_switched_off and decision.estimate.peak == both.peak


@pytest.mark.parametrize("width,height,frames", [(256, 256, 1), (128, 128, 9)])
def test_estimate_is_within_0_9x_and_2x_of_the_measured_peak(tiny_dir, width, height, frames):
    from bench.bench_memory_estimate import HIGH, LOW
    from bench.common import run_child

    result = run_child(["-m", "bench.bench_memory_estimate", "--child", str(tiny_dir), str(width), str(height),
                        str(frames), "2", "0"], timeout=900)
    ratio = result["estimate"] / result["measured"]
    assert LOW <= ratio <= HIGH, result
    assert result["runtime_measured"] <= memory.RUNTIME_OVERHEAD["cpu"] * 1.1  # the fixed cost added for a cold run


def test_vae_decode_counts_the_feature_cache_of_every_causal_convolution_of_the_released_decoder():
    import torch
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    config = memory._json_config(None, "wan2.1-vae")
    with torch.device("meta"):
        vae = AutoencoderKLWan(**{k: v for k, v in config.items() if not k.startswith("_")})
    cached: dict[int, int] = {}
    last = len(config["dim_mult"]) - 1
    for name, module in vae.decoder.named_modules():
        if not isinstance(module, WanCausalConv3d) or "conv_shortcut" in name:
            continue  # the 1x1x1 shortcut runs without a cache
        level = int(name.split(".")[1]) if name.startswith("up_blocks.") else (last if name == "conv_out" else 0)
        cached[level] = cached.get(level, 0) + module.in_channels
    levels = memory._decoder_levels(config)
    assert {i: level["cached"] for i, level in enumerate(levels)} == cached
    # The working set depends on the frame size, not the frame count (one 4-frame chunk at a time).
    whole = memory.vae_decode_bytes(832, 480, 81, config, 4, device="cuda")
    assert whole == memory.vae_decode_bytes(832, 480, 9, config, 4, device="cuda")
    cache = sum(level["cached"] * 2 * (480 // level["scale"]) * (832 // level["scale"]) for level in levels) * 4
    assert cache < whole <= cache + 96 * 20 * 832 * 480 * 4  # + one chunk: 96 channels x (4 x 4 + 4) frames
    assert 6 * 1024**3 < whole < 7 * 1024**3
    tiled = memory.vae_decode_bytes(832, 480, 81, config, 4, tiled=True, device="cuda")
    assert tiled == memory.vae_decode_bytes(256, 256, 81, config, 4, device="cuda")
    assert memory.vae_decode_bytes(256, 256, 9, config, 4, device="cpu") > memory.vae_decode_bytes(
        256, 256, 9, config, 4, device="cuda")


# --------------------------------------------------------------------------- stage one's LM head


def write_qwen_like(folder, *, vocab=100, hidden=16, dtype=None, own_head=False):
    """A folder whose safetensors header has a Qwen-style embedding (and an LM head of its own if asked)."""
    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.bfloat16
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model.language_model.embed_tokens.weight": torch.zeros(vocab, hidden, dtype=dtype),
               "model.language_model.layers.0.mlp.up_proj.weight": torch.zeros(4 * hidden, hidden, dtype=dtype)}
    if own_head:
        tensors["lm_head.weight"] = torch.zeros(vocab, hidden, dtype=dtype)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_adapter_config(folder, modules_to_save):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"modules_to_save": modules_to_save, "r": 4}))
    return folder


def test_lm_head_untied_by_the_lora_and_cast_for_the_logits_are_counted(tmp_path):
    base = write_qwen_like(tmp_path / "qwen")
    lora = write_adapter_config(tmp_path / "lora", ["embed_tokens", "lm_head"])
    matrix = 100 * 16
    assert memory.lm_head_bytes([base], lora, "fp32") == (matrix * 2, matrix * 4)  # bf16 held, fp32 cast
    assert memory.lm_head_bytes([base], None, "fp32") == (0, matrix * 4)  # tied: no second matrix
    assert memory.lm_head_bytes([base], write_adapter_config(tmp_path / "plain", None), "fp32") == (0, matrix * 4)
    assert memory.lm_head_bytes([base], lora, "bf16") == (matrix * 2, 0)  # computes as stored: nothing cast
    assert memory.lm_head_bytes([base], lora, "fp32", keep_narrower=False) == (matrix * 2, 0)  # converted at load
    own = write_qwen_like(tmp_path / "untied", own_head=True)
    assert memory.lm_head_bytes([own], lora, "fp32") == (0, matrix * 4)  # already its own matrix
    assert memory.lm_head_bytes([tmp_path / "missing"], lora, "fp32") == (0, 0)


def test_planning_phase_holds_the_untied_head_and_the_cast(tmp_path, tiny_dir):
    from unison_runtime.models_dir import ModelPaths

    base = write_qwen_like(tmp_path / "qwen", vocab=1000, hidden=64)
    lora = write_adapter_config(tmp_path / "lora", ["embed_tokens", "lm_head"])
    paths = ModelPaths(diffusers_dir=tiny_dir)
    plain = memory.footprint_from_paths(paths, transformer_dtype="fp32", stage_one=[base], stage_one_dtype="fp32")
    merged = memory.footprint_from_paths(paths, transformer_dtype="fp32", stage_one=[base], stage_one_dtype="fp32",
                                         stage_one_lora=lora)
    matrix = 1000 * 64
    assert merged.stage_one == plain.stage_one + matrix * 2 and merged.stage_one_work == plain.stage_one_work \
        == matrix * 4
    plan = default_plan("text_to_image", width=64, height=64)
    settings = memory.RunSettings(low_memory=True)
    without_work = dataclasses.replace(merged, stage_one_work=0)
    phases = memory.estimate_run(plan, merged, settings).phases
    assert phases["planning"] - memory.estimate_run(plan, without_work, settings).phases["planning"] == matrix * 4
    assert memory.footprint_from_paths(paths, transformer_dtype="fp32").stage_one_work == 0  # no Qwen: nothing
    elsewhere = memory.estimate_run(plan, merged, dataclasses.replace(settings, stage_one_device="cuda:1"))
    assert "planning" not in elsewhere.phases and elsewhere.other_devices["cuda:1"] >= merged.stage_one + matrix * 4


# --------------------------------------------------------------------------- the transformer's mapped pages


def test_the_cpu_vae_phases_do_not_count_the_transformers_mapped_weights(tmp_path):
    import torch
    from safetensors.torch import load_file

    from unison_runtime.models_dir import find_models
    from unison_runtime.testing.tiny_wan_files import build_tiny_comfy_models_dir
    from unison_runtime.vace.files import load_vace_from_files

    files = build_tiny_comfy_models_dir(tmp_path)
    read = memory.footprint_from_paths(find_models(tmp_path), transformer_dtype="fp32")
    stored = load_file(str(files["transformer"]))
    assert read.transformer_mapped == sum(t.nbytes for t in stored.values() if t.ndim == 2
                                          and t.dtype == torch.float16) > 0  # the fp16 matrices stay as stored
    assert memory.footprint_from_paths(find_models(tmp_path), transformer_dtype="fp32",
                                       cast_per_layer=False).transformer_mapped == 0  # converted: private memory
    models = load_vace_from_files(files["transformer"], files["vae"], files["text_encoder"], device="cpu")
    loaded = memory.footprint_from_models(models)
    kept = sum(t.nbytes for t in models.transformer.parameters() if t.dtype == torch.float16)
    assert loaded.transformer_mapped == kept and 0 < kept <= read.transformer_mapped
    plan = default_plan("text_to_video", width=64, height=64, num_frames=9)
    unmapped = dataclasses.replace(loaded, transformer_mapped=0)
    for device, given_back in (("cpu", kept), ("cuda", 0)):  # given back on the CPU only
        settings = memory.RunSettings(device=device, low_memory=True)
        with_pages, without = (memory.estimate_run(plan, f, settings).phases for f in (loaded, unmapped))
        assert {phase: without[phase] - with_pages[phase] for phase in without} == {
            "loading": 0, "encoding": given_back, "sampling": 0, "decoding": given_back, "encoding the prompt": 0}
