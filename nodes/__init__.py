"""ComfyUI node classes for Unison: thin adapters over ``unison_runtime`` (see ``_runtime`` for imports).

Registration lives here, in one place: the classic (V1) node API, so the pack works across
ComfyUI versions and imports without ComfyUI.
"""

from __future__ import annotations

from . import comfy_bridge
from .generation import UnisonProjector, UnisonVaceInputs, UnisonVaceSampler
from .loaders import UnisonPlannerLoader, UnisonProjectorLoader, UnisonVaceDiffusersLoader, UnisonVaceLoader
from .outputs import UnisonSaveText
from .planning import UnisonOutputSwitch, UnisonPlanner, UnisonTaskRouter
from .speed import UnisonSpeed

comfy_bridge.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "UnisonPlannerLoader": UnisonPlannerLoader,
    "UnisonProjectorLoader": UnisonProjectorLoader,
    "UnisonVaceLoader": UnisonVaceLoader,
    "UnisonVaceDiffusersLoader": UnisonVaceDiffusersLoader,
    "UnisonPlanner": UnisonPlanner,
    "UnisonTaskRouter": UnisonTaskRouter,
    "UnisonProjector": UnisonProjector,
    "UnisonVaceInputs": UnisonVaceInputs,
    "UnisonVaceSampler": UnisonVaceSampler,
    "UnisonSpeed": UnisonSpeed,
    "UnisonOutputSwitch": UnisonOutputSwitch,
    "UnisonSaveText": UnisonSaveText,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "UnisonPlannerLoader": "Unison Planner Loader",
    "UnisonProjectorLoader": "Unison Projector Loader",
    "UnisonVaceLoader": "Unison VACE Loader",
    "UnisonVaceDiffusersLoader": "Unison VACE Loader (diffusers folder)",
    "UnisonPlanner": "Unison Planner",
    "UnisonTaskRouter": "Unison Task Router",
    "UnisonProjector": "Unison Projector",
    "UnisonVaceInputs": "Unison VACE Inputs",
    "UnisonVaceSampler": "Unison VACE Sampler",
    "UnisonSpeed": "Unison Speed",
    "UnisonOutputSwitch": "Unison Output Switch",
    "UnisonSaveText": "Unison Save Text",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
