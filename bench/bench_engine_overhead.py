"""Engine overhead: the full Unison path against plain diffusers ``WanVACEPipeline`` (issue 9, item 2).

Same random model (the released 1.3B structure scaled down, ``bench.scaled_models.SAMPLER_MODEL``),
same size, frames, steps, guidance, shift, seed and negative prompt, timed in turns in one process:

* ``unison``: ``UnisonPipeline.run(instruction)``: parse → rule plan → umT5 contexts (2048
  positions, as the reference) → VACE inputs → sample → decode, with two-pass guidance, i.e. the
  same work diffusers does;
* ``unison (batched cfg)``: the same with the default ``batch_cfg=True``;
* ``diffusers``: ``WanVACEPipeline(prompt=..., negative_prompt=..., max_sequence_length=2048)``,
  the same contexts built diffusers' way (umT5 over the padded 2048 tokens);
* ``unison sampler`` / ``diffusers sampler``: only sampling + decoding, both given the *same*
  precomputed contexts (``prompt_embeds``): the strict apples-to-apples engine comparison.

Sigma grids: every timed arm samples on **Wan's** grid (``linspace(0.999, 0)``, then shifted), the
reference's: the diffusers arms are given the pack's scheduler (``vace.scheduler``, a diffusers
``UniPCMultistepScheduler`` whose default grid is Wan's), so the engines do the same work. One extra,
untimed run of ``diffusers sampler`` with diffusers' own ``UniPCMultistepScheduler`` (its default
flow grid ``linspace(1, 1/1000)``) shows how far the grid alone moves the frames.

Reported: the median of per-round time ratios (target <= 1.03), the median denoising-step time of
each (from the step callbacks: the loop without VAE and text encoding), and how far the frames of
the two are apart (same seed, same inputs).

    python -m bench.bench_engine_overhead            # full run (several minutes on 2 CPU cores)
    python -m bench.bench_engine_overhead --quick    # smoke run
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from bench.common import (
    Row,
    base_parser,
    chosen_clock,
    command_line,
    interleaved,
    machine_summary,
    median,
    pair_ratios,
    print_table,
    set_torch_threads,
)
from bench.scaled_models import (
    QUICK_MODEL,
    SAMPLER_MODEL,
    Geometry,
    build_scaled_vace,
    device_label,
    materialize,
    pick_device,
    synchronize,
)

FULL_GEOMETRY = Geometry(192, 128, 9, 6, 2048)
QUICK_GEOMETRY = Geometry(32, 32, 5, 2, 2048)
TARGET_RATIO = 1.03
SHIFT = 5.0
GUIDANCE = 5.0


def instruction_for(geometry: Geometry) -> str:
    """An instruction the rule planner turns into exactly this geometry (size and frame count said explicitly)."""
    return (f"Create a {geometry.width}x{geometry.height} video of a lion walking around in its habitat on a sunny "
            f"day, {geometry.frames - 1} frames.")


class StepClock:
    """Timestamps of the denoising steps, from the pipelines' step callbacks; gaps = step times."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def reset(self) -> None:
        self.stamps = [time.perf_counter()]

    def tick(self, *_: object, **__: object) -> dict:
        self.stamps.append(time.perf_counter())
        return {}

    def diffusers_callback(self, pipe, step, timestep, callback_kwargs) -> dict:
        self.tick()
        return callback_kwargs

    def step_times(self) -> list[float]:
        # The first gap also holds the VAE encode and text encoding: keep only step-to-step gaps.
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:], strict=False)]


def build_arms(models, geometry: Geometry, seed: int = 0):
    """The five callables, the frames each produced last, and their step clocks."""
    import torch
    from diffusers import WanVACEPipeline

    from unison_runtime.pipeline import UnisonPipeline
    from unison_runtime.planner.rules import RulePlanner
    from unison_runtime.vace.sampler import SamplingOptions, make_scheduler, sample
    from unison_runtime.vace.sources import prepare_vace_inputs
    from unison_runtime.vace.text import WAN_NEGATIVE_PROMPT, text_contexts

    instruction = instruction_for(geometry)
    two_pass = SamplingOptions(steps=geometry.steps, guidance=GUIDANCE, shift=SHIFT, seed=seed, batch_cfg=False)
    batched = SamplingOptions(steps=geometry.steps, guidance=GUIDANCE, shift=SHIFT, seed=seed, batch_cfg=True)
    unison = UnisonPipeline(planner=RulePlanner(), vace=models)
    plan = unison.make_plan(unison.read(instruction)[0])
    if (plan.width, plan.height, plan.num_frames) != (geometry.width, geometry.height, geometry.frames):
        raise RuntimeError(f"the rule planner read {instruction!r} as {plan.width}x{plan.height}x{plan.num_frames}")
    pipe = WanVACEPipeline(tokenizer=models.tokenizer, text_encoder=models.text_encoder, vae=models.vae,
                           transformer=models.transformer, scheduler=make_scheduler(models, SHIFT))
    pipe.set_progress_bar_config(disable=True)
    contexts = text_contexts(models, plan.prompt, total_length=geometry.context_length)
    inputs = prepare_vace_inputs(plan, [])
    frames: dict[str, torch.Tensor] = {}
    clocks = {name: StepClock() for name in ("unison sampler", "diffusers sampler")}

    def diffusers_kwargs() -> dict:
        return dict(height=geometry.height, width=geometry.width, num_frames=geometry.frames,
                    num_inference_steps=geometry.steps, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    def run_unison(options, name):
        def run() -> None:
            frames[name] = unison.run(instruction, options=options).frames
            synchronize(models.device)
        return run

    def run_diffusers() -> None:
        out = pipe(prompt=plan.prompt, negative_prompt=WAN_NEGATIVE_PROMPT,
                   max_sequence_length=geometry.context_length, **diffusers_kwargs()).frames[0]
        frames["diffusers"] = out.permute(0, 2, 3, 1).float().cpu()  # [T, C, H, W] -> [T, H, W, C]
        synchronize(models.device)

    def run_unison_sampler() -> None:
        clock = clocks["unison sampler"]
        clock.reset()
        frames["unison sampler"] = sample(models, plan, inputs, contexts.cond, contexts.neg, two_pass,
                                          progress=clock.tick).frames
        synchronize(models.device)

    def run_diffusers_sampler() -> None:
        clock = clocks["diffusers sampler"]
        clock.reset()
        out = pipe(prompt_embeds=contexts.cond, negative_prompt_embeds=contexts.neg,
                   callback_on_step_end=clock.diffusers_callback, **diffusers_kwargs()).frames[0]
        frames["diffusers sampler"] = out.permute(0, 2, 3, 1).float().cpu()
        synchronize(models.device)

    def run_diffusers_own_grid() -> None:
        from diffusers import UniPCMultistepScheduler

        own = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT)
        plain = WanVACEPipeline(tokenizer=models.tokenizer, text_encoder=models.text_encoder, vae=models.vae,
                                transformer=models.transformer, scheduler=own)
        plain.set_progress_bar_config(disable=True)
        out = plain(prompt_embeds=contexts.cond, negative_prompt_embeds=contexts.neg, **diffusers_kwargs()).frames[0]
        frames["diffusers sampler, diffusers' grid"] = out.permute(0, 2, 3, 1).float().cpu()

    frames_only = {"diffusers sampler, diffusers' grid": run_diffusers_own_grid}
    arms = {
        "unison": run_unison(two_pass, "unison"),
        "unison (batched cfg)": run_unison(batched, "unison (batched cfg)"),
        "diffusers": run_diffusers,
        "unison sampler": run_unison_sampler,
        "diffusers sampler": run_diffusers_sampler,
    }
    return arms, frames, clocks, frames_only


def measure(models, geometry: Geometry, rounds: int, warmup: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> list[Row]:
    arms, frames, clocks, frames_only = build_arms(models, geometry)
    step_times = {name: [] for name in clocks}

    def with_steps(name):
        def run() -> None:
            arms[name]()
            step_times[name].extend(clocks[name].step_times())
        return run

    timed = {name: (with_steps(name) if name in clocks else fn) for name, fn in arms.items()}
    times = interleaved(timed, rounds, warmup, clock)
    shape = geometry.describe()
    rows = []
    for a, b, what in (("unison", "diffusers", "full path, two-pass guidance (same work)"),
                       ("unison (batched cfg)", "diffusers", "full path, Unison defaults (batched guidance)"),
                       ("unison sampler", "diffusers sampler", "sampler + decode, same contexts")):
        ratio = median(pair_ratios(times[a], times[b]))
        note = (f"median {median(times[a]):.2f} s vs {median(times[b]):.2f} s; "
                f"fastest {min(times[a]):.2f} s vs {min(times[b]):.2f} s ({min(times[a]) / min(times[b]):.3f}x)")
        rows.append(Row(f"time ratio {a} / {b}: {what} ({shape})", ratio, "x", rounds, f"<= {TARGET_RATIO}",
                        ratio <= TARGET_RATIO, note))
    step_a, step_b = median(step_times["unison sampler"]), median(step_times["diffusers sampler"])
    fast_a, fast_b = min(step_times["unison sampler"]), min(step_times["diffusers sampler"])
    rows.append(Row(f"denoising step time ratio unison / diffusers, two-pass guidance ({shape})", step_a / step_b,
                    "x", len(step_times["unison sampler"]), f"<= {TARGET_RATIO}", step_a / step_b <= TARGET_RATIO,
                    f"median step {step_a * 1000:.1f} ms vs {step_b * 1000:.1f} ms, fastest {fast_a * 1000:.1f} vs "
                    f"{fast_b * 1000:.1f} ms (step-to-step gaps)"))
    for run in frames_only.values():
        run()
    for a, b, tolerance in (("unison", "diffusers", 1e-3), ("unison sampler", "diffusers sampler", 1e-4),
                            ("unison (batched cfg)", "unison", 1e-3)):
        difference = float((frames[a] - frames[b]).abs().max())
        rows.append(Row(f"frames {a} vs {b}, both on Wan's grid ({shape})", difference, "max abs diff (0..1)", 1,
                        f"<= {tolerance:g}", difference <= tolerance, f"frames {tuple(frames[a].shape)}"))
    grid = "diffusers sampler, diffusers' grid"
    difference = float((frames[grid] - frames["diffusers sampler"]).abs().max())
    rows.append(Row(f"frames diffusers sampler on diffusers' own grid vs on Wan's grid ({shape})", difference,
                    "max abs diff (0..1)", 1, "(informative)", True,
                    "what the grid alone changes; the reference samples on Wan's grid"))
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    from unison_runtime.vace.loading import load_vace_diffusers

    parser = base_parser(__doc__.split("\n\n")[0], clock=True)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    spec = QUICK_MODEL if args.quick else SAMPLER_MODEL
    geometry = QUICK_GEOMETRY if args.quick else FULL_GEOMETRY
    rounds = args.repeats or (1 if args.quick else 7)
    device = pick_device(args.device)
    models = load_vace_diffusers(build_scaled_vace(spec), device=device, text_device=device)
    materialize(models)
    rows = measure(models, geometry, rounds, warmup=0 if args.quick else 1, clock=chosen_clock(args))
    machine = machine_summary(device_label(device, models.transformer)) + f", model {spec.name}"
    print_table("Engine overhead: Unison vs diffusers WanVACEPipeline", rows, machine=machine,
                command=command_line("bench.bench_engine_overhead", argv))
    return rows


if __name__ == "__main__":
    main()
