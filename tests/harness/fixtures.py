"""pytest fixtures for node and workflow tests (import them into a test module to use them).

Tiny models are built once per session in the real on-disk formats by ``unison_runtime.testing``
and linked into each test's own ComfyUI-like ``models/`` folders under the names the shipped
workflows use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import comfy_env
from .build_workflows import LORA as LORA_NAME
from .build_workflows import PROJECTOR as PROJECTOR_NAME
from .build_workflows import QWEN as QWEN_NAME
from .build_workflows import TEXT_ENCODER as TEXT_ENCODER_NAME
from .build_workflows import TRANSFORMER as TRANSFORMER_NAME
from .build_workflows import VAE as VAE_NAME
from .example_media import write_example_media  # noqa: F401 - re-exported for the tests

# The shipped workflows' loader choices (above) plus a diffusers folder for the diffusers loader.
DIFFUSERS_NAME = "Wan2.1-VACE-1.3B-diffusers"


@dataclass(frozen=True)
class TinyModels:
    qwen_base: Path
    lora: Path
    merged: Path  # LoRA merged, untied head: what script_tiny_planner rewrites
    projector: Path
    comfy_files: dict[str, Path]  # transformer / vae / text_encoder in Comfy-Org formats
    diffusers: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    from unison_runtime.testing.tiny_projector import build_tiny_projector
    from unison_runtime.testing.tiny_qwen import build_tiny_merged_planner, build_tiny_qwen, build_tiny_unison_lora
    from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers
    from unison_runtime.testing.tiny_wan_files import build_tiny_comfy_models_dir

    root = tmp_path_factory.mktemp("tiny-models")
    base = build_tiny_qwen(root / "qwen-base")
    lora = build_tiny_unison_lora(base, root / "unison-lora")
    merged = build_tiny_merged_planner(base, lora, root / "merged", fix_tie=True)
    # Qwen's tiny hidden size is 64; the tiny Wan text_dim is 32.
    projector = build_tiny_projector(root / "projector.pth", input_dim=64, t5_dim=32)
    comfy_files = build_tiny_comfy_models_dir(root / "comfy-models")
    diffusers = build_tiny_vace_diffusers(root / "vace-diffusers")
    return TinyModels(base, lora, merged, projector, comfy_files, diffusers)


def link(target: Path, source: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source, target, target_is_directory=source.is_dir())
    return target


@pytest.fixture
def comfy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> comfy_env.ComfyEnv:
    """An empty ComfyUI layout with the fake ComfyUI modules installed."""
    return comfy_env.install(monkeypatch, tmp_path / "ComfyUI")


def install_models(env: comfy_env.ComfyEnv, tiny: TinyModels, *, planner: Path | None = None) -> None:
    """Link the tiny models into ``env`` under the workflow names; ``planner`` replaces the Qwen base."""
    unison = env.model_dir("unison")
    link(unison / QWEN_NAME, planner or tiny.qwen_base)
    link(unison / LORA_NAME, tiny.lora)
    link(unison / PROJECTOR_NAME, tiny.projector)
    link(unison / DIFFUSERS_NAME, tiny.diffusers)
    link(env.models / "diffusion_models" / TRANSFORMER_NAME, tiny.comfy_files["transformer"])
    link(env.models / "vae" / VAE_NAME, tiny.comfy_files["vae"])
    link(env.models / "text_encoders" / TEXT_ENCODER_NAME, tiny.comfy_files["text_encoder"])
