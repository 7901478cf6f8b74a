"""Live previews in the Unison VACE Sampler: one picture per step through ComfyUI's progress bar.

ComfyUI's ``latent_preview`` and ``comfy.latent_formats`` are replaced here by doubles with the
same names and signatures (``get_previewer(device, latent_format)``, ``decode_latent_to_preview_image
(format, x0)``); the real ones, with the real ``--preview-method`` and Wan 2.1 factors, are exercised
by ``tests/harness/live_comfyui.py`` against a running ComfyUI.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch
from harness.fixtures import TEXT_ENCODER_NAME, TRANSFORMER_NAME, VAE_NAME, comfy, install_models, tiny_models  # noqa: F401
from PIL import Image

from nodes.generation import UnisonVaceSampler
from nodes.loaders import UnisonVaceLoader
from nodes.planning import UnisonPlanner, UnisonTaskRouter


class FakeWan21:
    latent_channels = 16


class RecordingPreviewer:
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def decode_latent_to_preview_image(self, preview_format: str, x0: torch.Tensor) -> tuple[str, Any, int]:
        self.seen.append(x0.clone())
        return (preview_format, Image.new("RGB", (x0.shape[-1], x0.shape[-2])), 512)


@pytest.fixture
def preview_method(monkeypatch, comfy, tiny_models):  # noqa: F811
    """Installs the doubles; ``state["method"]`` plays ``--preview-method`` (``"none"``: no previewer)."""
    install_models(comfy, tiny_models)
    state: dict[str, Any] = {"method": "latent2rgb", "previewer": RecordingPreviewer(), "formats": []}

    def get_previewer(device: Any, latent_format: Any) -> RecordingPreviewer | None:
        state["formats"].append(type(latent_format).__name__)
        return None if state["method"] == "none" else state["previewer"]

    latent_preview = types.ModuleType("latent_preview")
    latent_preview.get_previewer = get_previewer
    formats = types.ModuleType("comfy.latent_formats")
    formats.Wan21 = FakeWan21
    monkeypatch.setitem(sys.modules, "latent_preview", latent_preview)
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", formats)
    sys.modules["comfy.model_management"].get_torch_device = lambda: torch.device("cpu")
    return state


def run(instruction: str, steps: int, frames: str = "auto", **media: Any) -> torch.Tensor:
    packet = UnisonPlanner().run(instruction, **media)["result"][0]
    plan = UnisonTaskRouter().route(packet, "auto", 32, 32, frames, "auto", 0)["result"][0]
    vace = UnisonVaceLoader().load(TRANSFORMER_NAME, VAE_NAME, TEXT_ENCODER_NAME, "auto", "auto")[0]
    return UnisonVaceSampler().sample(vace, plan, 0, steps, 1.0, 5.0, "blurry")["result"][0]


def test_a_preview_arrives_with_every_step(preview_method, comfy) -> None:  # noqa: F811
    run("A watercolor painting of a harbor.", steps=3)
    assert preview_method["formats"] == ["FakeWan21"]  # asked for Wan 2.1's latent format
    assert [step for step, _ in comfy.previews] == [1, 2, 3] and comfy.progress == [(1, 3), (2, 3), (3, 3)]
    fmt, image, size = comfy.previews[0][1]
    assert fmt == "JPEG" and isinstance(image, Image.Image) and size == 512
    seen = preview_method["previewer"].seen
    assert len(seen) == 3 and all(x.shape == (1, 16, 1, 4, 4) and x.dtype == torch.float32 for x in seen)
    assert not torch.equal(seen[0], seen[-1])  # the estimate changes as the noise goes


def test_previews_skip_the_reference_frame_and_show_the_first_generated_frame(preview_method, comfy) -> None:  # noqa: F811
    from unison_runtime.vace import sampler

    full = []
    real = sampler.denoise

    def spy(*args: Any, on_step: Any = None, **kwargs: Any) -> torch.Tensor:
        def record(step: int, total: int, x0: torch.Tensor) -> None:
            full.append(x0.clone())
            on_step(step, total, x0)
        return real(*args, on_step=record, **kwargs)

    sampler.denoise, saved = spy, sampler.denoise
    try:
        image = torch.rand(1, 32, 32, 3)
        run("A 1 second video of the person in ###image1### as reference, waving.", steps=2, frames="5",
            image1=image)
    finally:
        sampler.denoise = saved
    assert full[0].shape[2] == 3  # one reference latent frame + two video latent frames
    for whole, shown in zip(full, preview_method["previewer"].seen, strict=True):
        torch.testing.assert_close(shown, whole[:, :, 1:2].float())


def test_previews_off_cost_nothing_and_change_nothing(preview_method, comfy, monkeypatch) -> None:  # noqa: F811
    from unison_runtime.vace import sampler

    with_previews = run("A watercolor painting of a harbor.", steps=2)
    preview_method["method"] = "none"
    comfy.previews.clear()
    hooks = []
    real = sampler.denoise
    monkeypatch.setattr(sampler, "denoise", lambda *a, **k: hooks.append(k.get("on_step")) or real(*a, **k))
    without = run("A watercolor painting of a harbor.", steps=2)
    assert hooks == [None] and comfy.previews == []  # no hook: no x0 estimate is computed
    torch.testing.assert_close(with_previews, without)  # previews do not change the result


def test_outside_comfyui_there_is_no_previewer(monkeypatch) -> None:
    from nodes import previews

    monkeypatch.setitem(sys.modules, "latent_preview", None)  # import fails as without ComfyUI
    assert previews.previewer(0) is None
