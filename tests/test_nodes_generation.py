"""Loaders, Projector, VACE Inputs and VACE Sampler nodes on tiny models in the real file formats."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from harness.comfy_env import InterruptProcessingException
from harness.fixtures import (  # noqa: F401 - fixtures
    DIFFUSERS_NAME,
    PROJECTOR_NAME,
    TEXT_ENCODER_NAME,
    TRANSFORMER_NAME,
    VAE_NAME,
    comfy,
    install_models,
    tiny_models,
)

from nodes import comfy_bridge
from nodes.generation import UnisonProjector, UnisonVaceInputs, UnisonVaceSampler
from nodes.loaders import UnisonProjectorLoader, UnisonVaceDiffusersLoader, UnisonVaceLoader
from nodes.planning import UnisonPlanner, UnisonTaskRouter
from unison_runtime.errors import PlanError, WeightsError
from unison_runtime.plan import Task
from unison_runtime.projector import load_projector, project
from unison_runtime.vace.sources import prepare_vace_inputs


@pytest.fixture
def models(comfy, tiny_models):  # noqa: F811
    install_models(comfy, tiny_models)
    return comfy


def plan_for(instruction: str, width: int = 32, height: int = 32, frames: int = 0, **media):
    packet = UnisonPlanner().run(instruction, **media)["result"][0]
    routed = UnisonTaskRouter().route(packet, "auto", width, height, frames, "auto", 0)["result"]
    return routed[0]


def load_vace():
    return UnisonVaceLoader().load(TRANSFORMER_NAME, VAE_NAME, TEXT_ENCODER_NAME, "auto", "auto")[0]


def sample(vace, packet, tokens=None, seed=0, steps=2, guidance=1.0):
    node = UnisonVaceSampler()
    out = node.sample(vace, packet, seed, steps, guidance, 5.0, "blurry", tokens=tokens)
    frames, fps = out["result"]
    return frames, fps, out["ui"]["text"][0]


# --------------------------------------------------------------------------- loaders


def test_vace_loader_loads_comfy_files_and_registers_with_model_management(models) -> None:
    vace = load_vace()
    config = vace.models.transformer.config
    assert config.text_dim == 32 and vace.models.device == "cpu"
    assert vace.label == TRANSFORMER_NAME
    holders = [p.model for p in vace.patchers]
    # One handle per part, so ComfyUI holds each only while it is used (umT5 to encode, the others to sample).
    assert [sorted(dict(h.named_children())) for h in holders] == [["transformer"], ["vae"], ["text_encoder"]]
    assert load_vace() is vace  # same choices: reused while alive
    assert UnisonVaceLoader.IS_CHANGED(transformer=TRANSFORMER_NAME, vae=VAE_NAME, text_encoder=TEXT_ENCODER_NAME) \
        == UnisonVaceLoader.IS_CHANGED(transformer=TRANSFORMER_NAME, vae=VAE_NAME, text_encoder=TEXT_ENCODER_NAME)


def test_vace_loader_lists_files_and_reports_missing_ones(models) -> None:
    spec = UnisonVaceLoader.INPUT_TYPES()["required"]
    assert spec["transformer"][0] == [TRANSFORMER_NAME]
    assert spec["vae"][0] == [VAE_NAME] and spec["text_encoder"][0] == [TEXT_ENCODER_NAME]
    with pytest.raises(WeightsError, match=r"'gone\.safetensors' is not in ComfyUI's models/vae"):
        UnisonVaceLoader().load(TRANSFORMER_NAME, "gone.safetensors", TEXT_ENCODER_NAME, "auto", "auto")
    with pytest.raises(WeightsError, match="no VACE transformer file found in ComfyUI's models/diffusion_models"):
        UnisonVaceLoader().load("(no model files in models/diffusion_models)", VAE_NAME, TEXT_ENCODER_NAME, "auto",
                                "auto")
    with pytest.raises(WeightsError):
        UnisonVaceLoader().load("../../../etc/passwd", VAE_NAME, TEXT_ENCODER_NAME, "auto", "auto")


def test_vace_diffusers_loader(models) -> None:
    choice = f"unison/{DIFFUSERS_NAME}"
    assert UnisonVaceDiffusersLoader.INPUT_TYPES()["required"]["folder"][0] == [choice]
    vace = UnisonVaceDiffusersLoader().load(choice, "fp32", "cpu")[0]
    assert vace.models.transformer.config.text_dim == 32 and vace.models.text_device == "cpu"


def test_projector_loader_and_tokens(models, tiny_models) -> None:  # noqa: F811
    projector = UnisonProjectorLoader().load(PROJECTOR_NAME, "auto")[0]
    assert UnisonProjectorLoader().load(PROJECTOR_NAME, "auto")[0] is projector
    hidden = torch.randn(1, 9, 64)
    out = UnisonProjector().project(projector, hidden, 0)
    tokens, positive, negative = out["result"]
    expected = project(load_projector(tiny_models.projector), hidden)
    torch.testing.assert_close(tokens, expected)
    assert tokens.shape == (1, 4, 32)
    assert comfy_bridge.is_blocked(positive) and "positive input" in positive.message
    assert comfy_bridge.is_blocked(negative)


def test_projector_appends_tokens_to_native_conditioning(models) -> None:
    projector = UnisonProjectorLoader().load(PROJECTOR_NAME, "auto")[0]
    hidden = torch.randn(1, 5, 64)
    text = torch.randn(1, 7, 32)
    neg_text = torch.randn(1, 6, 32)
    extras = {"pooled_output": None}
    tokens, positive, negative = UnisonProjector().project(
        projector, hidden, 16, positive=[[text, extras]], negative=[[neg_text, extras]])["result"]
    (pos_tensor, pos_extras), (neg_tensor, _) = positive[0], negative[0]
    assert pos_tensor.shape == (1, 16, 32) and neg_tensor.shape == (1, 16, 32)
    torch.testing.assert_close(pos_tensor[:, :7], text)
    torch.testing.assert_close(pos_tensor[:, 7:11], tokens)
    assert pos_tensor[:, 11:].abs().sum() == 0
    torch.testing.assert_close(neg_tensor[:, :6], neg_text)
    assert neg_tensor[:, 6:].abs().sum() == 0  # the negative branch gets no tokens, only padding
    assert pos_extras == extras and pos_extras is not extras


def test_projector_without_hidden_states_only_pads(models) -> None:
    projector = UnisonProjectorLoader().load(PROJECTOR_NAME, "auto")[0]
    text = torch.randn(1, 7, 32)
    out = UnisonProjector().project(projector, None, 12, positive=[[text, {}]])
    tokens, positive, _ = out["result"]
    assert tokens is None and positive[0][0].shape == (1, 12, 32)
    assert "rule planner" in out["ui"]["text"][0]


# --------------------------------------------------------------------------- VACE inputs


def test_vace_inputs_follow_the_task_recipe(models) -> None:
    image = torch.rand(1, 32, 32, 3)
    packet = plan_for("Turn ###image1### into a video of 8 frames, ending on this frame.", frames=0, image1=image)
    assert packet.plan.task is Task.IMAGE_TO_VIDEO and packet.plan.num_frames == 9
    control_video, control_masks, reference, *_size = UnisonVaceInputs().prepare(packet)["result"]
    assert control_video.shape == (9, 32, 32, 3) and control_masks.shape == (9, 32, 32) and reference is None
    assert control_masks[-1].sum() == 0 and control_masks[:-1].min() == 1  # the image is the last frame, kept
    assert (control_video[:-1] == 0.5).all()
    expected = prepare_vace_inputs(packet.plan, packet.ordered_media())
    torch.testing.assert_close(control_video, expected.frames)


def test_vace_inputs_reference_image(models) -> None:
    packet = plan_for("Generate a photo of the person in ###image1### as reference, in a cafe.",
                      image1=torch.rand(1, 16, 32, 3))
    assert packet.plan.task is Task.IMAGE_REFERENCE
    _, masks, reference, *_size = UnisonVaceInputs().prepare(packet)["result"]
    assert reference.shape == (1, 32, 32, 3) and masks.min() == 1
    assert (reference[0, 0] == 1).all()  # aspect kept on a white canvas: the top row is white padding


def test_vace_inputs_and_sampler_use_the_size_a_source_sets(models) -> None:
    # A portrait 32x48 control clip of 9 frames: as in Unison the output keeps its aspect ratio (it
    # has 2x3 patches, fewer than the plan's area: not upscaled) and its length.
    clip = torch.rand(9, 48, 32, 3)
    packet = plan_for("Generate a video of a dancer following the pose in ###video1###.", width=0, height=0,
                      video1=clip)
    assert packet.plan.task is Task.VIDEO_CONTROLLABLE and not packet.plan.fixed_size
    control_video, masks, _, width, height, length = UnisonVaceInputs().prepare(packet)["result"]
    assert (width, height, length) == (32, 48, 9)
    assert control_video.shape == (9, 48, 32, 3) and masks.shape == (9, 48, 32)
    frames, _, shown = sample(load_vace(), packet)
    assert frames.shape == (9, 48, 32, 3) and shown.startswith("9 frame(s) 32x48")


def test_vace_inputs_refuse_a_question(models) -> None:
    packet = UnisonPlanner().run("What is the capital of France?")["result"][0]
    with pytest.raises(PlanError, match="answered by stage one"):
        UnisonVaceInputs().prepare(packet)


# --------------------------------------------------------------------------- sampler


def test_sampler_generates_an_image_with_progress(models) -> None:
    vace = load_vace()
    packet = plan_for("A watercolor painting of a harbor.")
    frames, fps, shown = sample(vace, packet, guidance=5.0)  # with guidance: the negative branch runs too
    assert frames.shape == (1, 32, 32, 3) and frames.dtype == torch.float32
    assert frames.min() >= 0 and frames.max() <= 1 and frames.std() > 0
    assert fps == 24.0 and shown.startswith("1 frame(s) 32x32")
    assert models.progress == [(1, 2), (2, 2)]  # one tick per step
    # Placed by ComfyUI's model manager in two stages: umT5 to encode, then the transformer and VAE to sample.
    assert models.loads[-2:] == [[vace.text_patcher], [vace.transformer_patcher, vace.vae_patcher]]
    assert models.memory_required[-2] > 0 and models.memory_required[-1] > 0  # a reserve for the work, each stage


def test_sampler_is_deterministic_per_seed(models) -> None:
    vace = load_vace()
    packet = plan_for("A watercolor painting of a harbor.", width=16, height=16)
    first, *_ = sample(vace, packet, seed=3, steps=1)
    again, *_ = sample(vace, packet, seed=3, steps=1)
    other, *_ = sample(vace, packet, seed=4, steps=1)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)


def test_sampler_appends_projector_tokens_to_the_conditional_context(models, monkeypatch) -> None:
    from unison_runtime.vace import sampler, text

    seen = []
    real_sample = sampler.sample
    monkeypatch.setattr(sampler, "sample", lambda *a, **k: seen.append(a) or real_sample(*a, **k))
    vace = load_vace()
    packet = plan_for("A watercolor painting of a harbor.", width=16, height=16)
    projector = UnisonProjectorLoader().load(PROJECTOR_NAME, "auto")[0]
    tokens = UnisonProjector().project(projector, torch.randn(1, 6, 64), 0)["result"][0]
    plain, *_ = sample(vace, packet, seed=3, steps=1)
    with_tokens, *_ = sample(vace, packet, tokens=tokens, seed=3, steps=1)
    assert not torch.equal(plain, with_tokens)  # the tiny random model reacts weakly, but it does react
    (_, _, _, cond_plain, _), (_, _, _, cond, neg) = seen[0][:5], seen[1][:5]
    prompt = text.encode_text(vace.models, packet.plan.prompt)
    length = prompt.shape[1]
    assert cond.shape == neg.shape == (1, text.CONTEXT_LENGTH, 32)
    torch.testing.assert_close(cond[:, :length], prompt)
    torch.testing.assert_close(cond[:, length:length + 4], tokens)
    assert cond[:, length + 4:].abs().sum() == 0 and cond_plain[:, length:].abs().sum() == 0


def test_sampler_generates_a_video(models) -> None:
    packet = plan_for("A video of waves rolling onto a beach.", frames=5)
    frames, fps, _ = sample(load_vace(), packet, steps=1)
    assert frames.shape == (5, 32, 32, 3) and fps == 24.0


def test_interrupt_stops_sampling_and_models_stay_usable(models) -> None:
    vace = load_vace()
    packet = plan_for("A watercolor painting of a harbor.")
    models.interrupt_after_checks = 3  # checks: before sampling, before step 1, before step 2 (fires)
    with pytest.raises(InterruptProcessingException):
        sample(vace, packet, steps=3)
    assert models.progress == [(1, 3)]
    models.progress.clear()
    frames, *_ = sample(vace, packet, steps=2)
    assert frames.shape == (1, 32, 32, 3) and models.progress == [(1, 2), (2, 2)]


def test_out_of_memory_names_the_setting_to_lower(models, monkeypatch) -> None:
    from unison_runtime.errors import OutOfMemory
    from unison_runtime.vace import sampler

    real_sample = sampler.sample
    calls = {"n": 0}

    def oom_on_second_call(*args, **kwargs):  # the first run fails, the next one on the same models works
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sampler, "sample", oom_on_second_call)
    vace = load_vace()
    packet = plan_for("A watercolor painting of a harbor.")
    with pytest.raises(OutOfMemory) as info:
        sample(vace, packet)
    message = str(info.value)
    assert "width x height is" in message and "on the Unison Task Router" in message
    assert "Tried to allocate 20.00 GiB" in message
    frames, *_ = sample(vace, packet, steps=1)
    assert frames.shape[0] == 1


def test_out_of_memory_while_sampling_says_where_the_settings_are(models, monkeypatch) -> None:
    from unison_runtime.errors import OutOfMemory

    vace = load_vace()
    transformer = vace.models.transformer

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(transformer, "forward", fail)
    with pytest.raises(OutOfMemory) as info:
        sample(vace, plan_for("A watercolor painting of a harbor."), steps=1)
    assert info.value.stage.startswith("sampling, step 1")
    assert str(info.value).endswith("the text encoder device on the Unison VACE Loader)")
    monkeypatch.undo()
    frames, *_ = sample(vace, plan_for("A watercolor painting of a harbor."), steps=1)
    assert frames.shape[0] == 1


def test_sampler_refuses_understanding_plans(models) -> None:
    packet = UnisonPlanner().run("What is the capital of France?")["result"][0]
    with pytest.raises(PlanError, match="nothing to generate"):
        sample(None, packet)


def test_sampler_asks_for_models_only_when_its_plan_is_open() -> None:
    node = UnisonVaceSampler()
    assert node.check_lazy_status(plan="p", vace=None, tokens=None) == ["vace", "tokens"]
    assert node.check_lazy_status(plan="p", vace=None) == ["vace"]  # tokens not connected
    assert node.check_lazy_status(plan="p", vace="models", tokens="t") == []


def test_deleted_projector_is_reported_not_served_from_cache(models, tiny_models) -> None:  # noqa: F811
    import shutil

    path = models.models / "unison" / PROJECTOR_NAME
    path.unlink()
    shutil.copy(tiny_models.projector, path)
    held = UnisonProjectorLoader().load(PROJECTOR_NAME, "auto")[0]
    signature = UnisonProjectorLoader.IS_CHANGED(projector=PROJECTOR_NAME)
    path.unlink()
    assert UnisonProjectorLoader.IS_CHANGED(projector=PROJECTOR_NAME) != signature  # ComfyUI re-runs the loader
    with pytest.raises(WeightsError, match=r"'projector\.pth' is not in ComfyUI's models/unison"):
        UnisonProjectorLoader().load(PROJECTOR_NAME, "auto")
    assert held is not None


def test_sampler_refuses_a_plan_that_will_not_fit_before_any_model_moves(models, monkeypatch) -> None:
    """The preflight raises a node error (the estimate, what is free, what to change) instead of sampling."""
    from unison_runtime import memory_estimate
    from unison_runtime.memory_estimate import MemoryWontFit

    vace = load_vace()
    packet = plan_for("A watercolor painting of a harbor.")
    loads_before = len(models.loads)
    monkeypatch.setattr(memory_estimate, "free_memory", lambda device: 1024**2)  # 1 MiB free
    with pytest.raises(MemoryWontFit) as caught:
        sample(vace, packet)
    message = str(caught.value)
    assert "32x32, 1 frame" in message and "is free" in message and "\n" not in message.strip()
    assert len(models.loads) == loads_before  # refused before ComfyUI was asked to load anything


def test_sampler_switches_tiling_on_when_only_the_decode_does_not_fit(models, monkeypatch) -> None:
    from unison_runtime import memory_estimate

    vace = load_vace()
    packet = plan_for("A watercolor painting of a harbor.", width=512, height=512)
    plan, footprint = packet.plan, memory_estimate.footprint_from_models(vace.models)
    settings = memory_estimate.RunSettings(device="cpu", text_device="cpu", batch_cfg=True, guidance=1.0)
    whole = memory_estimate.estimate_run(plan, footprint, settings, runtime=False).peak
    tiled = memory_estimate.estimate_run(plan, footprint, dataclasses.replace(settings, vae_tiling=True),
                                         runtime=False).peak
    assert tiled < whole
    free = int((tiled + whole) / 2 / 0.9)  # room for the tiled decode only (check_fits counts 90 % of free)
    monkeypatch.setattr(memory_estimate, "free_memory", lambda device: free)
    frames, _, shown = sample(vace, packet, steps=1)
    assert frames.shape == (1, 512, 512, 3) and "VAE tiling switched on" in shown


def test_sampling_on_the_cpu_returns_freed_blocks_to_the_os_once(models, monkeypatch) -> None:
    from nodes import generation
    from unison_runtime import heap

    calls: list[int] = []
    monkeypatch.setattr(heap, "unmap_large_blocks", lambda threshold=heap.MMAP_THRESHOLD: calls.append(threshold)
                        or True)
    generation._settle_cpu_heap.cache_clear()
    try:
        vace = load_vace()
        packet = plan_for("Create an image of a red fox in the snow.")
        sample(vace, packet, steps=1)
        sample(vace, packet, steps=1)
    finally:
        generation._settle_cpu_heap.cache_clear()
    assert calls == [heap.MMAP_THRESHOLD]  # once per server, at the CLI's threshold


def test_sampling_on_the_cpu_gives_back_the_pages_of_umt5_and_the_transformer(models) -> None:
    """ComfyUI keeps the models for the next prompt, and on the CPU its offload moves nothing: the stored weights'
    pages are given back instead (umT5's after encoding, the transformer's before decoding), the models stay usable."""
    from unison_runtime import mapped_pages

    vace = load_vace()
    umt5 = mapped_pages.tensors_of(vace.models.text_encoder)
    transformer = mapped_pages.tensors_of(vace.models.transformer)
    assert mapped_pages.mapped_bytes(umt5) > 0 and mapped_pages.mapped_bytes(transformer) > 0
    packet = plan_for("A watercolor painting of a harbor.", width=16, height=16)
    first, *_ = sample(vace, packet, seed=3, steps=1, guidance=5.0)
    assert mapped_pages.resident_mapped_bytes(umt5) == 0 and mapped_pages.resident_mapped_bytes(transformer) == 0
    again, *_ = sample(vace, packet, seed=3, steps=1, guidance=5.0)  # read back from the files
    assert torch.equal(first, again)
    assert load_vace() is vace  # still the loaded copy: nothing was unloaded


def test_cpu_preflight_does_not_count_models_comfyui_holds_as_free(models, monkeypatch) -> None:
    """On the CPU offloading frees nothing, so what ComfyUI could offload does not make a plan fit."""
    from unison_runtime import memory_estimate
    from unison_runtime.memory_estimate import MemoryWontFit

    vace = load_vace()
    packet = plan_for("A watercolor painting of a harbor.")
    monkeypatch.setattr(memory_estimate, "free_memory", lambda device: 1024**2)  # 1 MiB free
    monkeypatch.setattr(comfy_bridge, "evictable_bytes", lambda device: 1024**4)  # "1 TiB offloadable"
    with pytest.raises(MemoryWontFit):
        sample(vace, packet)
