"""Stage two on a tiny random Wan2.1-VACE in the real diffusers layout: loading, text contexts, sampling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from unison_runtime.errors import MediaError, SamplingCancelled, UnisonError, WeightsError
from unison_runtime.plan import default_plan
from unison_runtime.projector import ConditioningError
from unison_runtime.testing.tiny_wan import TINY_VACE, build_tiny_vace_diffusers
from unison_runtime.vace.loading import load_vace_diffusers, resolve_dtype
from unison_runtime.vace.sampler import SamplingOptions, sample
from unison_runtime.vace.sources import VaceInputs, prepare_vace_inputs
from unison_runtime.vace.text import CONTEXT_LENGTH, WAN_NEGATIVE_PROMPT, encode_text, text_contexts

SIZE = 32
FRAMES = 5
Z = TINY_VACE.z_dim


@pytest.fixture(scope="module")
def vace_dir(tmp_path_factory):
    return build_tiny_vace_diffusers(tmp_path_factory.mktemp("vace") / "Wan2.1-VACE-1.3B-diffusers")


@pytest.fixture(scope="module")
def models(vace_dir):
    return load_vace_diffusers(vace_dir, device="cpu")


@pytest.fixture(scope="module")
def contexts(models):
    torch.manual_seed(1)
    return text_contexts(models, "a lion walking around in its habitat", torch.randn(1, 4, TINY_VACE.text_dim))


def video_plan(frames: int = FRAMES):
    return default_plan("text_to_video", width=SIZE, height=SIZE, num_frames=frames)


def random_inputs(seed: int = 0, references: int = 0, frames: int = FRAMES) -> VaceInputs:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (frames, SIZE, SIZE, 3), dtype=np.uint8)
    mask = (rng.random((frames, SIZE, SIZE)) > 0.5).astype(np.float32)
    refs = rng.integers(0, 256, (references, SIZE, SIZE, 3), dtype=np.uint8)
    return VaceInputs(
        frames=torch.from_numpy(pixels).float() / 255,
        masks=torch.from_numpy(mask),
        references=torch.from_numpy(refs).float() / 255,
    )


def record_forwards(transformer):
    """Collect the keyword tensors of every transformer forward; returns (calls, handle)."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    return calls, transformer.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------- builder and loading


def test_builder_writes_the_diffusers_layout_with_matching_dims(vace_dir):
    index = json.loads((vace_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline"
    assert index["transformer"] == ["diffusers", "WanVACETransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (vace_dir / part).is_file(), part
    transformer = json.loads((vace_dir / "transformer/config.json").read_text())
    text = json.loads((vace_dir / "text_encoder/config.json").read_text())
    assert transformer["text_dim"] == text["d_model"] == TINY_VACE.text_dim
    assert transformer["vace_in_channels"] == 2 * transformer["in_channels"] + 64
    scheduler = json.loads((vace_dir / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "UniPCMultistepScheduler"
    assert scheduler["prediction_type"] == "flow_prediction" and scheduler["use_flow_sigmas"] is True


def test_loader_returns_eval_models_on_the_cpu_in_fp32(models, vace_dir):
    assert models.device == models.text_device == "cpu"
    assert models.dtype == torch.float32 and models.vae.dtype == torch.float32
    assert not models.transformer.training and not models.text_encoder.training
    assert models.transformer.config.text_dim == models.text_encoder.config.d_model
    assert models.scheduler_config["_class_name"] == "UniPCMultistepScheduler"
    assert models.origin["transformer"] == str(vace_dir / "transformer")


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("vae", "vae"),
        ("transformer/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors"),
        ("text_encoder/config.json", "config.json"),
        ("tokenizer", "tokenizer"),
    ],
)
def test_incomplete_directory_names_what_is_missing(vace_dir, tmp_path, remove, named):
    copy = shutil.copytree(vace_dir, tmp_path / "copy")
    target = copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(WeightsError, match=named):
        load_vace_diffusers(copy, device="cpu")


def test_missing_directory_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_vace_diffusers(tmp_path / "nowhere", device="cpu")


def test_dtype_defaults_and_names():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cpu", role="text_encoder") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(WeightsError, match="fp32, fp16, bf16"):
        resolve_dtype("int8", "cpu")


# --------------------------------------------------------------------------- text contexts


def reference_umt5(models, text: str) -> torch.Tensor:
    """What Wan/diffusers compute: pad to 512 with a mask, encode, keep the real tokens."""
    tokens = models.tokenizer([text], padding="max_length", max_length=512, truncation=True,
                              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        hidden = models.text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    return hidden[:, : int(tokens.attention_mask.sum())]


def test_encode_text_keeps_real_tokens_and_matches_the_padded_reference(models):
    text = "a lion walking around in its habitat"
    embedding = encode_text(models, text)
    ids = models.tokenizer(text).input_ids
    assert ids[-1] == models.tokenizer.eos_token_id
    assert embedding.shape == (1, len(ids), TINY_VACE.text_dim)
    torch.testing.assert_close(embedding, reference_umt5(models, text), atol=1e-5, rtol=1e-5)


def test_conditional_context_is_text_then_projector_tokens_then_zeros(models, contexts):
    text = encode_text(models, "a lion walking around in its habitat")
    length = text.shape[1]
    torch.manual_seed(1)
    tokens = torch.randn(1, 4, TINY_VACE.text_dim)
    cond = contexts.cond
    assert cond.shape == (1, CONTEXT_LENGTH, TINY_VACE.text_dim) == (1, 2048, TINY_VACE.text_dim)
    assert (contexts.text_tokens, contexts.projector_tokens) == (length, 4)
    torch.testing.assert_close(cond[:, :length], text)
    torch.testing.assert_close(cond[:, length : length + 4], tokens)
    assert torch.count_nonzero(cond[:, length + 4 :]) == 0
    assert torch.count_nonzero(cond[:, : length + 4].abs().sum(-1)) == length + 4


def test_negative_context_is_wan_default_prompt_zero_padded_without_projector_tokens(models, contexts):
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and WAN_NEGATIVE_PROMPT.endswith("背景人很多，倒着走")
    negative = encode_text(models, WAN_NEGATIVE_PROMPT)
    n = negative.shape[1]
    assert contexts.negative_tokens == n > 1
    assert contexts.neg.shape == (1, 2048, TINY_VACE.text_dim)
    torch.testing.assert_close(contexts.neg[:, :n], negative)
    assert torch.count_nonzero(contexts.neg[:, n:]) == 0


def test_custom_negative_prompt_and_no_projector(models):
    result = text_contexts(models, "a red car", None, negative_prompt="blurry")
    text, negative = encode_text(models, "a red car"), encode_text(models, "blurry")
    assert result.projector_tokens == 0
    torch.testing.assert_close(result.cond[:, : text.shape[1]], text)
    assert torch.count_nonzero(result.cond[:, text.shape[1] :]) == 0
    torch.testing.assert_close(result.neg[:, : negative.shape[1]], negative)
    assert torch.count_nonzero(result.neg[:, negative.shape[1] :]) == 0


def test_context_longer_than_total_length_is_refused(models):
    with pytest.raises(ConditioningError, match="longer than total_length"):
        text_contexts(models, "a lion walking around", torch.zeros(1, 4, TINY_VACE.text_dim), total_length=6)


# --------------------------------------------------------------------------- sampling


def test_same_seed_same_output_different_seed_different(models, contexts):
    plan = video_plan()
    inputs = prepare_vace_inputs(plan, [])
    options = SamplingOptions(steps=2, seed=7)
    first = sample(models, plan, inputs, contexts.cond, contexts.neg, options)
    again = sample(models, plan, inputs, contexts.cond, contexts.neg, options)
    other = sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=2, seed=8))
    assert first.frames.shape == (FRAMES, SIZE, SIZE, 3) and first.frames.dtype == torch.float32
    assert first.frames.device.type == "cpu" and first.fps == 24
    assert float(first.frames.min()) >= 0.0 and float(first.frames.max()) <= 1.0
    assert torch.equal(first.frames, again.frames)
    assert not torch.equal(first.frames, other.frames)


def test_progress_is_reported_once_per_step(models, contexts):
    plan = video_plan()
    seen: list[tuple[int, int]] = []
    sample(models, plan, prepare_vace_inputs(plan, []), contexts.cond, contexts.neg, SamplingOptions(steps=3),
           progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_cancel_stops_within_one_step(models, contexts):
    plan = video_plan()
    progress: list[int] = []
    checks = {"n": 0}

    def cancel() -> bool:
        checks["n"] += 1
        return len(progress) >= 2  # the user presses stop after the second step

    calls, handle = record_forwards(models.transformer)
    try:
        with pytest.raises(SamplingCancelled, match="step 3 of 5"):
            sample(models, plan, prepare_vace_inputs(plan, []), contexts.cond, contexts.neg,
                   SamplingOptions(steps=5), progress=lambda s, t: progress.append(s), cancel=cancel)
    finally:
        handle.remove()
    assert progress == [1, 2]
    assert len(calls) == 2  # one batched forward per finished step, none after the cancel
    assert checks["n"] == 4  # before sampling, and before steps 1, 2 and 3


def test_batched_guidance_equals_two_passes(models, contexts):
    plan = video_plan()
    inputs = random_inputs(3, references=1)
    calls, handle = record_forwards(models.transformer)
    try:
        batched = sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=3, batch_cfg=True))
        n_batched = len(calls)
        two = sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=3, batch_cfg=False))
    finally:
        handle.remove()
    assert n_batched == 3 and len(calls) - n_batched == 6
    assert calls[0]["hidden_states"].shape[0] == 2 and calls[-1]["hidden_states"].shape[0] == 1
    torch.testing.assert_close(batched.frames, two.frames, atol=1e-4, rtol=0)


def test_batched_guidance_falls_back_to_two_passes_when_out_of_memory(models, contexts):
    plan = video_plan()
    inputs = prepare_vace_inputs(plan, [])
    two = sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=2, batch_cfg=False))
    batches: list[int] = []

    def oom_on_batch_of_two(module, args, kwargs):
        batches.append(kwargs["hidden_states"].shape[0])
        if kwargs["hidden_states"].shape[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = models.transformer.register_forward_pre_hook(oom_on_batch_of_two, with_kwargs=True)
    try:
        result = sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=2))
    finally:
        handle.remove()
    assert batches == [2, 1, 1, 1, 1]  # tried once batched, then two passes per step
    assert any("ran out of memory at step 1" in note for note in result.notes)
    assert torch.equal(result.frames, two.frames)


def test_contexts_of_different_lengths_run_as_two_passes(models, contexts):
    plan = video_plan()
    inputs = prepare_vace_inputs(plan, [])
    short_neg = contexts.neg[:, :512]
    two = sample(models, plan, inputs, contexts.cond, short_neg, SamplingOptions(steps=1, batch_cfg=False))
    result = sample(models, plan, inputs, contexts.cond, short_neg, SamplingOptions(steps=1))
    assert torch.equal(result.frames, two.frames) and any("differ in length" in n for n in result.notes)


def test_without_guidance_one_forward_per_step_and_no_negative_needed(models, contexts):
    plan = video_plan()
    calls, handle = record_forwards(models.transformer)
    try:
        result = sample(models, plan, prepare_vace_inputs(plan, []), contexts.cond, None,
                        SamplingOptions(steps=2, guidance=1.0))
    finally:
        handle.remove()
    assert len(calls) == 2 and result.frames.shape[0] == FRAMES
    with pytest.raises(UnisonError, match="negative context"):
        sample(models, plan, prepare_vace_inputs(plan, []), contexts.cond, None, SamplingOptions(steps=2))


def test_matches_diffusers_wan_vace_pipeline(models, contexts):
    """Same inputs, noise and scheduler: our loop (two-pass guidance) reproduces WanVACEPipeline."""
    from diffusers import WanVACEPipeline
    from PIL import Image

    from unison_runtime.vace.sampler import make_scheduler

    plan = video_plan()
    inputs = random_inputs(5, references=1)
    ours = sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=3, batch_cfg=False))
    pipe = WanVACEPipeline(tokenizer=models.tokenizer, text_encoder=models.text_encoder, vae=models.vae,
                           transformer=models.transformer, scheduler=make_scheduler(models, 5.0))
    pipe.set_progress_bar_config(disable=True)
    to_u8 = lambda t: (t * 255).round().to(torch.uint8).numpy()  # noqa: E731 - exact: inputs are k/255
    theirs = pipe(
        video=[Image.fromarray(f) for f in to_u8(inputs.frames)],
        mask=[Image.fromarray(m) for m in to_u8(inputs.masks)],
        reference_images=[Image.fromarray(to_u8(inputs.references)[0])],
        prompt_embeds=contexts.cond, negative_prompt_embeds=contexts.neg,
        height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=3, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).frames[0]
    np.testing.assert_allclose(ours.frames.numpy(), theirs, atol=1e-5)


def test_image_task_generates_one_frame_and_reference_frames_are_trimmed(models, contexts):
    image_plan = default_plan("text_to_image", width=SIZE, height=SIZE)
    image = sample(models, image_plan, prepare_vace_inputs(image_plan, []), contexts.cond, contexts.neg,
                   SamplingOptions(steps=1))
    assert image.frames.shape == (1, SIZE, SIZE, 3)
    calls, handle = record_forwards(models.transformer)
    try:
        video = sample(models, video_plan(), random_inputs(1, references=2), contexts.cond, contexts.neg,
                       SamplingOptions(steps=1))
    finally:
        handle.remove()
    assert calls[0]["hidden_states"].shape[2] == 2 + 2  # two reference latents + (5 - 1) / 4 + 1 video latents
    assert video.frames.shape == (FRAMES, SIZE, SIZE, 3)


def test_vace_inputs_reach_the_transformer(models, contexts):
    """Control latents: VAE(source*(1-mask)), VAE(source*mask), the 8x8-unshuffled mask, references first."""
    plan = video_plan()
    mask = torch.zeros(FRAMES, SIZE, SIZE)
    mask[:, :, : SIZE // 2] = 1.0  # regenerate the left half
    frames = torch.rand(FRAMES, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(2))
    reference = torch.ones(1, SIZE, SIZE, 3)
    reference[0, 8:24, 8:24] = torch.tensor([0.2, 0.4, 0.6])
    inputs = VaceInputs(frames=frames, masks=mask, references=reference)
    calls, handle = record_forwards(models.transformer)
    try:
        sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=1))
    finally:
        handle.remove()
    control = calls[0]["control_hidden_states"][:1]
    assert control.shape == (1, TINY_VACE.vace_in_channels, 1 + 2, SIZE // 8, SIZE // 8)

    # Independent computation of the latents with the VAE itself.
    vae = models.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, Z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, Z, 1, 1, 1)

    def encode(video):  # [1, 3, T, H, W] in [-1, 1]
        with torch.no_grad():
            return (vae.encode(video).latent_dist.mode() - mean) / std

    video = (frames * 2 - 1).permute(3, 0, 1, 2)[None]
    m = mask[None, None]
    torch.testing.assert_close(control[:, :Z, 1:], encode(video * (1 - m)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(control[:, Z : 2 * Z, 1:], encode(video * m), atol=1e-5, rtol=1e-5)
    ref_latent = encode((reference[0] * 2 - 1).permute(2, 0, 1)[None, :, None])
    torch.testing.assert_close(control[:, :Z, :1], ref_latent, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(control[:, Z : 2 * Z, :1]) == 0  # a reference has no "reactive" half

    mask_channels = control[0, 2 * Z :]  # [64, 3, 4, 4]
    assert torch.count_nonzero(mask_channels[:, 0]) == 0  # the reference frame is kept (mask 0)
    assert torch.all(mask_channels[:, 1:, :, :2] == 1) and torch.count_nonzero(mask_channels[:, 1:, :, 2:]) == 0


def test_grey_source_becomes_zero_in_minus_one_to_one(models, contexts):
    plan = video_plan()
    inputs = prepare_vace_inputs(plan, [])
    assert torch.all(inputs.frames == 0.5) and torch.all(inputs.masks == 1)
    seen: list[torch.Tensor] = []
    original = models.vae.encode

    def spy(x, *args, **kwargs):
        seen.append(x.detach().clone())
        return original(x, *args, **kwargs)

    models.vae.encode = spy
    try:
        sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=1))
    finally:
        del models.vae.encode
    assert len(seen) == 2  # inactive and reactive halves, no references
    assert all(t.shape == (1, 3, FRAMES, SIZE, SIZE) and torch.count_nonzero(t) == 0 for t in seen)


def test_inputs_that_do_not_match_the_plan_are_refused(models, contexts):
    plan = video_plan(9)
    with pytest.raises(MediaError, match=r"plan needs \[9, 32, 32, 3\]"):
        sample(models, plan, random_inputs(0), contexts.cond, contexts.neg, SamplingOptions(steps=1))
    understanding = default_plan("text_understanding")
    with pytest.raises(UnisonError, match="understanding task"):
        sample(models, understanding, random_inputs(0), contexts.cond, contexts.neg)
    with pytest.raises(UnisonError, match="text_dim is 32"):
        sample(models, video_plan(), random_inputs(0), torch.zeros(1, 2048, 16), contexts.neg,
               SamplingOptions(steps=1))


@pytest.mark.parametrize("bad", [{"steps": 0}, {"shift": 0.0}, {"seed": -1}, {"guidance": -1.0}, {"fps": 0}])
def test_sampling_options_are_validated(bad):
    with pytest.raises(UnisonError, match=next(iter(bad))):
        SamplingOptions(**bad)


def test_fps_follows_the_plan_unless_overridden(models, contexts):
    plan = default_plan("text_to_video", width=SIZE, height=SIZE, num_frames=FRAMES, fps=16)
    inputs = prepare_vace_inputs(plan, [])
    assert sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=1)).fps == 16
    assert sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=1, fps=30)).fps == 30
