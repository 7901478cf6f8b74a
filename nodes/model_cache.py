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
* **Stale files.** The key and each loader's ``IS_CHANGED`` include every chosen file's size and
  modification time, so a model file replaced under the same name is loaded again, and a
  deleted one is reported by the loader instead of being served from a cache.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MAX_SIGNATURE_FILES = 2000


def path_signature(path: Path | None) -> str:
    """Size and mtime of a file, or of every file in a model folder; ``missing`` when it is gone."""
    if path is None or not path.exists():
        return "missing"
    if path.is_file():
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    parts = []
    for index, (current, dirs, files) in enumerate(os.walk(path, followlinks=True)):
        dirs.sort()
        for name in sorted(files):
            stat = (Path(current) / name).stat()
            parts.append(f"{Path(current, name).relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}")
        if index > MAX_SIGNATURE_FILES or len(parts) > MAX_SIGNATURE_FILES:
            break
    return "|".join(parts)


def signature(paths: Iterable[Path | None]) -> str:
    return ";".join(f"{p}={path_signature(p)}" for p in paths)


class WeakModelCache:
    """Load-key → live object, through weak references (see the module docstring)."""

    def __init__(self) -> None:
        self._objects: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get_or_load(self, key: tuple, load: Callable[[], T]) -> T:
        with self._lock:
            found = self._objects.get(key)
        if found is not None:
            return found
        loaded = load()
        with self._lock:
            self._objects[key] = loaded
        return loaded

    def __len__(self) -> int:
        return len(self._objects)


LOADED = WeakModelCache()
