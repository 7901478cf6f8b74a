"""Attention backend choice: flash-attn where installed and it fits (CUDA, half precision), else SDPA."""

from __future__ import annotations

import pytest
import torch

from unison_runtime import attention
from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers
from unison_runtime.vace.loading import load_vace_diffusers


@pytest.mark.parametrize(
    ("installed", "device", "dtype", "expected"),
    [
        (True, "cuda", torch.bfloat16, "flash"),
        (True, "cuda:1", torch.float16, "flash"),
        (True, "cuda", torch.float32, "native"),  # flash-attn has no fp32 kernels
        (True, "cpu", torch.bfloat16, "native"),
        (False, "cuda", torch.bfloat16, "native"),
    ],
)
def test_vace_backend_choice(monkeypatch, installed, device, dtype, expected):
    monkeypatch.setattr(attention, "flash_attention_available", lambda: installed)
    assert attention.vace_attention_backend(device, dtype) == expected


def test_flash_availability_is_the_package_being_importable():
    import importlib.util

    assert attention.flash_attention_available() == (importlib.util.find_spec("flash_attn") is not None)


def test_vace_loader_sets_the_chosen_backend_on_the_transformer(monkeypatch, tmp_path):
    from diffusers import WanVACETransformer3DModel

    folder = build_tiny_vace_diffusers(tmp_path / "vace")
    default = load_vace_diffusers(folder, device="cpu")
    assert default.attention == "native"  # no CUDA here: diffusers' SDPA, nothing set

    chosen: list[str] = []
    monkeypatch.setattr(attention, "vace_attention_backend", lambda device, dtype: "flash")
    monkeypatch.setattr(WanVACETransformer3DModel, "set_attention_backend", lambda self, name: chosen.append(name))
    models = load_vace_diffusers(folder, device="cpu")
    assert models.attention == "flash" and chosen == ["flash"]


def test_single_file_loader_sets_the_chosen_backend_too(monkeypatch, tmp_path):
    from diffusers import WanVACETransformer3DModel

    from unison_runtime.testing.tiny_wan_files import build_tiny_comfy_models_dir
    from unison_runtime.vace.files import load_vace_from_files

    paths = build_tiny_comfy_models_dir(tmp_path / "models")
    seen: list[tuple[str, torch.dtype]] = []
    chosen: list[str] = []

    def choose(device, dtype):
        seen.append((str(device), dtype))
        return "flash"

    monkeypatch.setattr(attention, "vace_attention_backend", choose)
    monkeypatch.setattr(WanVACETransformer3DModel, "set_attention_backend", lambda self, name: chosen.append(name))
    models = load_vace_from_files(paths["transformer"], paths["vae"], paths["text_encoder"], device="cpu",
                                  dtype="bf16")
    assert models.attention == "flash" and chosen == ["flash"]
    assert seen == [("cpu", torch.bfloat16)]  # asked with the transformer's device and compute dtype
