"""Test doubles of the ComfyUI modules the pack touches, over a temporary ComfyUI folder layout.

:func:`install` puts ``folder_paths``, ``comfy``, ``comfy.model_management``, ``comfy.utils``,
``comfy.model_patcher`` and ``comfy_execution.graph_utils`` into ``sys.modules`` (with pytest's
``monkeypatch``, so they vanish after the test). Each double implements only the functions the
pack calls, with ComfyUI's names and signatures (checked against ComfyUI 0.3.64), and records
what was asked of it so tests can assert on it.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


@dataclass
class ComfyEnv:
    """A temp ComfyUI base folder and the recorders of the fake modules."""

    base: Path
    progress: list[tuple[int, int]] = field(default_factory=list)
    previews: list[tuple[int, Any]] = field(default_factory=list)  # (step, preview) sent with a progress tick
    loads: list[list[Any]] = field(default_factory=list)
    memory_required: list[int] = field(default_factory=list)  # what each load_models_gpu call reserved
    interrupt_after_checks: int | None = None  # raise the interrupt on the n-th check (1-based)
    interrupt_checks: int = 0
    folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = field(default_factory=dict)

    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def input(self) -> Path:
        return self.base / "input"

    @property
    def output(self) -> Path:
        return self.base / "output"

    def model_dir(self, folder: str) -> Path:
        path = Path(self.folder_names_and_paths[folder][0][0])
        path.mkdir(parents=True, exist_ok=True)
        return path


class InterruptProcessingException(Exception):
    """comfy.model_management.InterruptProcessingException."""


class ExecutionBlocker:
    """comfy_execution.graph_utils.ExecutionBlocker."""

    def __init__(self, message: str | None) -> None:
        self.message = message


class ModelPatcher:
    """comfy.model_patcher.ModelPatcher: records what it manages; load() moves the model like ComfyUI does."""

    def __init__(self, model: Any, load_device: Any, offload_device: Any, size: int = 0) -> None:
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        if not hasattr(model, "device"):
            model.device = offload_device


def _folder_paths(env: ComfyEnv) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    models = env.models
    fnp = env.folder_names_and_paths
    fnp.update({
        "checkpoints": ([str(models / "checkpoints")], SUPPORTED_PT_EXTENSIONS),
        "vae": ([str(models / "vae")], SUPPORTED_PT_EXTENSIONS),
        "text_encoders": ([str(models / "text_encoders"), str(models / "clip")], SUPPORTED_PT_EXTENSIONS),
        "diffusion_models": ([str(models / "unet"), str(models / "diffusion_models")], SUPPORTED_PT_EXTENSIONS),
        "diffusers": ([str(models / "diffusers")], {"folder"}),
        "loras": ([str(models / "loras")], SUPPORTED_PT_EXTENSIONS),
    })
    fp.folder_names_and_paths = fnp
    fp.models_dir = str(models)
    fp.supported_pt_extensions = SUPPORTED_PT_EXTENSIONS
    legacy = {"unet": "diffusion_models", "clip": "text_encoders"}

    def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
        folder_name = legacy.get(folder_name, folder_name)
        if folder_name in fnp:
            paths = fnp[folder_name][0]
            if full_folder_path not in paths:
                paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)
        else:
            fnp[folder_name] = ([full_folder_path], set())

    def get_folder_paths(folder_name: str) -> list[str]:
        return fnp[legacy.get(folder_name, folder_name)][0][:]

    def get_filename_list(folder_name: str) -> list[str]:
        paths, extensions = fnp[legacy.get(folder_name, folder_name)]
        found = set()
        for root in paths:
            if not os.path.isdir(root):
                continue
            for current, dirs, files in os.walk(root, followlinks=True):
                dirs[:] = [d for d in dirs if d != ".git"]
                for name in files:
                    rel = os.path.relpath(os.path.join(current, name), root)
                    if not extensions or os.path.splitext(name)[-1].lower() in extensions:
                        found.add(rel)
        return sorted(found)

    def get_full_path(folder_name: str, filename: str) -> str | None:
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for root in get_folder_paths(folder_name):
            path = os.path.join(root, filename)
            if os.path.isfile(path):
                return path
        return None

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_input_directory = lambda: str(env.input)
    fp.get_output_directory = lambda: str(env.output)
    fp.get_temp_directory = lambda: str(env.base / "temp")
    return fp


def _model_management(env: ComfyEnv) -> types.ModuleType:
    import torch

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.OOM_EXCEPTION = torch.OutOfMemoryError
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.text_encoder_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.text_encoder_offload_device = lambda: torch.device("cpu")
    mm.current_loaded_models = []
    mm.soft_empty_cache = lambda force=False: None

    def load_models_gpu(models: list[Any], memory_required: int = 0, force_patch_weights: bool = False,
                        minimum_memory_required: Any = None, force_full_load: bool = False) -> None:
        env.loads.append(list(models))
        env.memory_required.append(memory_required)
        for patcher in models:
            # ComfyUI compares load devices with torch.device("cpu") (model_management.py:657-663); a
            # string device makes it query CUDA memory statistics and crash under --cpu.
            if not isinstance(patcher.load_device, torch.device):
                raise TypeError(f"load_device must be a torch.device, got {patcher.load_device!r}")
            patcher.model.to(patcher.load_device)

    def throw_exception_if_processing_interrupted() -> None:
        env.interrupt_checks += 1
        if env.interrupt_after_checks is not None and env.interrupt_checks >= env.interrupt_after_checks:
            env.interrupt_after_checks = None
            raise InterruptProcessingException()

    mm.load_models_gpu = load_models_gpu
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return mm


def _utils(env: ComfyEnv) -> types.ModuleType:
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total: int, node_id: Any = None) -> None:
            self.total = total
            self.current = 0

        def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            env.progress.append((self.current, self.total))
            if preview is not None:
                env.previews.append((self.current, preview))

        def update(self, value: int) -> None:
            self.update_absolute(self.current + value)

    utils.ProgressBar = ProgressBar
    return utils


def install(monkeypatch: Any, base: Path) -> ComfyEnv:
    """Create the layout under ``base`` and install the fake ComfyUI modules for this test."""
    env = ComfyEnv(base=base)
    for sub in ("input", "output", "temp", "models"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package, so "comfy.x" imports resolve to the entries below
    mm, utils = _model_management(env), _utils(env)
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = ModelPatcher
    comfy.model_management, comfy.utils, comfy.model_patcher = mm, utils, patcher
    execution = types.ModuleType("comfy_execution")
    execution.__path__ = []
    graph_utils = types.ModuleType("comfy_execution.graph_utils")
    graph_utils.ExecutionBlocker = ExecutionBlocker
    execution.graph_utils = graph_utils
    modules = {
        "folder_paths": _folder_paths(env),
        "comfy": comfy,
        "comfy.model_management": mm,
        "comfy.utils": utils,
        "comfy.model_patcher": patcher,
        "comfy_execution": execution,
        "comfy_execution.graph_utils": graph_utils,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    import nodes as pack
    import nodes.comfy_bridge as bridge

    from .core_nodes import CORE_NODES

    # ComfyUI's node registry (its nodes.NODE_CLASS_MAPPINGS): the core doubles and this pack.
    monkeypatch.setattr(bridge, "node_class", {**CORE_NODES, **pack.NODE_CLASS_MAPPINGS}.get)
    bridge.register_model_folder()
    return env
