"""Shared test fixtures. Tiny random models are built by ``unison_runtime.testing`` builders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory):
    """One tiny Qwen2.5-VL set (base, planning LoRA, merged planners) for every stage-one test module.

    Built once per session; tests only read it (those that alter a model copy it first).
    """
    from unison_runtime.testing.tiny_qwen import build_tiny_qwen_set

    return build_tiny_qwen_set(tmp_path_factory.mktemp("qwen"))


#: Where ``vace_models_dir`` puts its VACE folder (a diffusers layout under ``diffusion_models/``).
VACE_FOLDER = "diffusion_models/Wan2.1-VACE-1.3B-diffusers"


@pytest.fixture(scope="session")
def vace_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``--models`` folder with a tiny random Wan2.1-VACE (diffusers layout) and an empty ``unison/``
    (no stage one: the rule planner plans). Shared by the CLI test modules; they only read it."""
    from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers

    root = tmp_path_factory.mktemp("models")
    build_tiny_vace_diffusers(root / VACE_FOLDER)
    (root / "unison").mkdir()
    return root
