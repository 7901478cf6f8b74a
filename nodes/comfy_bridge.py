"""Every touch point with ComfyUI, imported lazily and guarded.

The pack must import (and its tests must run) without ComfyUI, so nothing here imports
``comfy``, ``comfy_execution``, ``folder_paths`` or ``server`` at module level. Each helper imports
what it needs when called; when ComfyUI is absent (``ImportError``), it returns the documented
stand-in (no folder, no progress bar, the CPU) instead. Only ``ImportError`` is caught: a ComfyUI
module that is present but broken raises as usual.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

#: The ComfyUI model folder (``models/unison``) for the planner, its LoRA and the projector.
UNISON_FOLDER = "unison"
PROJECTOR_EXTENSIONS = (".pth", ".pt", ".safetensors")
MODEL_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".sft", ".gguf")


def _optional(module: str) -> ModuleType | None:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


def folder_paths() -> ModuleType | None:
    """ComfyUI's ``folder_paths`` module, or ``None`` outside ComfyUI."""
    return _optional("folder_paths")


def model_management() -> ModuleType | None:
    """``comfy.model_management``, or ``None`` outside ComfyUI."""
    return _optional("comfy.model_management")


# --------------------------------------------------------------------------- folders


def register_model_folder() -> None:
    """Register ``models/unison`` with ComfyUI (idempotent; folders from extra_model_paths.yaml are kept).

    A new folder name gets an empty extension set, so ComfyUI lists every file in it; the loaders
    filter by extension themselves and list model folders with :func:`model_directories`.
    """
    fp = folder_paths()
    if fp is None:
        return
    fp.add_model_folder_path(UNISON_FOLDER, os.path.join(fp.models_dir, UNISON_FOLDER))


def input_directory() -> Path | None:
    """ComfyUI's input folder: the only place ``###name###`` references may read from."""
    fp = folder_paths()
    return Path(fp.get_input_directory()) if fp is not None else None


def output_directory() -> Path | None:
    fp = folder_paths()
    return Path(fp.get_output_directory()) if fp is not None else None


def model_folders(name: str) -> list[Path]:
    """Every folder ComfyUI knows for the model kind ``name`` (``[]`` outside ComfyUI or when unknown)."""
    fp = folder_paths()
    if fp is None:
        return []
    try:
        return [Path(p) for p in fp.get_folder_paths(name)]
    except KeyError:
        return []


def model_files(name: str, extensions: Iterable[str] = MODEL_EXTENSIONS) -> list[str]:
    """Model files of kind ``name`` as ComfyUI lists them (relative names), filtered by extension."""
    fp = folder_paths()
    if fp is None:
        return []
    try:
        names = fp.get_filename_list(name)
    except KeyError:
        return []
    wanted = tuple(e.lower() for e in extensions)
    return sorted(n for n in names if n.lower().endswith(wanted))


def model_directories(name: str, marker_files: Iterable[str], max_depth: int = 2) -> list[str]:
    """Sub-folders (relative names, ``/``-separated) of the ``name`` folders holding one of ``marker_files``.

    ComfyUI's file lists only hold files, while a Hugging Face model or a peft adapter is a folder
    (``config.json`` / ``adapter_config.json``); this lists those folders for a combo box.
    """
    markers = tuple(marker_files)
    found: set[str] = set()
    for root in model_folders(name):
        if not root.is_dir():
            continue
        for current, dirs, files in os.walk(root, followlinks=True):
            rel = Path(current).relative_to(root)
            if len(rel.parts) >= max_depth:
                dirs[:] = []
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if rel.parts and any(m in files for m in markers):
                found.add(rel.as_posix())
    return sorted(found)


def resolve_model_path(name: str, relative: str) -> Path | None:
    """The full path of a file or folder chosen from the ``name`` folders, or ``None`` when absent.

    Like ComfyUI's ``get_full_path``, the name may not climb out of the folder (``..``, absolute
    paths), while symlinks the user placed inside a model folder are followed: linking big model
    files in is common and is the user's own doing.
    """
    if not relative or "\x00" in relative:
        return None
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    for root in model_folders(name):
        candidate = root / rel
        if candidate.exists():
            return candidate
    return None


# --------------------------------------------------------------------------- devices


def torch_device() -> Any:
    """ComfyUI's compute device (honours ``--cpu``/``--gpu-only``); outside ComfyUI, CUDA if present."""
    import torch

    mm = model_management()
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def text_encoder_device() -> Any:
    """Where ComfyUI runs text encoders (the CPU unless ``--gpu-only`` or a lot of VRAM)."""
    import torch

    mm = model_management()
    if mm is not None:
        return mm.text_encoder_device()
    return torch.device("cpu")


def offload_device() -> Any:
    """Where models wait while not in use (the CPU unless ComfyUI runs in high-VRAM mode)."""
    import torch

    mm = model_management()
    if mm is not None:
        return mm.unet_offload_device()
    return torch.device("cpu")


# --------------------------------------------------------------------------- model management


def manage_modules(label: str, modules: dict[str, Any], load_device: Any) -> Any | None:
    """Register torch modules with ComfyUI's model manager; returns a ModelPatcher, or ``None`` outside ComfyUI.

    ComfyUI then counts their memory, moves them to ``load_device`` when :func:`load_for_use`
    asks, offloads them when another model needs room, and moves them off the GPU when the user
    frees memory (``POST /free``, the "Unload models" button). The modules are held by a plain
    container module because ModelPatcher writes bookkeeping attributes (``device``, ...) on the
    model it manages, and diffusers models have a read-only ``device`` property.
    """
    mp = _optional("comfy.model_patcher")
    if mp is None:
        return None
    import torch

    holder = _holder_class()()
    holder.unison_label = label
    # ComfyUI compares devices with torch.device("cpu"); a plain "cpu" string would be taken for a GPU.
    load_device = torch.device(load_device)
    for key, module in modules.items():
        if module is not None:
            holder.add_module(key, module)
    return mp.ModelPatcher(holder, load_device=load_device, offload_device=offload_device())


@functools.cache
def _holder_class() -> type:
    import torch

    class UnisonModules(torch.nn.Module):
        """The container ComfyUI's model manager sees (its log says "Requested to load UnisonModules")."""

    return UnisonModules


def load_for_use(patchers: Iterable[Any | None]) -> None:
    """Ask ComfyUI to put these managed modules on their device, freeing room from other models first.

    ``force_full_load``: the modules are not ComfyUI ops, so a partial ("lowvram") load would leave
    some of them behind on the CPU; they must move whole.
    """
    managed = [p for p in patchers if p is not None]
    mm = model_management()
    if mm is None or not managed:
        return
    mm.load_models_gpu(managed, force_full_load=True)


def empty_cache() -> None:
    mm = model_management()
    if mm is not None:
        mm.soft_empty_cache()


def free_after_out_of_memory() -> None:
    """What ComfyUI does after its own nodes run out of memory: unload every model, empty the cache.

    Our error is a ``unison_runtime.errors.OutOfMemory`` (with the settings to lower), which
    ComfyUI does not recognise as its ``OOM_EXCEPTION``, so the node asks for this itself. The
    models are only offloaded: the next run loads them back (``load_for_use``).
    """
    mm = model_management()
    if mm is None:
        return
    unload = getattr(mm, "unload_all_models", None)
    if unload is not None:
        unload()
    mm.soft_empty_cache()


# --------------------------------------------------------------------------- execution


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op outside ComfyUI)."""
    mm = model_management()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def progress_bar(total: int) -> Any | None:
    """A ``comfy.utils.ProgressBar`` for the running node (create it inside the node function)."""
    utils = _optional("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else None


class Blocked:
    """Outside ComfyUI, what a blocked branch output holds (ComfyUI's ``ExecutionBlocker`` shape)."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"Blocked({self.message!r})"


def execution_blocker(message: str | None = None) -> Any:
    """ComfyUI's ``ExecutionBlocker``: consumers of this output do not run.

    ``message=None`` skips them silently (the prompt still succeeds); a message would be shown
    as an error for every blocked consumer, which is wrong for a branch that simply was not taken.
    """
    graph_utils = _optional("comfy_execution.graph_utils")
    if graph_utils is not None:
        return graph_utils.ExecutionBlocker(message)
    return Blocked(message)


def is_blocked(value: Any) -> bool:
    graph_utils = _optional("comfy_execution.graph_utils")
    if graph_utils is not None and isinstance(value, graph_utils.ExecutionBlocker):
        return True
    return isinstance(value, Blocked)
