"""Guidance cost: both guidance branches in one batched forward vs two passes (issue 9, item 3).

The sampler's ``SamplingOptions.batch_cfg`` switch picks between a batch-2 forward (conditional +
unconditional together) and two batch-1 forwards per step. This times the denoising loop alone
(control latents and noise prepared once, no VAE), both ways in turns, on a random model with the
released 1.3B structure scaled down (``bench.scaled_models.SAMPLER_MODEL``), and checks that both
give the same latents.

    python -m bench.bench_guidance            # full run (a few minutes on 2 CPU cores)
    python -m bench.bench_guidance --quick    # smoke run
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

PROMPT = "a lion walking around in its habitat on a sunny day"
FULL_GEOMETRIES = (Geometry(192, 128, 9, 6, 160), Geometry(256, 160, 17, 4, 160))
QUICK_GEOMETRIES = (Geometry(32, 32, 5, 2, 160),)


def measure(models, geometry: Geometry, rounds: int, warmup: int = 1, seed: int = 0,
            clock: Callable[[], float] = time.perf_counter) -> list[Row]:
    import torch

    from unison_runtime.plan import default_plan
    from unison_runtime.vace.sampler import SamplingOptions, denoise, prepare_latents
    from unison_runtime.vace.sources import prepare_vace_inputs
    from unison_runtime.vace.text import text_contexts

    plan = default_plan("text_to_video", width=geometry.width, height=geometry.height, num_frames=geometry.frames)
    contexts = text_contexts(models, PROMPT, total_length=geometry.context_length)
    prepared = prepare_latents(models, prepare_vace_inputs(plan, []), seed)
    results: dict[str, torch.Tensor] = {}

    def arm(batched: bool):
        def run() -> None:
            options = SamplingOptions(steps=geometry.steps, batch_cfg=batched, seed=seed)
            results[str(batched)] = denoise(models, prepared, contexts.cond, contexts.neg, options)
            synchronize(models.device)
        return run

    times = interleaved({"batched": arm(True), "two passes": arm(False)}, rounds, warmup, clock)
    speedups = pair_ratios(times["two passes"], times["batched"])
    difference = float((results["True"] - results["False"]).abs().max())
    scale = float(results["False"].abs().max())
    shape = geometry.describe()
    steps = geometry.steps
    return [
        Row(f"batched guidance speedup over two passes ({shape})", median(speedups), "x", rounds, "> 1 (report)",
            median(speedups) > 1.0, "per-round ratio two-pass time / batched time"),
        Row(f"denoising step, batched ({shape})", median(times["batched"]) / steps, "s", rounds, "", None,
            "one step = one batch-2 forward + scheduler"),
        Row(f"denoising step, two passes ({shape})", median(times["two passes"]) / steps, "s", rounds, "", None,
            "one step = two batch-1 forwards + scheduler"),
        Row(f"final latents, batched vs two passes ({shape})", difference, "max abs diff", 1, "< 1e-3 x scale",
            difference < 1e-3 * max(scale, 1.0), f"latent scale (max abs) {scale:.3g}"),
    ]


def main(argv: Sequence[str] | None = None) -> list[Row]:
    from unison_runtime.vace.loading import load_vace_diffusers

    parser = base_parser(__doc__.split("\n\n")[0], clock=True)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    spec = QUICK_MODEL if args.quick else SAMPLER_MODEL
    geometries = QUICK_GEOMETRIES if args.quick else FULL_GEOMETRIES
    rounds = args.repeats or (1 if args.quick else 5)
    device = pick_device(args.device)
    models = load_vace_diffusers(build_scaled_vace(spec), device=device, text_device=device)
    materialize(models)
    rows: list[Row] = []
    for geometry in geometries:
        rows += measure(models, geometry, rounds, warmup=0 if args.quick else 1, clock=chosen_clock(args))
    machine = machine_summary(device_label(device, models.transformer)) + f", model {spec.name}"
    print_table("Guidance: batched vs two-pass CFG", rows, machine=machine,
                command=command_line("bench.bench_guidance", argv))
    return rows


if __name__ == "__main__":
    main()
