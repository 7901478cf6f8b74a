"""GPU path: the released shape (832x480x81, Wan2.1-VACE-1.3B) on a CUDA device (issue 9, item 6).

Prints two tables:

* **Published** reference numbers for 832x480x81 (always): Wan2.1's own table and diffusers'
  documented VRAM need, with where they come from.
* **Measured here** (only when ``torch.cuda.is_available()``): a random transformer with the
  released 1.3B config in bf16, timed per denoising step at 21 x 30 x 52 = 32,760 video tokens
  with a 2048-position context, batched guidance vs two passes, with the attention backend the
  runtime's VACE loaders pick (``unison_runtime.attention``: diffusers' ``flash`` when flash-attn is
  installed, else native SDPA) and, when that is flash, with SDPA for comparison; the Wan VAE
  decode of 81 frames in fp32; peak VRAM; and the projected 50-step total. On a machine without a
  GPU this table says so and measures nothing.

``--quick`` runs the same measuring code on the CPU with a tiny config, only to check it works.

    python -m bench.bench_gpu
    python -m bench.bench_gpu --quick
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, base_parser, command_line, machine_summary, print_table
from bench.scaled_models import QUICK_MODEL, RELEASED_GEOMETRY, Geometry, synchronize
from bench.scaled_models import transformer_config as scaled_transformer_config

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


# --------------------------------------------------------------------------- measuring


def released_transformer_config() -> dict[str, Any]:
    data = json.loads((CONFIGS / "wan2.1-vace-1.3b-transformer" / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def released_vae_config() -> dict[str, Any]:
    data = json.loads((CONFIGS / "wan2.1-vae" / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _median_time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_steps(device: str, dtype: Any, config: dict[str, Any], geometry: Geometry, repeats: int,
                  backend: str | None) -> dict[str, float]:
    """Seconds per denoising step (batched and two-pass guidance) and peak memory, for random weights."""
    import torch
    from diffusers import WanVACETransformer3DModel

    with torch.device(device):
        model = WanVACETransformer3DModel(**config).to(dtype).eval().requires_grad_(False)
    keep = tuple(WanVACETransformer3DModel._keep_in_fp32_modules or ()) if dtype != torch.float32 else ()
    for name, module in model.named_modules():  # as from_pretrained(torch_dtype=...) keeps them
        if keep and any(part in keep for part in name.split(".")):
            module.float()
    if backend is not None:
        model.set_attention_backend(backend)
    z, t = config["in_channels"], (geometry.frames - 1) // 4 + 1
    h, w = geometry.height // 8, geometry.width // 8
    generator = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, z, t, h, w, device=device, dtype=dtype, generator=generator)
    control = torch.randn(1, config["vace_in_channels"], t, h, w, device=device, dtype=dtype, generator=generator)
    context = torch.randn(2, geometry.context_length, config["text_dim"], device=device, dtype=dtype,
                          generator=generator)
    scale = torch.ones(len(config["vace_layers"]), device=device, dtype=dtype)
    timestep = torch.full((2,), 500.0, device=device)

    def forward(batch: int, ctx: torch.Tensor) -> None:
        with torch.no_grad():
            model(hidden_states=latents.expand(batch, -1, -1, -1, -1), timestep=timestep[:batch],
                  encoder_hidden_states=ctx, control_hidden_states=control.expand(batch, -1, -1, -1, -1),
                  control_hidden_states_scale=scale, return_dict=False)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    batched = _median_time(lambda: forward(2, context), device, repeats)
    two_pass = _median_time(lambda: (forward(1, context[:1]), forward(1, context[1:])), device, repeats)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    return {"batched": batched, "two_pass": two_pass, "peak_bytes": peak}


def measure_vae_decode(device: str, config: dict[str, Any], geometry: Geometry, repeats: int) -> dict[str, float]:
    import torch
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        vae = AutoencoderKLWan(**config).float().eval().requires_grad_(False)
    t, h, w = (geometry.frames - 1) // 4 + 1, geometry.height // 8, geometry.width // 8
    latents = torch.randn(1, config["z_dim"], t, h, w, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def decode() -> None:
        with torch.no_grad():
            vae.decode(latents, return_dict=False)

    seconds = _median_time(decode, device, repeats)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    return {"seconds": seconds, "peak_bytes": peak}


def _peak(nbytes: float) -> str:
    return "peak memory: n/a on the CPU" if nbytes != nbytes else f"peak {nbytes / 1024**3:.2f} GiB allocated"


def measured_rows(device: str, quick: bool, repeats: int) -> list[Row]:
    import torch

    if quick:
        dtype, geometry = torch.float32, Geometry(32, 32, 1, 2, 64)
        config = scaled_transformer_config(QUICK_MODEL)
        vae_config = {**released_vae_config(), "base_dim": 8}
    else:
        dtype, geometry = torch.bfloat16, RELEASED_GEOMETRY
        config, vae_config = released_transformer_config(), released_vae_config()
    shape = geometry.describe()
    from unison_runtime.attention import vace_attention_backend

    chosen = vace_attention_backend(device, dtype)  # what load_vace_* set on the transformer
    names = {"flash": "flash-attn", "native": "native SDPA"}
    backends: list[tuple[str, str | None]] = [(f"runtime choice: {names[chosen]}", chosen)]
    if chosen != "native":
        backends.append(("native SDPA, for comparison", "native"))
    rows = []
    for label, backend in backends:
        try:
            result = measure_steps(device, dtype, config, geometry, repeats, backend)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        except torch.OutOfMemoryError:
            rows.append(Row(f"denoising step, {label} ({shape})", float("nan"), "s", 0, "", None, "out of memory"))
            continue
        rows += [
            Row(f"denoising step, batched guidance, {label} ({shape})", result["batched"], "s", repeats, "", None,
                f"{_peak(result['peak_bytes'])}; projected {geometry.steps} steps: "
                f"{result['batched'] * geometry.steps:.0f} s"),
            Row(f"denoising step, two passes, {label} ({shape})", result["two_pass"], "s", repeats, "", None,
                f"projected {geometry.steps} steps: {result['two_pass'] * geometry.steps:.0f} s"),
            Row(f"batched guidance speedup, {label}", result["two_pass"] / result["batched"], "x", repeats, "", None,
                "two-pass step time / batched step time"),
        ]
    try:
        vae = measure_vae_decode(device, vae_config, geometry, max(1, repeats // 2))
        rows.append(Row(f"Wan VAE decode, fp32 ({geometry.width}x{geometry.height}x{geometry.frames})",
                        vae["seconds"], "s", max(1, repeats // 2), "", None,
                        _peak(vae["peak_bytes"])))
    except torch.OutOfMemoryError:
        rows.append(Row("Wan VAE decode, fp32", float("nan"), "s", 0, "", None, "out of memory"))
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    import torch

    parser = base_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    command = command_line("bench.bench_gpu", argv)
    print_table("GPU: published reference numbers (832x480x81)", published_rows(),
                machine="(published)", command=command)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.quick:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        rows = [Row("GPU measurements", float("nan"), "", 0, "", None,
                    "no CUDA device here (torch.cuda.is_available() is False): nothing measured")]
        print_table("GPU: measured here", rows, machine=machine_summary(), command=command)
        return rows
    label = torch.cuda.get_device_name(device) if device == "cuda" else "cpu (quick check of the code only)"
    from unison_runtime.attention import flash_attention_available

    backend = f"flash-attn {'installed' if flash_attention_available() else 'not installed'}"
    rows = measured_rows(device, args.quick, repeats)
    print_table("GPU: measured here", rows, machine=machine_summary(f"{label}; {backend}"), command=command)
    return rows


if __name__ == "__main__":
    main()
