"""ComfyUI entry point of the Unison pack.

ComfyUI imports this file by path under a mangled module name, so everything below is imported
relatively (``nodes/_runtime.py`` explains how the engine is found). Nothing heavy happens at
import: models load when a loader node runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# The JS extension that renders plan text on the Planner and Router nodes. Declared here only,
# not also as [tool.comfy] web in pyproject.toml, which would make ComfyUI load it twice.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
