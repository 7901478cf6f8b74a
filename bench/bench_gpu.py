"""GPU path: the pack's own loaders, sampler and decode (and its ComfyUI nodes) at 480P/81 frames on a CUDA device.

Prints two tables:

* **Published** reference numbers for 832x480x81 (always): Wan2.1's own table and diffusers'
  documented VRAM need, with where they come from (marked ``published``; no GPU measured them here).
* **Measured here** (only when ``torch.cuda.is_available()``): the pack's own path, as a user runs
  it: ``load_vace_diffusers`` (which picks the dtype and attention for the chosen ``cuda:N``, see
  ``unison_runtime/devices.py`` / ``attention.py``), umT5 encoding, then ``sample`` at 832x480x81
  with the reference settings (guidance 5, batched) timed per step through its progress callback,
  the VAE decode it ends with, the end-to-end time and the peak VRAM, with the published Wan2.1
  figures beside them. With ``--comfyui PATH`` the same generation also runs through the pack's
  ComfyUI nodes (Unison VACE Diffusers Loader -> Unison VACE Sampler) under that ComfyUI's model
  management. Without ``--vace`` the weights are random, with the released 1.3B transformer and
  VAE sizes (a one-layer umT5 of the released width stands in for umT5-XXL, so the encode time is
  not umT5-XXL's); ``--vace`` points at a real ``Wan2.1-VACE-1.3B-diffusers`` folder.

On a machine without a GPU the measured table says so in one line and measures nothing.
``--quick`` runs the same measuring code on the CPU with a tiny model, only to check it works.

    python -m bench.bench_gpu                                   # random released-size weights, 50 steps
    python -m bench.bench_gpu --vace /models/Wan2.1-VACE-1.3B-diffusers --device cuda:1
    python -m bench.bench_gpu --comfyui /path/to/ComfyUI        # also through the ComfyUI nodes
    python -m bench.bench_gpu --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, base_parser, command_line, machine_summary, print_table
from bench.scaled_models import QUICK_MODEL, RELEASED_GEOMETRY, Geometry, ScaledVace, build_scaled_vace, synchronize

CONFIGS = Path(__file__).resolve().parents[1] / "unison_runtime" / "configs"
WAN_README = ("github.com/Wan-Video/Wan2.1 README.md, 'Computational Efficiency on Different GPUs' "
              "(assets/comp_effic.png)")
DIFFUSERS_DOC = "huggingface.co/docs/diffusers/v0.33.0/api/pipelines/wan ('Text to Video Generation')"


@dataclass(frozen=True)
class Published:
    case: str
    seconds: float | None
    vram_gb: float | None
    source: str
    note: str = ""


PUBLISHED = (
    Published("Wan2.1 T2V-1.3B, 480P (832x480x81, 50 steps), 1x RTX 4090", 261.4, 8.19, WAN_README,
              "--offload_model True --t5_cpu; about 4 minutes per 5-second video"),
    Published("Wan2.1 T2V-1.3B, 480P, 2x RTX 4090", 188.5, 18.1, WAN_README, "per-GPU peak"),
    Published("Wan2.1 T2V-1.3B, 480P, 4x RTX 4090", 120.8, 14.1, WAN_README, "per-GPU peak"),
    Published("Wan2.1 T2V-1.3B, 480P, 8x RTX 4090", 112.3, 12.2, WAN_README, "--ring_size 8"),
    Published("Wan2.1 T2V-14B, 720P, 1x H800/H100", 1837.9, 69.1, WAN_README, "--offload_model True"),
    Published("Wan2.1 T2V-14B, 720P, 1x A800/A100", 3342.6, 69.1, WAN_README, "--offload_model True"),
    Published("diffusers WanPipeline, Wan2.1-T2V-1.3B-Diffusers, bf16, enable_model_cpu_offload", None, 11.0,
              DIFFUSERS_DOC, "documented VRAM need; no time given"),
)


def published_rows() -> list[Row]:
    rows = []
    for item in PUBLISHED:
        value, unit = (item.seconds, "s") if item.seconds is not None else (item.vram_gb, "GB VRAM")
        vram = f"peak {item.vram_gb} GB VRAM; " if item.seconds is not None and item.vram_gb else ""
        rows.append(Row(f"published: {item.case}", value, unit, 0, "", None, f"{vram}{item.note}; {item.source}"))
    return rows



def published_beside() -> str:
    """The published single-GPU 1.3B figure, for the note next to a measured end-to-end time."""
    first = PUBLISHED[0]
    return f"published beside it: {first.case}: {first.seconds} s, peak {first.vram_gb} GB VRAM ({WAN_README})"


# --------------------------------------------------------------------------- measuring the pack's path

#: Random weights with the released Wan2.1-VACE-1.3B transformer (12 x 128 heads, FFN 8960, 30
#: layers, VACE on every other) and VAE (base width 96); umT5 at its released width, one layer.
RELEASED_RANDOM = ScaledVace("released-1.3b", heads=12, head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                             text_layers=1, text_heads=64, text_ff=1024, vae_base_dim=96)
QUICK_GEOMETRY = Geometry(32, 32, 5, 2, 64)
PROMPT = "A lion walking around in its habitat, golden light, slow camera pan"


@dataclass
class Measured:
    """One generation through the pack's path: seconds per phase, the per-step times, peak VRAM."""

    where: str  # "pack" or "ComfyUI nodes"
    load: float
    encode: float
    steps: list[float]
    decode: float
    end_to_end: float
    peak_bytes: float
    dtype: str
    attention: str


class StepClock:
    """The sampler's ``progress`` callback: waits for the GPU, then stamps the time of each finished step."""

    def __init__(self, device: str):
        self.device, self.stamps = device, [time.perf_counter()]

    def __call__(self, step: int, total: int) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def restart(self) -> None:
        self.stamps = [time.perf_counter()]

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: str) -> float:
    import torch

    return float(torch.cuda.max_memory_allocated(device)) if device.startswith("cuda") else float("nan")


def measure_pack(folder: Path, device: str, geometry: Geometry, *, text_device: str | None = None) -> Measured:
    """Load with ``load_vace_diffusers``, encode, ``sample`` (reference settings) and decode; time each phase."""
    import torch

    from unison_runtime.plan import default_plan
    from unison_runtime.vace.loading import load_vace_diffusers
    from unison_runtime.vace.sampler import SamplingOptions, sample
    from unison_runtime.vace.sources import prepare_vace_inputs
    from unison_runtime.vace.text import text_contexts

    _reset_peak(device)
    start = time.perf_counter()
    models = load_vace_diffusers(folder, device=device, text_device=text_device or device)
    synchronize(device)
    loaded = time.perf_counter()
    plan = default_plan("text_to_video", width=geometry.width, height=geometry.height, num_frames=geometry.frames)
    tokens = torch.randn(1, 4, models.transformer.config.text_dim, generator=torch.Generator().manual_seed(0))
    contexts = text_contexts(models, PROMPT, tokens)
    models.release_text_encoder()  # as the pipeline does before sampling
    synchronize(device)
    encoded = time.perf_counter()
    clock = StepClock(device)
    generation = sample(models, plan, prepare_vace_inputs(plan, []), contexts.cond, contexts.neg,
                        SamplingOptions(steps=geometry.steps, seed=0), progress=clock)
    synchronize(device)
    done = time.perf_counter()
    assert generation.frames.shape[0] == geometry.frames
    return Measured("pack", loaded - start, encoded - loaded, clock.step_times(), done - clock.stamps[-1],
                    done - loaded, _peak_bytes(device), str(models.dtype).removeprefix("torch."), models.attention)


def measure_comfyui(comfyui: Path, folder: Path, device: str, geometry: Geometry) -> Measured:
    """The same generation through the pack's ComfyUI nodes, under the ComfyUI at ``comfyui``."""
    import torch

    nodes = _import_pack_nodes(comfyui, folder.parent, cpu=device == "cpu")
    loaders, generation, packets = nodes["loaders"], nodes["generation"], nodes["packets"]
    from unison_runtime.plan import default_plan

    _reset_peak(device)
    start = time.perf_counter()
    (vace,) = loaders.UnisonVaceDiffusersLoader().load(folder=f"unison/{folder.name}", dtype="auto",
                                                         text_encoder_device="default")
    synchronize(device)
    loaded = time.perf_counter()
    plan = packets.PlanPacket(default_plan("text_to_video", width=geometry.width, height=geometry.height,
                                           num_frames=geometry.frames, prompt=PROMPT))
    tokens = torch.randn(1, 4, vace.models.transformer.config.text_dim, generator=torch.Generator().manual_seed(0))
    clock = StepClock(device)
    sampler = nodes["sampler_module"]
    original = sampler.sample

    def timed_sample(*args: Any, **kwargs: Any) -> Any:
        inner = kwargs.get("progress")

        def progress(step: int, total: int) -> None:
            clock(step, total)
            if inner is not None:
                inner(step, total)

        clock.restart()
        return original(*args, **{**kwargs, "progress": progress})

    sampler.sample = timed_sample
    try:
        result = generation.UnisonVaceSampler().sample(vace, plan, seed=0, steps=geometry.steps, guidance=5.0,
                                                       shift=5.0, negative_prompt="", tokens=tokens)
    finally:
        sampler.sample = original
    synchronize(device)
    done = time.perf_counter()
    assert result["result"][0].shape[0] == geometry.frames
    encode = clock.stamps[0] - loaded
    return Measured("ComfyUI nodes", loaded - start, encode, clock.step_times(), done - clock.stamps[-1],
                    done - loaded, _peak_bytes(device), str(vace.models.dtype).removeprefix("torch."),
                    vace.models.attention)


def _import_pack_nodes(comfyui: Path, models_parent: Path, *, cpu: bool) -> dict[str, Any]:
    """Import ComfyUI (its ``folder_paths``, model management) and this pack's nodes as ComfyUI would.

    ComfyUI has a top-level ``nodes`` module of its own, so the pack's ``nodes`` package is loaded
    under another name, as ComfyUI's custom-node loader does. ``models_parent`` is registered as a
    ``unison`` model folder so the diffusers loader node lists the VACE folder.
    """
    import importlib
    import importlib.util

    if str(comfyui) not in sys.path:
        sys.path.append(str(comfyui))
    if cpu:
        importlib.import_module("comfy.cli_args").args.cpu = True  # before model management picks its device
    folder_paths = importlib.import_module("folder_paths")
    folder_paths.add_model_folder_path("unison", str(models_parent))
    root = Path(__file__).resolve().parents[1] / "nodes"
    name = "comfyui_unison_bench_nodes"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return {"loaders": importlib.import_module(f"{name}.loaders"),
            "generation": importlib.import_module(f"{name}.generation"),
            "packets": importlib.import_module(f"{name}.packets"),
            "sampler_module": importlib.import_module("unison_runtime.vace.sampler")}


def _gib(nbytes: float) -> str:
    return "n/a on the CPU" if nbytes != nbytes else f"{nbytes / 1024**3:.2f} GiB"


def measured_rows(result: Measured, geometry: Geometry) -> list[Row]:
    """Rows for one measured generation; the per-step figure is the median after the first (warm-up) step."""
    steps = result.steps[1:] if len(result.steps) > 2 else result.steps
    per_step = statistics.median(steps)
    which = f"steps 2..{len(result.steps)}" if steps is not result.steps else "every step"
    shape = f"{geometry.width}x{geometry.height}x{geometry.frames}"
    how = f"{result.dtype}, attention {result.attention}"
    rows = [
        Row(f"{result.where}: load ({how})", result.load, "s", 1, "", None, ""),
        Row(f"{result.where}: umT5 encode", result.encode, "s", 1, "", None, "both guidance branches"),
        Row(f"{result.where}: denoising step, guidance 5 batched ({shape})", per_step, "s", len(steps), "", None,
            f"median of {which}; projected {RELEASED_GEOMETRY.steps} steps: "
            f"{per_step * RELEASED_GEOMETRY.steps:.0f} s"),
        Row(f"{result.where}: VAE decode, fp32 ({shape})", result.decode, "s", 1, "", None, ""),
        Row(f"{result.where}: end to end, encode + {len(result.steps)} steps + decode ({shape})", result.end_to_end,
            "s", 1, "", None, f"peak VRAM {_gib(result.peak_bytes)}; {published_beside()}"),
    ]
    if result.peak_bytes == result.peak_bytes:
        rows.append(Row(f"{result.where}: peak VRAM allocated", result.peak_bytes / 1024**3, "GiB", 1, "", None,
                        f"torch.cuda.max_memory_allocated; published: {PUBLISHED[0].vram_gb} GB ({WAN_README})"))
    return rows


def gpu_decisions(device: str) -> str:
    """What the runtime decides for ``device``: dtypes and attention backends (for the machine column)."""
    import torch

    from unison_runtime.attention import qwen_attention, vace_attention_backend
    from unison_runtime.devices import cuda_card, default_compute_dtype

    dtype = default_compute_dtype(device, "transformer")
    planner = default_compute_dtype(device, "planner")
    label = cuda_card(device).label if device.startswith("cuda") else "cpu"
    return (f"{label}; VACE {str(dtype).removeprefix('torch.')} + {vace_attention_backend(device, dtype)}, "
            f"umT5 {str(default_compute_dtype(device, 'text_encoder')).removeprefix('torch.')}, "
            f"Qwen {str(planner).removeprefix('torch.')} + {qwen_attention(None, torch.device(device), planner)[0]}")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda:N to measure (default: cuda, the current device)")
    parser.add_argument("--vace", type=Path, default=None,
                        help="a real Wan2.1-VACE-1.3B-diffusers folder (default: random weights, released sizes)")
    parser.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {RELEASED_GEOMETRY.steps})")
    parser.add_argument("--text-device", default=None, help="where umT5 runs (default: the --device)")
    parser.add_argument("--comfyui", type=Path, default=None,
                        help="a ComfyUI folder: also run the generation through the pack's ComfyUI nodes")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    import torch

    args = parse(argv)
    command = command_line("bench.bench_gpu", argv)
    print_table("GPU: published reference numbers (832x480x81)", published_rows(),
                machine="(published)", command=command)
    if args.quick:
        device, geometry, spec = "cpu", QUICK_GEOMETRY, QUICK_MODEL
    elif torch.cuda.is_available():
        device, geometry, spec = args.device or "cuda", RELEASED_GEOMETRY, RELEASED_RANDOM
    else:
        rows = [Row("GPU measurements", float("nan"), "", 0, "", None,
                    "no CUDA device here (torch.cuda.is_available() is False): GPU parts skipped, nothing measured")]
        print_table("GPU: measured here", rows, machine=machine_summary(), command=command)
        return rows
    if args.steps:
        geometry = Geometry(geometry.width, geometry.height, geometry.frames, args.steps, geometry.context_length)
    folder = args.vace or build_scaled_vace(spec)
    results = [measure_pack(folder, device, geometry, text_device=args.text_device)]
    if args.comfyui is not None:
        results.append(measure_comfyui(args.comfyui, folder, device, geometry))
    rows = [row for result in results for row in measured_rows(result, geometry)]
    label = "cpu (quick check of the code only)" if args.quick else gpu_decisions(device)
    weights = "real weights" if args.vace else f"random weights ({spec.name})"
    print_table("GPU: measured here", rows, machine=machine_summary(f"{label}; {weights}"), command=command)
    return rows


if __name__ == "__main__":
    main()
