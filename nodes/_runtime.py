"""Where the nodes find the engine, in both ways this package gets imported.

ComfyUI imports the pack from its folder path under a mangled module name
(``/path/custom_nodes/ComfyUI-Unison`` becomes ``_path_x_custom_nodes_x_ComfyUI-Unison``), and
this folder becomes ``<mangled>.nodes``. The engine is then the sibling ``<mangled>.unison_runtime``
and is imported *relatively*: nothing is put on ``sys.path``, so no other pack, no pip-installed
copy of ``unison`` and no top-level module of ComfyUI (which has its own ``nodes.py``!) can be
picked up by mistake, and two copies of the pack never share modules.

The tests put the repository root on ``sys.path`` and import ``nodes`` and ``unison_runtime`` as
top-level packages, so a relative ``..unison_runtime`` would reach past the top. Then the engine
is the top-level ``unison_runtime``, the same module objects the runtime tests use (one ``Plan``
class, one ``UnisonError`` class).

Only this module decides; node modules import the engine from here. Light modules (plan,
errors, instruction, media, paths) are imported eagerly; heavy ones (torch, transformers,
diffusers) through :func:`runtime_module` when a node first needs them, so ComfyUI starts fast.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_NODES_PACKAGE = __name__.rpartition(".")[0]  # "nodes" or "<mangled>.nodes"
_INSIDE_PACK = "." in _NODES_PACKAGE

if _INSIDE_PACK:
    from .. import unison_runtime as runtime
    from ..unison_runtime import errors, instruction, media, paths, plan
else:  # the repository root is on sys.path (tests, scripts)
    import unison_runtime as runtime
    from unison_runtime import errors, instruction, media, paths, plan

RUNTIME_PACKAGE = runtime.__name__

__all__ = ["RUNTIME_PACKAGE", "errors", "instruction", "media", "paths", "plan", "runtime", "runtime_module"]


def runtime_module(name: str) -> ModuleType:
    """Import ``unison_runtime.<name>`` (e.g. ``"vace.sampler"``) from the same engine copy as above."""
    return importlib.import_module(f"{RUNTIME_PACKAGE}.{name}")
