"""Stage two reproduces the reference (Unison ``WanVaceProj.generate`` = VACE ``WanVace.generate`` + the
projector tokens, with Wan2.1's ``FlowUniPCMultistepScheduler`` and umT5): sigma grid, UniPC steps,
float32 guidance, the noise, and the exact text umT5 encodes. Every expected value is computed here
from the reference's formulas, written out in the test.
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unison_runtime.errors import UnisonError
from unison_runtime.instruction import parse_instruction
from unison_runtime.pipeline import UnisonPipeline, sampling_options_from_args
from unison_runtime.planner.rules import RulePlanner
from unison_runtime.vace import sampler as sampler_mod
from unison_runtime.vace import text as text_mod
from unison_runtime.vace.sampler import SamplingOptions, combine_guidance, denoise, draw_noise
from unison_runtime.vace.scheduler import WanGridUniPCScheduler, wan_unipc_scheduler

# --------------------------------------------------------------------------- Wan's grid, written out


def wan_grid(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan2.1 fm_solvers_unipc.py: __init__ with shift=1 stores sigmas 1 - linspace(1, 1/1000)[::-1] in
    float32, so sigma_max = float32(0.999), sigma_min = 0; set_timesteps(steps, shift=shift) then does
    linspace(sigma_max, sigma_min, steps + 1)[:-1], shift * s / (1 + (shift - 1) * s), timesteps =
    int64(s * 1000), sigmas = float32([s..., 0])."""
    sigma_max = float(np.float32(1.0 - 1.0 / 1000))
    s = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = torch.from_numpy(s * 1000).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return timesteps, sigmas


@pytest.mark.parametrize(("steps", "shift"), [(50, 5.0), (30, 3.0), (20, 8.0), (4, 5.0), (1, 5.0), (50, 1.0)])
def test_scheduler_samples_on_wans_grid(steps: int, shift: float) -> None:
    scheduler = wan_unipc_scheduler({}, shift)
    scheduler.set_timesteps(steps)
    timesteps, sigmas = wan_grid(steps, shift)
    assert torch.equal(scheduler.timesteps, timesteps)
    assert torch.equal(scheduler.sigmas, sigmas)


def test_grid_differs_from_diffusers_default_flow_grid_where_the_issue_says() -> None:
    from diffusers import UniPCMultistepScheduler

    ours = wan_unipc_scheduler({}, 5.0)
    ours.set_timesteps(50)
    assert int(ours.timesteps[-1]) == 92 and int(ours.timesteps[0]) == 999
    theirs = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    theirs.set_timesteps(50)
    assert int(theirs.timesteps[-1]) == 96  # diffusers' linspace(1, 1/1000) grid: what the pack used before


def test_scheduler_pins_wans_solver_whatever_the_folder_config_says() -> None:
    config = {"num_train_timesteps": 1000, "solver_order": 3, "use_karras_sigmas": True, "flow_shift": 3.0,
              "prediction_type": "epsilon", "final_sigmas_type": "sigma_min"}
    scheduler = wan_unipc_scheduler(config, 5.0)
    assert isinstance(scheduler, WanGridUniPCScheduler)
    assert (scheduler.config.solver_order, scheduler.config.flow_shift, scheduler.config.prediction_type) == (
        2, 5.0, "flow_prediction")
    scheduler.set_timesteps(10)
    assert torch.equal(scheduler.timesteps, wan_grid(10, 5.0)[0])
    explicit = np.array([0.9, 0.5, 0.1])
    scheduler.set_timesteps(sigmas=explicit)  # explicit sigmas still win (shifted, as diffusers does)
    assert torch.allclose(scheduler.sigmas[:-1].double(), torch.from_numpy(5 * explicit / (1 + 4 * explicit)))
    with pytest.raises(UnisonError, match="shift"):
        wan_unipc_scheduler({}, 0.0)


def _unipc_first_step(x: torch.Tensor, v: torch.Tensor, sigma_s: float, sigma_t: float) -> torch.Tensor:
    """UniPC bh2 order 1 with predict_x0 (Wan's multistep_uni_p_bh_update, first step: no corrector)."""
    x0 = x - sigma_s * v  # flow prediction -> x0
    lam = lambda s: math.log(1 - s) - math.log(s)  # noqa: E731 - alpha = 1 - sigma
    hh = -(lam(sigma_t) - lam(sigma_s))
    return sigma_t / sigma_s * x - (1 - sigma_t) * math.expm1(hh) * x0


def test_first_unipc_step_is_wans_update() -> None:
    scheduler = wan_unipc_scheduler({}, 5.0)
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, 2, 3, 3), generator=generator, dtype=torch.float64)
    v = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    _, sigmas = wan_grid(50, 5.0)
    out = scheduler.step(v, scheduler.timesteps[0], x, return_dict=False)[0]
    expected = _unipc_first_step(x, v, float(sigmas[0]), float(sigmas[1]))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_many_steps_with_a_large_shift_run_every_sigma() -> None:
    """100 steps at shift 12 repeat timestep 999: the first step must still start at the first sigma."""
    scheduler = wan_unipc_scheduler({}, 12.0)
    scheduler.set_timesteps(100)
    assert int(scheduler.timesteps[0]) == int(scheduler.timesteps[1]) == 999
    x = torch.zeros((1, 2, 1, 2, 2))
    for t in scheduler.timesteps:
        x = scheduler.step(torch.ones_like(x), t, x, return_dict=False)[0]
    assert scheduler.step_index == 100 and torch.isfinite(x).all()


# --------------------------------------------------------------------------- guidance in float32


def test_guidance_combines_in_float32() -> None:
    generator = torch.Generator().manual_seed(1)
    cond = (torch.randn(4096, generator=generator) * 3).bfloat16()
    uncond = (cond.float() + torch.randn(4096, generator=generator) * 1e-2).bfloat16()
    combined = combine_guidance(cond, uncond, 5.0)
    assert combined.dtype == torch.float32
    exact = uncond.double() + 5.0 * (cond.double() - uncond.double())
    assert float((combined.double() - exact).abs().max()) < 1e-5
    in_bf16 = uncond + 5.0 * (cond - uncond)  # what combining the transformer's bf16 outputs in bf16 gives
    assert float((in_bf16.double() - exact).abs().max()) > 1e-3


class _Bf16Transformer:
    """A stand-in transformer that runs 'in bf16': it returns bf16 predictions (distinct per branch)."""

    dtype = torch.bfloat16

    def __init__(self, text_dim: int = 8) -> None:
        self.config = SimpleNamespace(vace_layers=[0], text_dim=text_dim)
        self.outputs: list[torch.Tensor] = []

    def __call__(self, hidden_states, timestep, encoder_hidden_states, **_: object):
        # cond context is all ones, negative all zeros: the two branches differ
        scale = encoder_hidden_states[:, :1, :1].float().reshape(-1, 1, 1, 1, 1)
        out = (hidden_states.float() * (0.3 + scale) + 0.01 * timestep.float().reshape(-1, 1, 1, 1, 1) / 7)
        out = out.to(torch.bfloat16)
        self.outputs.append(out)
        return (out,)


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_scheduler_steps_float32_latents_with_the_float32_combine(monkeypatch, batch_cfg: bool) -> None:
    transformer = _Bf16Transformer()
    models = SimpleNamespace(transformer=transformer, device="cpu", scheduler_config={})
    noise = torch.randn((1, 4, 2, 2, 2), generator=torch.Generator().manual_seed(0))
    prepared = sampler_mod.PreparedLatents(control=torch.zeros(1, 72, 2, 2, 2, dtype=torch.bfloat16), noise=noise,
                                           num_references=0)
    seen = []
    real_step = WanGridUniPCScheduler.step

    def step(self, model_output, timestep, sample, return_dict=True):
        seen.append((model_output.clone(), sample.dtype))
        return real_step(self, model_output, timestep, sample, return_dict=return_dict)

    monkeypatch.setattr(WanGridUniPCScheduler, "step", step)
    cond, neg = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    latents = denoise(models, prepared, cond, neg, SamplingOptions(steps=3, guidance=5.0, batch_cfg=batch_cfg))
    assert latents.dtype == torch.float32 and len(seen) == 3
    for i, (model_output, sample_dtype) in enumerate(seen):
        branch = transformer.outputs[i] if batch_cfg else torch.cat(transformer.outputs[2 * i: 2 * i + 2])
        c, u = branch[0].float(), branch[1].float()
        assert model_output.dtype == torch.float32 and sample_dtype == torch.float32
        assert torch.equal(model_output[0], u + 5.0 * (c - u))


# --------------------------------------------------------------------------- noise


def test_cpu_noise_is_the_references_noise_for_the_seed() -> None:
    shape = (1, 16, 3, 6, 8)
    # WanVaceProj.generate: torch.randn(z, F, h, w, dtype=float32, device=dev,
    #                                   generator=torch.Generator(device=dev).manual_seed(seed))
    reference = torch.randn(shape[1:], dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(42))
    for where in ("cpu", "device"):  # on a CPU-only machine the sampling device is the CPU: both agree
        noise = draw_noise(shape, 42, "cpu", where)
        assert noise.dtype == torch.float32 and torch.equal(noise[0], reference)


def test_noise_device_choice_picks_the_generators_device(monkeypatch) -> None:
    made = []
    real_generator, real_randn = torch.Generator, torch.randn

    def generator(device="cpu"):
        made.append(str(device))
        return real_generator("cpu")

    def randn(shape, generator, device, dtype):
        made.append(f"randn on {device}")
        return real_randn(shape, generator=generator, dtype=dtype)

    monkeypatch.setattr(torch, "Generator", generator)
    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no CUDA here: only the routing is checked
    draw_noise((1, 2), 0, "cuda:1", "device")
    draw_noise((1, 2), 0, "cuda:1", "cpu")
    assert made == ["cuda:1", "randn on cuda:1", "cpu", "randn on cpu"]


def test_noise_device_option_is_checked_and_reaches_the_options() -> None:
    assert SamplingOptions().noise_device == "cpu"
    with pytest.raises(UnisonError, match="noise_device='gpu'"):
        SamplingOptions(noise_device="gpu")
    args = argparse.Namespace(steps=None, guidance=None, shift=None, seed=None, negative_prompt=None,
                              noise_device="device")
    assert sampling_options_from_args(args).noise_device == "device"
    from unison_runtime.__main__ import build_parser

    parsed = build_parser().parse_args(["run", "a cat", "--models", "m", "--out", "o.png", "--noise-device", "device"])
    assert parsed.noise_device == "device"


def test_vace_sampler_node_offers_the_noise_device() -> None:
    from nodes.generation import UnisonVaceSampler

    choices, options = UnisonVaceSampler.INPUT_TYPES()["optional"]["noise_device"]
    assert list(choices) == list(sampler_mod.NOISE_DEVICES) and options["default"] == "cpu"


# --------------------------------------------------------------------------- the text umT5 encodes


MIXED = "Make ###cat.png### dance  like the  person in ###clip.mp4###, &amp; keep ###bg.JPG### as the backdrop"
# Unison inference.py: prompt.replace(f"###{path}###", "<IMGPAD>" / "<VIDPAD>") for each reference
MIXED_REFERENCE = "Make <IMGPAD> dance  like the  person in <VIDPAD>, &amp; keep <IMGPAD> as the backdrop"
# Wan's T5 tokenizer (clean='whitespace'): ftfy, html.unescape twice, whitespace collapsed
MIXED_CLEANED = "Make <IMGPAD> dance like the person in <VIDPAD>, & keep <IMGPAD> as the backdrop"


def test_plan_prompt_is_the_references_padded_text() -> None:
    assert parse_instruction(MIXED).prompt == MIXED_REFERENCE
    assert text_mod.clean_prompt(MIXED_REFERENCE) == MIXED_CLEANED


def test_clean_prompt_is_wans_basic_and_whitespace_clean() -> None:
    # ftfy drops control characters, HTML is unescaped twice, whitespace runs become one space.
    assert text_mod.clean_prompt(" a\x1cb \t\n c &amp;lt;d&amp;gt;\u3000e ") == "ab c <d> e"


class _RecordingTokenizer:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict]] = []

    def __call__(self, texts, **kwargs):
        self.calls.append((list(texts), kwargs))
        n = 3
        return SimpleNamespace(input_ids=torch.arange(n)[None], attention_mask=torch.ones(1, n, dtype=torch.long))


class _FakeEncoder:
    def __call__(self, input_ids, attention_mask):
        return SimpleNamespace(last_hidden_state=torch.zeros(1, input_ids.shape[1], 8))


def test_pipeline_encodes_the_references_text_with_umt5() -> None:
    tokenizer = _RecordingTokenizer()
    transformer = SimpleNamespace(config=SimpleNamespace(text_dim=8))
    models = SimpleNamespace(text_encoder=_FakeEncoder(), tokenizer=tokenizer, text_device="cpu",
                             text_encoder_released=False, transformer=transformer)
    pipeline = UnisonPipeline(planner=RulePlanner(), vace=models)
    instruction = "Generate a video of ###cat.png### jumping over ###clip.mp4###, 2 seconds"
    plan = pipeline.make_plan(parse_instruction(instruction))
    contexts = pipeline.contexts(plan, torch.ones(1, 4, 8))
    texts = [call[0] for call in tokenizer.calls]
    assert ["Generate a video of <IMGPAD> jumping over <VIDPAD>, 2 seconds"] in texts
    # ftfy (Wan's basic_clean) also turns the negative prompt's full-width commas into ASCII ones
    assert [text_mod.clean_prompt(text_mod.WAN_NEGATIVE_PROMPT)] in texts and "，" not in texts[0][0]
    options = tokenizer.calls[-1][1]
    assert options["add_special_tokens"] is True and options["truncation"] is True and options["max_length"] == 512
    assert (contexts.text_tokens, contexts.projector_tokens, tuple(contexts.cond.shape)) == (3, 4, (1, 2048, 8))


def test_router_prompt_output_carries_the_umt5_text() -> None:
    from nodes.packets import PlanPacket
    from nodes.planning import UnisonTaskRouter
    from unison_runtime.plan import default_plan

    instruction = parse_instruction(MIXED)
    plan = default_plan("text_to_video", prompt=instruction.prompt, width=64, height=64, num_frames=5)
    packet = PlanPacket(plan=plan)
    result = UnisonTaskRouter().route(packet)["result"]
    assert result[UnisonTaskRouter.RETURN_NAMES.index("prompt")] == MIXED_REFERENCE
