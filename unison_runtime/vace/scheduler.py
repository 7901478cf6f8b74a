"""Stage two's scheduler: diffusers' UniPC in flow-prediction mode on **Wan's** sigma grid.

Wan's ``FlowUniPCMultistepScheduler`` (Wan2.1 ``wan/utils/fm_solvers_unipc.py``, ``__init__`` +
``set_timesteps``), which Unison's ``WanVaceProj.generate`` builds with ``shift=1`` and then
``set_timesteps(steps, shift=shift)``, samples at

    sigmas = linspace(sigma_max, sigma_min, steps + 1)[:-1],   then   shift * s / (1 + (shift - 1) * s)

with ``sigma_max = float32(1 - 1/1000)`` (0.999, rounded through float32 as Wan stores it) and
``sigma_min = 0``, timesteps ``int64(sigmas * 1000)`` and a final sigma of 0. diffusers' own flow
grid starts from ``linspace(1, 1/1000, ...)`` instead, which moves every timestep (92 vs 96 at the
last of 50 steps, shift 5). diffusers' ``UniPCMultistepScheduler`` accepts custom ``sigmas`` and
applies the same shift to them, and its UniPC update is the one Wan copied, so handing it Wan's
unshifted grid reproduces Wan's timesteps, sigmas and every step (checked against Wan's class).

:class:`WanGridUniPCScheduler` does that in ``set_timesteps``, so it stays a drop-in diffusers
scheduler: diffusers' ``WanVACEPipeline`` given one samples on Wan's grid too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

from ..errors import UnisonError

#: Wan's ``num_train_timesteps`` (wan/configs/shared_config.py).
NUM_TRAIN_TIMESTEPS = 1000

#: The solver settings Wan's scheduler uses (its constructor defaults; ``generate`` passes no others).
#: Everything that shapes the grid or the update is pinned, whatever a folder's scheduler config says.
WAN_UNIPC_CONFIG: dict[str, Any] = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "use_dynamic_shifting": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "shift_terminal": None,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "thresholding": False,
    "final_sigmas_type": "zero",
}


def wan_sigma_max(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> float:
    """Wan's ``sigma_max``: ``1 - 1/T`` as the float32 value Wan's ``__init__`` stores (0.9990000128746033)."""
    return float(torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float32))


def wan_sigmas(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Wan's unshifted grid ``linspace(sigma_max, 0, steps + 1)[:-1]`` (float64, as Wan computes it)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UnisonError(f"sampling steps={steps!r}: expected an integer >= 1")
    return np.linspace(wan_sigma_max(num_train_timesteps), 0.0, steps + 1).copy()[:-1]


class WanGridUniPCScheduler(UniPCMultistepScheduler):
    """diffusers' UniPC (flow prediction) whose default grid is Wan's; explicit ``sigmas`` still win."""

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Any = None,
        mu: float | None = None,
    ) -> None:
        if sigmas is None:
            if num_inference_steps is None:
                raise UnisonError("set_timesteps needs num_inference_steps or sigmas")
            sigmas = wan_sigmas(num_inference_steps, self.config.num_train_timesteps)
        # diffusers shifts the given sigmas (flow_shift) exactly as Wan's set_timesteps does.
        super().set_timesteps(device=device, sigmas=np.asarray(sigmas, dtype=np.float64), mu=mu)
        # Sampling always starts at the first sigma. (Left unset, the first step is found by looking its
        # timestep up, which picks the *second* of two equal int timesteps: with many steps and a large
        # shift, e.g. 100 steps at shift 12, Wan's own scheduler then skips a sigma and fails an assert.)
        self.set_begin_index(0)


def wan_unipc_scheduler(config: Mapping[str, Any] | None, shift: float) -> WanGridUniPCScheduler:
    """A fresh scheduler with Wan's solver settings and ``flow_shift = shift``.

    From ``config`` (a folder's scheduler config) only ``num_train_timesteps`` is read: Wan's
    ``generate`` ignores any saved config and builds its scheduler with the settings above.
    """
    if not shift > 0:
        raise UnisonError(f"sampling option shift={shift!r}: expected a positive number")
    train = int((config or {}).get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))
    return WanGridUniPCScheduler(num_train_timesteps=train, flow_shift=float(shift), **WAN_UNIPC_CONFIG)
