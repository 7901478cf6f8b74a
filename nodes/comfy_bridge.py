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
import sys
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


def text_encoder_offload_device() -> Any:
    """Where text encoders wait while not in use (the CPU unless ``--gpu-only``)."""
    import torch

    mm = model_management()
    if mm is not None:
        return mm.text_encoder_offload_device()
    return torch.device("cpu")


# --------------------------------------------------------------------------- model management


def true_size(module: Any) -> int:
    """Bytes of the distinct parameters and buffers of ``module``.

    ComfyUI's ``module_size`` sums the state dict, where a tensor tied to two names (umT5's shared
    input embedding, ``shared.weight`` = ``encoder.embed_tokens.weight``, 1.05 B values) counts
    twice; ``parameters()`` / ``buffers()`` yield each tensor once.
    """
    import itertools

    return sum(t.nelement() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


def share_tied_embedding(encoder: Any) -> Any:
    """umT5's tied input embedding as one module: ``encoder.embed_tokens`` becomes ``shared``.

    transformers' ``UMT5EncoderModel`` holds ``shared`` and ``encoder.embed_tokens`` as two Embedding
    modules over one weight. ComfyUI's ``ModelPatcher`` walks the modules and sums each one's size, so its
    "loaded completely ... MB" log line would count the 1.05 B-value embedding twice (8423 MB for the
    scaled-fp8 umT5). ``named_modules`` yields a module object once, so with one module the line is
    honest; the weight, the state dict and the computation are unchanged. ``encoder`` is returned.
    """
    shared = getattr(encoder, "shared", None)
    inner = getattr(getattr(encoder, "encoder", None), "embed_tokens", None)
    if shared is not None and inner is not None and inner is not shared and inner.weight is shared.weight:
        encoder.encoder.embed_tokens = shared
    return encoder


def manage_modules(label: str, modules: dict[str, Any], load_device: Any, offload: Any = None) -> Any | None:
    """Register torch modules with ComfyUI's model manager; returns a ModelPatcher, or ``None`` outside ComfyUI.

    The modules should sit on ``offload`` (default :func:`offload_device`): ComfyUI moves them to
    ``load_device`` when :func:`load_for_use` asks, offloads them when another model needs the room,
    and moves them off the GPU when the user frees memory ("Unload models", ``POST /free``). Their
    true size (:func:`true_size`) is registered, so ComfyUI's accounting matches what moves. They
    are held by a plain container module because ModelPatcher writes bookkeeping attributes
    (``device``, ...) on the model it manages, and diffusers models have a read-only ``device``.
    """
    mp = _optional("comfy.model_patcher")
    if mp is None:
        return None
    import torch

    holder = _holder_class()()
    holder.unison_label = label
    for key, module in modules.items():
        if module is not None:
            holder.add_module(key, module)
    # ComfyUI compares devices with torch.device("cpu"); a plain "cpu" string would be taken for a GPU.
    offload = torch.device(offload) if offload is not None else offload_device()
    holder.device = offload
    return mp.ModelPatcher(holder, load_device=torch.device(load_device), offload_device=offload,
                           size=true_size(holder))


@functools.cache
def _holder_class() -> type:
    import torch

    class UnisonModules(torch.nn.Module):
        """The container ComfyUI's model manager sees (its log says "Requested to load UnisonModules")."""

    return UnisonModules


def patcher_label(patcher: Any) -> str:
    return getattr(patcher.model, "unison_label", type(patcher.model).__name__)


def load_for_use(patchers: Iterable[Any | None], memory_required: int = 0) -> None:
    """Ask ComfyUI to put these managed modules on their device, keeping ``memory_required`` bytes free for
    the work that follows (activations, decoding); ComfyUI offloads other models to make the room.

    Only the models named here are asked for: any other model (umT5 once the prompts are encoded)
    stays evictable. ``force_full_load``: the modules are not ComfyUI ops, so they cannot stream
    their weights layer by layer and must move whole. Placement is then checked
    (:func:`ensure_placement`), because ComfyUI may still have loaded them only in part.
    """
    managed = [p for p in patchers if p is not None]
    mm = model_management()
    if mm is None or not managed:
        return
    mm.load_models_gpu(managed, memory_required=int(memory_required), force_full_load=True)
    ensure_placement(managed)


def stray_tensors(patcher: Any) -> list[tuple[str, Any]]:
    """(name, device) of the parameters and buffers of a managed model that are not on its load device."""
    import itertools

    import torch

    target = torch.device(patcher.load_device)

    def placed(device: Any) -> bool:  # "cuda" (no index) means the current device: any index matches
        return (device.type == target.type and None in (target.index, device.index)) or device == target

    named = itertools.chain(patcher.model.named_parameters(), patcher.model.named_buffers())
    return [(name, t.device) for name, t in named if not placed(t.device)]


def ensure_placement(patchers: Iterable[Any]) -> None:
    """Make sure every managed model sits whole on its load device after ComfyUI loaded it, or fail clearly.

    ComfyUI loads a model only in part under ``--novram`` (its NO_VRAM state ignores a forced full
    load), and a model it partially evicted earlier comes back partial under ``--lowvram`` /
    ``--novram``: it moves the modules it can stream layer by layer and leaves the rest on the CPU,
    which for modules that are not ComfyUI ops means the weights stay on the CPU while the inputs go
    to the GPU. Such a model is completed through ComfyUI's own ``ModelPatcher.partially_load``
    (after ``free_memory`` made room for the missing bytes), so its bookkeeping stays right.
    """
    mm = model_management()
    managed = list(patchers)
    for patcher in managed:
        stray = stray_tensors(patcher)
        if not stray:
            continue
        import torch

        device = torch.device(patcher.load_device)
        names = {name for name, _ in stray}
        missing = sum(t.nelement() * t.element_size() for name, t in _named_tensors(patcher) if name in names)
        log = _logger()
        log.info("Unison: ComfyUI loaded %s only in part (%d of its tensors on %s, e.g. %s); these modules cannot "
                 "stream their weights layer by layer, so the remaining %.2f GiB are loaded to %s",
                 patcher_label(patcher), len(stray), stray[0][1], stray[0][0], missing / 2**30, device)
        if mm is not None and device.type != "cpu":
            keep = [lm for lm in mm.current_loaded_models if lm.model in managed]
            mm.free_memory(missing * 1.1 + mm.minimum_inference_memory(), device, keep_loaded=keep)
        patcher.partially_load(device, extra_memory=float("inf"))
        stray = stray_tensors(patcher)
        if stray:
            from ._runtime import errors

            names = ", ".join(f"{name} on {dev}" for name, dev in stray[:3])
            raise errors.UnisonError(
                f"{patcher_label(patcher)}: ComfyUI was asked to load it on {device}, but {len(stray)} of its weights "
                f"stayed elsewhere ({names}{', ...' if len(stray) > 3 else ''}); the inputs would not match the "
                "weights. Restart ComfyUI without --novram, or set the Unison VACE Loader's text encoder device to "
                "cpu to keep umT5 off the GPU")


def _named_tensors(patcher: Any) -> Iterable[tuple[str, Any]]:
    import itertools

    return itertools.chain(patcher.model.named_parameters(), patcher.model.named_buffers())


def _logger() -> Any:
    import logging

    return logging.getLogger("unison")


def unload(patchers: Iterable[Any | None]) -> int:
    """Offload these managed models now (ComfyUI's own unload: weights back to their offload device).

    For work that no longer needs them (the transformer before a retried decode) or a loader that
    is about to load a replacement. Returns how many were loaded.
    """
    mm = model_management()
    wanted = [p for p in patchers if p is not None]
    if mm is None or not wanted:
        return 0
    found = [i for i, lm in enumerate(mm.current_loaded_models) if lm.model in wanted]
    for i in sorted(found, reverse=True):
        loaded = mm.current_loaded_models.pop(i)
        loaded.model_unload()
    if found:
        mm.soft_empty_cache()
    return len(found)


def evictable_bytes(device: Any) -> int:
    """Bytes of the models ComfyUI holds on ``device``, which it can offload to make room (0 outside ComfyUI)."""
    import torch

    mm = model_management()
    if mm is None:
        return 0
    device = torch.device(device)
    return int(sum(lm.model_loaded_memory() for lm in mm.current_loaded_models if lm.device == device))


def fits_on_device(size: int, device: Any) -> bool:
    """Whether ``size`` bytes of weights plus ComfyUI's minimum working memory fit the whole of ``device``
    (always true for the CPU and outside ComfyUI)."""
    import torch

    mm = model_management()
    device = torch.device(device)
    if mm is None or device.type == "cpu":
        return True
    return size + mm.minimum_inference_memory() <= mm.get_total_memory(device)


def free_for_load(size: int, device: Any) -> None:
    """Before weights are loaded straight onto ``device`` (ComfyUI's high-VRAM mode offloads to the GPU), let
    ComfyUI offload other models to make ``size`` bytes of room; nothing to do for the CPU."""
    import torch

    mm = model_management()
    device = torch.device(device)
    if mm is None or device.type == "cpu":
        return
    mm.free_memory(size, device)


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


# --------------------------------------------------------------------------- the prompt around a node


def linked_consumers(prompt: dict[str, Any] | None, node_id: Any, slot: int) -> list[tuple[str, str, str]]:
    """``(node id, class_type, input name)`` of every input the API ``prompt`` links to output ``slot`` of
    ``node_id`` (links are ``[source id, slot]``, ComfyUI's ``comfy_execution/graph_utils.is_link``)."""
    found = []
    for consumer, node in (prompt or {}).items():
        for name, value in (node.get("inputs") or {}).items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id) and value[1] == slot:
                found.append((str(consumer), str(node.get("class_type")), name))
    return found


def node_class(class_type: str) -> type | None:
    """The class ComfyUI registered as ``class_type`` (core or custom), or ``None`` when unknown.

    Inside ComfyUI the top-level ``nodes`` module is ComfyUI's own registry (``nodes.py``), which holds
    every loaded node, V1 and V3; it is read, never imported anew.
    """
    registry = getattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS", None)
    return registry.get(class_type) if isinstance(registry, dict) else None


def input_is_optional(class_type: str, input_name: str) -> bool:
    """Whether ``class_type`` declares ``input_name`` optional: then "nothing" (``None``) is a value it
    takes, ComfyUI's form of an unconnected optional input. Unknown nodes count as not optional."""
    cls = node_class(class_type)
    if cls is None:
        return False
    return input_name in (cls.INPUT_TYPES().get("optional") or {})
