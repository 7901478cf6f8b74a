"""Who owns loaded models between queue runs, and when a loader must load again.

Policy (documented here because loaders are where memory goes):

* **Owner.** ComfyUI's own output cache holds what a loader returned, exactly as for its core
  loaders: while a workflow keeps the same choices, the loader node is not executed again and the
  models are reused across queue runs. Changing a choice executes the loader again and loads the
  new models; the old output leaves ComfyUI's cache and is freed.
* **Reuse without ownership.** :data:`LOADED` maps a load key to the live object through *weak*
  references only: two loader nodes with the same choices (or a re-run after a choice is changed
  back while the old object is still referenced) share one copy, yet this module never keeps a
  model alive. So "Unload models" / ``POST /free`` (which clears ComfyUI's caches) really frees them.
* **Device memory.** The loaded torch modules are registered with ComfyUI's model manager
  (``comfy_bridge.manage_modules``): ComfyUI moves them to the GPU when a node is about to use
  them, offloads them when another model needs the room, and moves them off the GPU on "Unload
  models", like its own models.
* **A changed choice frees the old copy first.** Each loader node is a *slot* (its node id): when it
  loads a different key, the copy it loaded before is released (``release()``: ComfyUI unloads it,
  the references are dropped) *before* the new one loads, unless another slot still uses that copy.
  Otherwise the old copy would stay in RAM/VRAM (held by ComfyUI's output cache) until the new one
  had loaded, and both would have to fit at once.
* **Stale files.** The key and each loader's ``IS_CHANGED`` include every chosen file's size,
  modification time, inode and device (``unison_runtime.faults.file_signature``), so a model file
  replaced under the same name is loaded again (even by a copy that keeps size and timestamps),
  and a deleted one is reported by the loader instead of being served from a cache.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ._runtime import errors, runtime_module

T = TypeVar("T")


def path_signature(path: Path | None) -> str:
    """Size, mtime (ns), inode and device of a file, or of every file in a model folder; ``missing`` when it is gone.

    The inode catches a file replaced by one of the same size and time (a copy that keeps
    timestamps); ``missing`` keeps ``IS_CHANGED`` from raising, so the loader itself reports the file.
    """
    if path is None:
        return "missing"
    try:
        return runtime_module("faults").file_signature(path).token()
    except errors.WeightsError:
        return "missing"


def signature(paths: Iterable[Path | None]) -> str:
    return ";".join(f"{p}={path_signature(p)}" for p in paths)


class WeakModelCache:
    """Load-key → live object, through weak references (see the module docstring)."""

    def __init__(self) -> None:
        self._objects: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()
        self._slots: dict[Any, tuple] = {}
        self._lock = threading.Lock()

    def get_or_load(self, key: tuple, load: Callable[[], T], slot: Any = None) -> T:
        """The live object for ``key``, else ``load()``; a ``slot`` (the loader node) that switches to a new
        key releases the object it held before, first (see the module docstring)."""
        with self._lock:
            found = self._objects.get(key)
            previous = self._slots.get(slot) if slot is not None else None
            if slot is not None:
                self._slots[slot] = key
            stale = None
            if found is None and previous is not None and previous != key \
                    and previous not in self._slots.values():
                stale = self._objects.pop(previous, None)
        if found is not None:
            return found
        if stale is not None and hasattr(stale, "release"):
            stale.release()
        del stale
        loaded = load()
        with self._lock:
            self._objects[key] = loaded
        return loaded

    def __len__(self) -> int:
        return len(self._objects)


LOADED = WeakModelCache()
