"""Memory preflight (issue 15): the estimate of :mod:`unison_runtime.memory_estimate` vs the measured peak.

Each case runs in a fresh process (``--child``): it loads a small random Wan2.1-VACE from a
diffusers folder, then encodes, samples and decodes one plan, inside a :class:`PeakMemory`
block started before the load. The measured figure is the peak RSS above the RSS at the start
(the kernel's high-water mark, reset at entry); the estimate is ``estimate_run(...).peak`` for
the same plan, models and settings. Cases vary the size, the length and the model width so each
part of the accounting (transformer activations, VACE hints, VAE decode, frames) leads somewhere.

    python -m bench.bench_memory_estimate           # ~1-2 min on 2 CPU cores
    python -m bench.bench_memory_estimate --quick   # two small cases
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import MIB, Row, base_parser, command_line, machine_summary, print_table, run_child

#: Target: the estimate is never below the measured peak by more than 10 % (a preflight that
#: under-counts lets the OOM killer in) and at most 2x above it (one that over-counts refuses work).
LOW, HIGH = 0.9, 2.0


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    height: int
    frames: int
    dims: str  # "tiny" (the test models) or "wide" (256 wide, 4 layers, 2 VACE layers)
    steps: int = 2
    tiling: bool = False


CASES = (
    Case("tiny 256x256 image", 256, 256, 1, "tiny"),
    Case("tiny 128x128 x 9", 128, 128, 9, "tiny"),
    Case("tiny 256x256 x 5", 256, 256, 5, "tiny"),
    Case("tiny 192x192 x 17", 192, 192, 17, "tiny"),
    Case("wide 128x128 x 9", 128, 128, 9, "wide"),
    Case("tiny 384x384 x 5 tiled", 384, 384, 5, "tiny", tiling=True),
)
QUICK = CASES[:2]


def dims_of(kind: str) -> Any:
    from unison_runtime.testing.tiny_wan import TinyVaceDims

    if kind == "tiny":
        return TinyVaceDims()
    return TinyVaceDims(heads=4, head_dim=64, ffn_dim=1024, num_layers=4, vace_layers=(0, 2), vae_base_dim=16)


def build(kind: str, root: Path) -> Path:
    from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers

    folder = root / kind
    if not folder.exists():
        build_tiny_vace_diffusers(folder, dims=dims_of(kind))
    return folder


def child(folder: str, width: int, height: int, frames: int, steps: int, tiling: bool) -> dict[str, Any]:
    """Load, encode, sample, decode once; the peak RSS above the start, and the estimate."""
    import torch

    from bench.common import PeakMemory
    from unison_runtime.memory_estimate import RunSettings, estimate_run, footprint_from_paths
    from unison_runtime.models_dir import ModelPaths
    from unison_runtime.plan import default_plan
    from unison_runtime.vace.loading import load_vace_diffusers
    from unison_runtime.vace.sampler import SamplingOptions, sample
    from unison_runtime.vace.sources import prepare_vace_inputs
    from unison_runtime.vace.text import text_contexts

    torch.set_num_threads(2)

    def job(plan: Any, options: Any) -> None:
        models = load_vace_diffusers(folder, device="cpu")
        inputs = prepare_vace_inputs(plan, [])
        contexts = text_contexts(models, plan.prompt, None)
        sample(models, plan, inputs, contexts.cond, contexts.neg, options)

    # The first job in a process also pays the imports and kernel set-up: measured on 32x32 frames
    # (whose own tensors are a few MB), that is the fixed runtime cost the estimate adds.
    task = "text_to_video" if frames > 1 else "text_to_image"
    with PeakMemory() as cold:
        job(default_plan(task, width=32, height=32, num_frames=frames, prompt="warm-up"), SamplingOptions(steps=1))
    plan = default_plan(task, width=width, height=height, num_frames=frames, prompt="a lion walking")
    options = SamplingOptions(steps=steps, vae_tiling=tiling)
    with PeakMemory() as peak:
        job(plan, options)
    footprint = footprint_from_paths(ModelPaths(diffusers_dir=Path(folder)), transformer_dtype="fp32")
    settings = RunSettings(device="cpu", vae_tiling=tiling, guidance=options.guidance)
    estimate = estimate_run(plan, footprint, settings, runtime=False)
    return {"measured": peak.peak_rss - peak.start_rss, "estimate": estimate.peak, "phase": estimate.peak_phase,
            "runtime_measured": cold.peak_rss - cold.start_rss, "exact": peak.exact, "parts": estimate.parts}


def measure(case: Case, root: Path) -> dict[str, Any]:
    folder = build(case.dims, root)
    return run_child(["-m", "bench.bench_memory_estimate", "--child", str(folder), str(case.width), str(case.height),
                      str(case.frames), str(case.steps), "1" if case.tiling else "0"])


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        folder, width, height, frames, steps, tiling = args.child
        print(json.dumps(child(folder, int(width), int(height), int(frames), int(steps), tiling == "1")))
        return []
    rows = []
    with tempfile.TemporaryDirectory(prefix="unison-mem-est-") as tmp:
        for case in QUICK if args.quick else CASES:
            result = measure(case, Path(tmp))
            ratio = result["estimate"] / max(result["measured"], 1)
            note = (f"estimate {result['estimate'] / MIB:.0f} MiB (peak while {result['phase']}), "
                    f"measured {result['measured'] / MIB:.0f} MiB; first-job runtime cost measured "
                    f"{result['runtime_measured'] / MIB:.0f} MiB")
            rows.append(Row(case.name, ratio, "x", 1, target=f"{LOW}-{HIGH}", met=LOW <= ratio <= HIGH, note=note))
    print_table("Memory preflight: estimate / measured peak RSS", rows, machine=machine_summary("cpu"),
                command=command_line("bench.bench_memory_estimate", argv))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
