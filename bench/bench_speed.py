"""Speed options of stage two (issue 19): text K/V once, diffusers' step caches, regional compile.

Times the denoising loop alone (control latents and noise prepared once, no VAE) on a random model
with the released 1.3B structure scaled down (``bench.scaled_models.SAMPLER_MODEL``), all arms in
turns inside one process, on the same seed and contexts:

* ``text K/V once`` vs the same loop recomputing the text side every step (both uncached);
* each cache at its published preset and at a setting that skips on random weights, vs the default
  engine (text K/V once, no cache): transformer calls that ran the blocks, wall-time ratio, and the
  difference of the final latents from the uncached run. **On random weights that difference is only
  a sanity check**: what a cache costs in quality is a property of trained weights (see the
  published numbers in BENCHMARKS.md section 9);
* ``--compile``: regional ``torch.compile`` (first run = compile time; then the steady-state ratio).

    python -m bench.bench_speed              # full run (several minutes on 2 CPU cores)
    python -m bench.bench_speed --compile    # also the compile arm (inductor on the CPU: slow to compile)
    python -m bench.bench_speed --quick      # smoke run
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from bench.common import (
    Row,
    base_parser,
    chosen_clock,
    command_line,
    cpu_clock,
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
#: Video (288 tokens) and image (256 tokens) at the reference's context length (2048 + the 4 projector tokens).
FULL_GEOMETRIES = (Geometry(192, 128, 9, 10, 2052), Geometry(256, 256, 1, 10, 2052))
QUICK_GEOMETRIES = (Geometry(32, 32, 5, 4, 516),)
#: Settings that make each cache skip on random weights (the published presets rarely trigger there).
SKIPPING = {"first_block": 0.5, "magcache": 0.3, "taylorseer": 3, "pab": 4}
CACHES = ("first_block", "magcache", "taylorseer", "pab")


def _calls(notes: list[str]) -> tuple[int, int] | None:
    """(calls that ran the blocks, transformer calls) from the sampler's cache note."""
    for note in notes:
        if "the blocks ran in " in note:
            ran, rest = note.split("the blocks ran in ")[1].split(" of ")
            return int(ran), int(rest.split()[0])
    return None


def measure(models, geometry: Geometry, rounds: int, *, caches: bool, compile_arm: bool, warmup: int,
            seed: int = 0, clock: Callable[[], float] = time.perf_counter) -> list[Row]:
    import torch

    from unison_runtime.plan import default_plan
    from unison_runtime.vace.sampler import SamplingOptions, denoise, prepare_latents
    from unison_runtime.vace.sources import prepare_vace_inputs
    from unison_runtime.vace.speed import PRESETS
    from unison_runtime.vace.text import text_contexts
    from unison_runtime.vace.text_kv import cache_bytes

    task = "text_to_video" if geometry.frames > 1 else "text_to_image"
    plan = default_plan(task, width=geometry.width, height=geometry.height, num_frames=geometry.frames)
    contexts = text_contexts(models, PROMPT, total_length=geometry.context_length)
    prepared = prepare_latents(models, prepare_vace_inputs(plan, []), seed)
    results: dict[str, torch.Tensor] = {}
    notes: dict[str, list[str]] = {}

    def arm(name: str, **options) -> Callable[[], None]:
        def run() -> None:
            notes[name] = []
            sampling = SamplingOptions(steps=geometry.steps, batch_cfg=False, seed=seed, **options)
            results[name] = denoise(models, prepared, contexts.cond, contexts.neg, sampling, notes=notes[name])
            synchronize(models.device)
        return run

    arms = {"recompute text K/V": arm("recompute text K/V", text_kv_cache=False), "engine": arm("engine")}
    if caches:
        for cache in CACHES:
            arms[f"{cache} preset"] = arm(f"{cache} preset", cache=cache)
            arms[f"{cache} skipping"] = arm(f"{cache} skipping", cache=cache, cache_threshold=SKIPPING[cache])
    times = interleaved(arms, rounds, warmup, clock)
    shape = geometry.describe() + ", two-pass guidance" + (", CPU seconds" if clock is cpu_clock else "")
    base = results["recompute text K/V"]
    scale = float(base.abs().max())
    kv_ratio = median(pair_ratios(times["recompute text K/V"], times["engine"]))
    kv_bytes = cache_bytes(models.transformer, geometry.context_length)
    rows = [
        Row(f"text K/V once: step-time ratio, recompute / once ({shape})", kv_ratio, "x", rounds, "> 1", kv_ratio > 1,
            f"median step {median(times['recompute text K/V']) / geometry.steps * 1e3:.1f} ms vs "
            f"{median(times['engine']) / geometry.steps * 1e3:.1f} ms; cache holds {kv_bytes / 2**20:.1f} MiB"),
        Row(f"text K/V once: final latents vs recomputing ({shape})",
            float((results["engine"] - base).abs().max()), "max abs diff", 1, "0 (bit-identical)",
            torch.equal(results["engine"], base), f"latent scale {scale:.3g}"),
    ]
    if caches:
        for cache in CACHES:
            for kind in ("preset", "skipping"):
                name = f"{cache} {kind}"
                setting = PRESETS[cache].value if kind == "preset" else SKIPPING[cache]
                ratio = median(pair_ratios(times["engine"], times[name]))
                ran = _calls(notes[name])
                diff = float((results[name] - results["engine"]).abs().max())
                skipped = f"blocks ran in {ran[0]} of {ran[1]} calls" if ran else "no call count"
                if cache == "pab":
                    skipped += " (PAB reuses self-attention inside blocks; blocks always run)"
                rows.append(Row(f"{cache} at {setting:g} ({kind}): speedup over the engine ({shape})", ratio, "x",
                                rounds, "", None,
                                f"{skipped}; latents differ from uncached by {diff:.3g} (scale {scale:.3g}; random "
                                "weights: a sanity check only)"))
    if compile_arm:
        rows += _compile_rows(models, prepared, contexts, geometry, rounds, shape, results["engine"])
    return rows


def _compile_rows(models, prepared, contexts, geometry: Geometry, rounds: int, shape: str, eager) -> list[Row]:
    from unison_runtime.vace.sampler import SamplingOptions, denoise

    compiled: dict[str, object] = {}

    def run(compile_: bool) -> Callable[[], None]:
        def go() -> None:
            options = SamplingOptions(steps=geometry.steps, batch_cfg=False, compile=compile_)
            compiled[str(compile_)] = denoise(models, prepared, contexts.cond, contexts.neg, options)
            synchronize(models.device)
        return go

    start = time.perf_counter()
    run(True)()  # compiles
    first = time.perf_counter() - start
    times = interleaved({"eager": run(False), "compiled": run(True)}, rounds, warmup=0)
    ratio = median(pair_ratios(times["eager"], times["compiled"]))
    diff = float((compiled["True"] - eager).abs().max())
    return [
        Row(f"regional torch.compile: speedup over eager, after compiling ({shape})", ratio, "x", rounds, "", None,
            f"first (compiling) run {first:.1f} s vs eager {median(times['eager']):.1f} s"),
        Row(f"regional torch.compile: final latents vs eager ({shape})", diff, "max abs diff", 1, "< 1e-3 x scale",
            diff < 1e-3 * max(float(eager.abs().max()), 1.0), "inductor reorders float operations"),
    ]


def main(argv: Sequence[str] | None = None) -> list[Row]:
    from unison_runtime.vace.loading import load_vace_diffusers

    parser = base_parser(__doc__.split("\n\n")[0], clock=True)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="also time regional torch.compile")
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    spec = QUICK_MODEL if args.quick else SAMPLER_MODEL
    geometries = QUICK_GEOMETRIES if args.quick else FULL_GEOMETRIES
    rounds = args.repeats or (1 if args.quick else 3)
    device = pick_device(args.device)
    models = load_vace_diffusers(build_scaled_vace(spec), device=device, text_device=device)
    materialize(models)
    rows: list[Row] = []
    for index, geometry in enumerate(geometries):
        rows += measure(models, geometry, rounds, caches=index == 0, compile_arm=args.compile and index == 0,
                        clock=chosen_clock(args),
                        warmup=0 if args.quick else 1)
    machine = machine_summary(device_label(device, models.transformer)) + f", model {spec.name}"
    print_table("Speed: text K/V once, step caches, compile", rows, machine=machine,
                command=command_line("bench.bench_speed", argv))
    return rows


if __name__ == "__main__":
    main()
