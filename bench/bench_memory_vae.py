"""Wan VAE decode memory at the released shapes: the estimate's per-chunk figure vs the measured peak.

Why: the estimate's decode term decides whether a video needs a tiled decode and how much VRAM
the VACE Sampler asks ComfyUI to keep free. diffusers' ``AutoencoderKLWan`` decodes one latent
frame (4 output frames) at a time and keeps a feature cache of 2 frames per causal convolution,
so the decode's working set depends on the frame size, not the frame count; the decoded frames
accumulate beside it. This loads the released-shape VAE (``vae/wan_2.1_vae.safetensors`` from
``bench_realsize``, random weights, fp32 as the pack decodes), decodes random latents of a few
sizes, each in a fresh process, and compares the peak RSS above the loaded model with
:func:`unison_runtime.memory_estimate.vae_decode_bytes` (CPU, and the GPU figure beside it).

    python -m bench.bench_memory_vae                     # needs bench_realsize's VAE file
    python -m bench.bench_memory_vae --sizes 128x128x1 256x256x9
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VAE = Path("/work/bigfiles/unison-realsize/vae/wan_2.1_vae.safetensors")
SIZES = ("128x128x1", "256x256x1", "128x128x9", "256x128x17", "256x256x9")
MIB = 1024**2


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(vae_file: str, size: str, threads: int) -> None:
    import torch

    from unison_runtime import memory_estimate as memory
    from unison_runtime.vace.files import load_vae_file

    torch.set_num_threads(threads)
    width, height, frames = (int(v) for v in size.split("x"))
    vae = load_vae_file(vae_file, dtype=torch.float32, device="cpu")
    for tensor in vae.parameters():  # page the mapped weights in before the baseline
        tensor.sum()
    warm = torch.randn(1, 16, 1, 4, 4)
    with torch.no_grad():
        _ = vae.decode(warm).sample  # first-use kernel set-up outside the measured peak
    latent_frames = (frames - 1) // 4 + 1
    z = torch.randn(1, 16, latent_frames, height // 8, width // 8)
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    with torch.no_grad():
        out = vae.decode(z).sample
    peak = _status("VmHWM") - base
    config = dict(vae.config)
    print(json.dumps({"size": size, "shape": list(out.shape), "peak": peak,
                      "cpu": memory.vae_decode_bytes(width, height, frames, config, 4, device="cpu"),
                      "gpu": memory.vae_decode_bytes(width, height, frames, config, 4, device="cuda")}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, default=DEFAULT_VAE)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(str(args.vae), args.child[0], int(args.child[1]))
        return 0
    if not args.vae.is_file():
        parser.error(f"{args.vae} is missing: write it with python -m bench.bench_realsize --write-only")
    print("| decode (WxHxframes) | measured peak above the model | estimate, CPU | estimate / measured | "
          "estimate, GPU (no im2col) | per output pixel, measured |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        done = subprocess.run([sys.executable, "-m", "bench.bench_memory_vae", "--vae", str(args.vae),
                               "--child", size, str(args.threads)], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"| {size} | failed: {done.stderr.strip().splitlines()[-1:]} | | | | |", flush=True)
            continue
        r = json.loads(lines[-1])
        w, h, _ = (int(v) for v in size.split("x"))
        print(f"| {size} | {r['peak'] / MIB:.0f} MiB | {r['cpu'] / MIB:.0f} MiB | {r['cpu'] / r['peak']:.2f}x | "
              f"{r['gpu'] / MIB:.0f} MiB | {r['peak'] / (w * h) / 1024:.1f} KB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
