"""ComfyUI's real model management (``comfy.model_management``, ``comfy.model_patcher``) for tests, with a
simulated GPU of a chosen size.

The code comes from a ComfyUI checkout found by :func:`find_checkout` (``UNISON_TEST_COMFYUI``, the ComfyUI
this pack sits in, or the team's reference clone); nothing of ComfyUI is part of this repository.
It is imported once per session with ``--cpu`` (no CUDA here), then taken out of ``sys.modules`` so
that tests running without ComfyUI still see none; :func:`install` puts it back for one test.

:class:`SimulatedGPU` is the only stand-in: a device ComfyUI sees as a GPU (``meta``), whose free
and total memory ComfyUI asks through its own ``get_free_memory`` / ``get_total_memory`` (patched
at the ``model_management`` level). Moving a module there keeps its CPU tensors aside and puts
same-shaped meta tensors in their place; moving it back restores them, so ComfyUI's real
``load_models_gpu`` / ``free_memory`` / ``ModelPatcher.load`` / ``partially_unload`` decide what
moves. Byte counts can be scaled per model (``register``) so tiny test models are accounted at the
released sizes: ComfyUI's ``module_size``, the pack's ``true_size`` and the device's usage all use
the same scale.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
GiB = 1024**3
GPU = torch.device("meta")


def find_checkout() -> Path | None:
    """A ComfyUI checkout: ``$UNISON_TEST_COMFYUI``, the ComfyUI whose ``custom_nodes`` holds this pack, or the
    team's read-only reference clone; ``None`` when there is none."""
    candidates = [os.environ.get("UNISON_TEST_COMFYUI")]
    if ROOT.parent.name == "custom_nodes":
        candidates.append(str(ROOT.parent.parent))
    candidates.append("/work/ref/ComfyUI")
    for candidate in candidates:
        if candidate and (Path(candidate) / "comfy" / "model_management.py").is_file():
            return Path(candidate)
    return None


@functools.cache
def _import_comfy(checkout: Path) -> dict[str, ModuleType]:
    """Import ComfyUI's model management once (``--cpu``), and take it back out of ``sys.modules``."""
    # Test doubles of the same names (tests/harness/comfy_env.py) step aside while the real ones import.
    doubles = {name: sys.modules.pop(name) for name in list(sys.modules)
               if name.split(".")[0] in ("comfy", "comfy_execution", "folder_paths")}
    before = set(sys.modules)
    argv, path, no_bytecode = sys.argv, list(sys.path), sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # the checkout may be a read-only reference: write no __pycache__ into it
    sys.path.insert(0, str(checkout))
    sys.argv = [argv[0], "--cpu"]  # comfy/cli_args.py reads sys.argv only once args parsing is enabled
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management
        import comfy.model_patcher
        import comfy.utils
    finally:
        sys.argv, sys.dont_write_bytecode = argv, no_bytecode
        sys.path[:] = path
    # Only ComfyUI's own modules leave sys.modules (the libraries it imported stay, as any import would).
    imported = {name: sys.modules[name] for name in set(sys.modules) - before if _inside(sys.modules[name], checkout)}
    for name in imported:
        del sys.modules[name]
    sys.modules.update(doubles)
    return imported


def _inside(module: ModuleType, checkout: Path) -> bool:
    where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
    return where is not None and Path(where).resolve().is_relative_to(checkout.resolve())


@dataclass
class SimulatedGPU:
    """A GPU of ``total`` bytes that ComfyUI manages (see the module docstring)."""

    total: int
    stash: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    scales: dict[int, float] = field(default_factory=dict)  # id(module) -> bytes multiplier
    moved_in: float = 0.0  # scaled bytes moved onto the GPU so far (each move of each tensor)
    oom_after: int | None = None  # raise an out-of-memory error when usage would pass this

    def register(self, module: torch.nn.Module, released_bytes: int) -> None:
        """Account ``module`` (every sub-module) as if it held ``released_bytes``."""
        distinct = sum(t.nelement() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        for sub in module.modules():
            self.scales[id(sub)] = released_bytes / distinct

    def scaled(self, module: torch.nn.Module, tensor: torch.Tensor) -> float:
        return tensor.nelement() * tensor.element_size() * self.scales.get(id(module), 1.0)

    def true_size(self, module: torch.nn.Module) -> int:
        """The pack's ``comfy_bridge.true_size`` (each distinct tensor once), in scaled bytes."""
        seen: set[int] = set()
        total = 0.0
        for sub in module.modules():
            for tensor in [*sub._parameters.values(), *sub._buffers.values()]:
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    total += self.scaled(sub, tensor)
        return round(total)

    def used(self) -> int:
        """Scaled bytes on the GPU; a tensor two modules share (a tied embedding) counts once."""
        distinct = {id(t): (key, t) for key, t in self.stash.items()}
        return round(sum(self.scaled(self._owners[key[0]], t) for key, t in distinct.values()))

    def free(self) -> int:
        return self.total - self.used()

    _owners: dict[int, torch.nn.Module] = field(default_factory=dict)

    def move(self, module: torch.nn.Module, device: torch.device) -> None:
        moved = 0.0
        for sub in module.modules():
            self._owners[id(sub)] = sub
            for table in (sub._parameters, sub._buffers):
                for name, tensor in list(table.items()):
                    if tensor is None:
                        continue
                    key = (id(sub), name)
                    if device.type == "meta" and tensor.device.type == "cpu":
                        if all(kept is not tensor for kept in self.stash.values()):
                            moved += self.scaled(sub, tensor)
                        self.stash[key] = tensor
                        empty = torch.empty_like(tensor, device="meta")
                        table[name] = torch.nn.Parameter(empty, tensor.requires_grad) \
                            if isinstance(tensor, torch.nn.Parameter) else empty
                    elif device.type == "cpu" and tensor.device.type == "meta" and key in self.stash:
                        table[name] = self.stash.pop(key)
        if moved:
            if self.oom_after is not None and self.used() > self.oom_after:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            self.moved_in += moved


@dataclass
class RealComfy:
    mm: ModuleType
    model_patcher: ModuleType
    gpu: SimulatedGPU

    def loaded(self) -> list[Any]:
        """The ModelPatchers ComfyUI holds as loaded, most recent first."""
        return [lm.model for lm in self.mm.current_loaded_models]

    def set_vram_state(self, name: str) -> None:
        """``NORMAL_VRAM``, ``LOW_VRAM`` or ``NO_VRAM``, as ComfyUI's --lowvram / --novram set it."""
        self.mm.vram_state = self.mm.VRAMState[name]


def install(monkeypatch: Any, checkout: Path, total_bytes: int, *, text_on_gpu: bool = True) -> RealComfy:
    """Put ComfyUI's real model management into ``sys.modules`` for one test, with a simulated GPU."""
    modules = _import_comfy(checkout)
    monkeypatch.syspath_prepend(str(checkout))
    for name, module in modules.items():
        if not name.startswith("comfy_execution"):  # the fake ComfyEnv's graph_utils stays
            monkeypatch.setitem(sys.modules, name, module)
    mm = modules["comfy.model_management"]
    gpu = SimulatedGPU(total_bytes)
    original_free, original_total = mm.get_free_memory, mm.get_total_memory

    def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
        dev = GPU if dev is None else dev
        if getattr(dev, "type", None) != "meta":
            return original_free(dev, torch_free_too)
        return (gpu.free(), 0) if torch_free_too else gpu.free()

    def get_total_memory(dev: Any = None, torch_total_too: bool = False) -> Any:
        dev = GPU if dev is None else dev
        if getattr(dev, "type", None) != "meta":
            return original_total(dev, torch_total_too)
        return (gpu.total, 0) if torch_total_too else gpu.total

    original_module_size = mm.module_size

    def module_size(module: torch.nn.Module) -> int:
        return int(original_module_size(module) * gpu.scales.get(id(module), 1.0))

    monkeypatch.setattr(mm, "get_free_memory", get_free_memory)
    monkeypatch.setattr(mm, "get_total_memory", get_total_memory)
    monkeypatch.setattr(mm, "module_size", module_size)
    monkeypatch.setattr(mm, "current_loaded_models", [])
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(mm, "lowvram_available", True)
    monkeypatch.setattr(mm, "get_torch_device", lambda: GPU)
    monkeypatch.setattr(mm, "unet_offload_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(mm, "text_encoder_offload_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(mm, "text_encoder_device", lambda: GPU if text_on_gpu else torch.device("cpu"))

    import nodes.comfy_bridge as bridge

    monkeypatch.setattr(bridge, "true_size", gpu.true_size)
    original_to = torch.nn.Module.to

    def to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and (device.type == "meta" or (
                device.type == "cpu" and any(key in gpu.stash for key in _keys(self)))):
            gpu.move(self, device)
            return self
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return RealComfy(mm=mm, model_patcher=modules["comfy.model_patcher"], gpu=gpu)


def _keys(module: torch.nn.Module) -> list[tuple[int, str]]:
    return [(id(sub), name) for sub in module.modules() for table in (sub._parameters, sub._buffers) for name in table]
