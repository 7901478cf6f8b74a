"""The README's memory tables, computed by the one accounting (``unison_runtime.memory_estimate``).

Why: the minimum VRAM / RAM per mode in the README must be the numbers the CLI's preflight, its
staging choice and the VACE Sampler node compute, not a hand-kept copy. This prints them from the
released shapes: the weights as the loaders hold them (read from bench_realsize's files in the
released shapes and formats: fp16 transformer, fp32 VAE, scaled-fp8 umT5 kept as stored; the bf16
umT5 and Qwen figures from the same headers), the estimate's phases per output and mode.
**Computed, not measured on a GPU.**

    python -m bench.bench_memory_cards [--dir /work/bigfiles/unison-realsize]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from unison_runtime import memory_estimate as memory
from unison_runtime.models_dir import find_models
from unison_runtime.plan import default_plan

GIB = 1024**3
OUTPUTS = (("image 832x480", "text_to_image", 832, 480, 1), ("video 480x272, 33 frames", "text_to_video", 480, 272, 33),
           ("video 832x480, 81 frames", "text_to_video", 832, 480, 81))
CARDS = (8, 12, 16, 24)


def footprints(directory: Path) -> dict[str, memory.ModelFootprint]:
    """GPU (bf16 compute, fp8 umT5 kept) and CPU (fp32 compute, narrow matrices kept) footprints."""
    paths = find_models(directory)
    qwen, lora = directory / "unison" / "Qwen2.5-VL-3B-Instruct", directory / "unison" / "unison-lora"
    stage_one = [qwen] if qwen.is_dir() else []
    lora = lora if lora.is_dir() else None  # Unison's LoRA unties the LM head (lm_head_bytes)
    gpu = memory.footprint_from_paths(paths, transformer_dtype="bf16", text_dtype="bf16", stage_one=stage_one,
                                      stage_one_dtype="bf16", stage_one_lora=lora)
    cpu = memory.footprint_from_paths(paths, transformer_dtype="fp32", text_dtype="fp32", stage_one=stage_one,
                                      stage_one_dtype="fp32", stage_one_lora=lora)
    return {"gpu": gpu, "cpu": cpu,
            "umt5 bf16": dataclasses.replace(gpu, text_encoder=memory.weight_bytes([paths.text_encoder], "bf16"))}


def gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/work/bigfiles/unison-realsize"))
    args = parser.parse_args(argv)
    feet = footprints(args.dir)
    gpu = feet["gpu"]
    print(f"weights as held (GiB): transformer {gib(gpu.transformer)} (bf16), VAE {gib(gpu.vae)} (fp32), "
          f"umT5 {gib(gpu.text_encoder)} (fp8 kept) / {gib(feet['umt5 bf16'].text_encoder)} (bf16 file), "
          f"Qwen {gib(gpu.stage_one)} (bf16); CPU fp32 compute: transformer {gib(feet['cpu'].transformer)}, "
          f"umT5 {gib(feet['cpu'].text_encoder)}, Qwen {gib(feet['cpu'].stage_one)}")
    base = memory.RunSettings(device="cuda", text_device="cuda", transformer_dtype="bf16", low_memory=True)
    modes = {"batched guidance, whole decode": dict(batch_cfg=True, vae_tiling=False),
             "batched, tiled decode": dict(batch_cfg=True, vae_tiling=True),
             "two passes, tiled decode": dict(batch_cfg=False, vae_tiling=True)}
    print("\nPeak VRAM (GiB) of the sampling stage (transformer + VAE + work; staged: umT5 and Qwen released), bf16 "
          "transformer, guidance 5, CUDA context counted; then the two stages before it:\n")
    print("| output | " + " | ".join(modes) + " | encoding the prompt (umT5 fp8 kept) | planning (Qwen bf16) |")
    print("|---|" + "---|" * (len(modes) + 2))
    for label, task, w, h, n in OUTPUTS:
        plan = default_plan(task, width=w, height=h, num_frames=n)
        cells = []
        for mode in modes.values():
            phases = memory.estimate_run(plan, gpu, dataclasses.replace(base, **mode)).phases
            cells.append(gib(max(phases[p] for p in ("loading", "encoding", "sampling", "decoding"))))
        est = memory.estimate_run(plan, gpu, base)
        cells += [gib(est.phases["encoding the prompt"]), gib(est.phases.get("planning", 0))]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nCPU RAM (GiB), `run` defaults (staged, fp32 compute, narrow matrices kept), runtime counted:\n")
    print("| output | planning (Qwen, LoRA merged) | encoding the prompt | sampling | decoding | peak, rule planner "
          "| peak, Qwen planner |")
    print("|---|---|---|---|---|---|---|")
    for label, task, w, h, n in (("image 64x64", "text_to_image", 64, 64, 1), ("video 64x64, 9 frames",
                                 "text_to_video", 64, 64, 9), *OUTPUTS):
        plan = default_plan(task, width=w, height=h, num_frames=n)
        settings = memory.RunSettings(device="cpu", low_memory=True)
        chosen = memory.choose_memory_mode(plan, feet["cpu"], settings, available=None)
        est = memory.estimate_run(plan, feet["cpu"], dataclasses.replace(settings, batch_cfg=chosen.batch_cfg))
        phases = est.phases
        rules = max(v for k, v in phases.items() if k != "planning")
        print(f"| {label} | {gib(phases.get('planning', 0))} | {gib(phases['encoding the prompt'])} | "
              f"{gib(phases['sampling'])} | {gib(max(phases['decoding'], phases['encoding']))} | {gib(rules)} | "
              f"{gib(est.peak)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
