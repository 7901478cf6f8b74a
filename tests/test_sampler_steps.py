"""Every step count the CLI and the Sampler node accept runs (1..MAX_STEPS).

diffusers' UniPC casts its timesteps (sigmas x 1000) to int64; from ~300 steps on, neighbours near
sigma = 1 share an integer, its first ``step`` looked the index up by value, landed on the second
copy and ran one step past the end (``assert self.this_order > 0``). The sampler now starts the
scheduler at index 0. Checked with diffusers' default flow sigmas and with Wan's own sigma grid
passed as ``set_timesteps(sigmas=...)`` (the grid the fid-sampler work switches to).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from unison_runtime.vace.sampler import MAX_STEPS, SamplingOptions, make_scheduler


class _Models:
    """The one field ``make_scheduler`` reads: no config of its own, UniPC's defaults."""

    def __init__(self) -> None:
        self.scheduler_config: dict = {}


def _plain_diffusers_unipc() -> UniPCMultistepScheduler:
    """diffusers' own UniPC in Wan's flow mode, without the pack's scheduler (which starts at index 0 itself)."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)


def _run_scheduler(steps: int, wan_sigmas: bool, begin_at_zero: bool,
                   plain: bool = False) -> tuple[torch.Tensor, float, int]:
    scheduler = _plain_diffusers_unipc() if plain else make_scheduler(_Models(), shift=5.0)
    if wan_sigmas:
        scheduler.set_timesteps(sigmas=np.linspace(0.999, 0, steps + 1)[:-1])
    else:
        scheduler.set_timesteps(steps)
    if begin_at_zero:
        scheduler.set_begin_index(0)
    x = torch.ones(1, 4)
    for t in scheduler.timesteps:
        x = scheduler.step(-0.1 * x, t, x, return_dict=False)[0]
    return x, float(scheduler.sigmas[0]), len(torch.unique(scheduler.timesteps))


@pytest.mark.parametrize("wan_sigmas", [False, True])
def test_the_cause_duplicate_integer_timesteps_break_the_by_value_lookup(wan_sigmas):
    with pytest.raises(AssertionError):
        _run_scheduler(300, wan_sigmas, begin_at_zero=False, plain=True)
    _, _, distinct = _run_scheduler(300, wan_sigmas, begin_at_zero=True, plain=True)
    assert distinct < 300  # the duplicates are there; starting at index 0 is what makes it run
    # The pack's scheduler starts at index 0 by itself, so it runs even when nobody sets the index.
    _run_scheduler(300, wan_sigmas, begin_at_zero=False)


@pytest.mark.parametrize("wan_sigmas", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 199, 300, 301, 512, MAX_STEPS])
def test_every_accepted_step_count_runs_the_whole_schedule(steps, wan_sigmas):
    x, first_sigma, _ = _run_scheduler(steps, wan_sigmas, begin_at_zero=True)
    # A flow prediction v = -0.1 x moves x by (sigma_next - sigma) * v per step: from sigma_0 down to 0,
    # x grows to exp(0.1 sigma_0), whatever the step count (one Euler step gives 1 + 0.1 sigma_0).
    assert torch.allclose(x, torch.full_like(x, float(np.exp(0.1 * first_sigma))), rtol=1e-2)


def test_sampling_options_limit_matches_the_node():
    from nodes.generation import UnisonVaceSampler

    node_max = UnisonVaceSampler.INPUT_TYPES()["required"]["steps"][1]["max"]
    assert node_max == MAX_STEPS
    SamplingOptions(steps=MAX_STEPS)
    with pytest.raises(Exception, match="from 1 to 1000"):
        SamplingOptions(steps=MAX_STEPS + 1)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(Exception, match="guidance"):
            SamplingOptions(guidance=bad)
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(Exception, match="shift"):
            SamplingOptions(shift=bad)


def test_a_real_300_step_sample_runs(tmp_path):
    """The tiny VACE through the real loop at 300 steps (it stopped at the last step before)."""
    from unison_runtime.plan import default_plan
    from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers
    from unison_runtime.vace.loading import load_vace_diffusers
    from unison_runtime.vace.sampler import sample
    from unison_runtime.vace.sources import prepare_vace_inputs
    from unison_runtime.vace.text import text_contexts

    models = load_vace_diffusers(build_tiny_vace_diffusers(tmp_path / "vace"), device="cpu")
    plan = default_plan("text_to_image", width=16, height=16, prompt="a fox")
    contexts = text_contexts(models, plan.prompt, None)
    seen: list[int] = []
    result = sample(models, plan, prepare_vace_inputs(plan, []), contexts.cond, None,
                    SamplingOptions(steps=300, guidance=1.0), progress=lambda done, total: seen.append(done))
    assert seen == list(range(1, 301)) and result.frames.shape == (1, 16, 16, 3)
    assert torch.isfinite(result.frames).all()
