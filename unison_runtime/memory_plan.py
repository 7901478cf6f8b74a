"""How a job should use memory on this machine: staged or all-resident, batched or two-pass guidance.

Why: the released models together (Qwen2.5-VL-3B, umT5-XXL, the VACE transformer, the VAE) need
more memory than many machines have, while each alone fits. The CLI reads what is free now and the
sizes of the files it is about to load, and picks:

* **staged** (one large model at a time: stage one, then umT5, then transformer + VAE) when the
  models together would not fit beside the sampler's working memory, else all resident (faster
  for a second job in the same process, which the CLI never has, so staging costs the CLI nothing
  but a little ordering);
* **batched guidance** (both branches in one forward: a little faster) only when twice the
  sampler's activations fit, else two passes.

Sizes are computed from the files as stored, because stored fp8 / fp16 weights stay stored
(:mod:`unison_runtime.vace.stored_precision`); the activation figures are coarse upper bounds
from the released architecture (width 1536, FFN 8960, 15 VACE hints), not measurements.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
#: Kept free beyond the estimate: the interpreter, libraries, allocator slack.
HEADROOM_BYTES = int(1.5 * GIB)
# Released Wan2.1-VACE-1.3B sizes used for the activation bound.
_DIM, _FFN, _HINTS = 1536, 8960, 15


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo``).

    Without them PyTorch emulates bf16 matmuls: measured ~58x slower than fp32 on this project's
    AVX2 test machine (BENCHMARKS.md, real-size section), so bf16 is chosen by default only here.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def available_bytes(device: str | None = None) -> int | None:
    """Memory free for a new model on ``device`` now: CUDA's free VRAM, else the OS's available RAM.

    ``None`` when it cannot be read (the caller then stages, the safe choice).
    """
    if device is not None and str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        return None
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def stored_bytes(paths: Iterable[Path | str | None]) -> int:
    """Bytes of the weights files at ``paths`` (folders: their safetensors / pth files)."""
    total = 0
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.suffix in (".safetensors", ".pth", ".bin"))
    return total


def sampling_activation_bytes(width: int, height: int, num_frames: int, *, itemsize: int = 4) -> int:
    """Upper bound of one guidance branch's activations in the transformer (hints + one block's work)."""
    tokens = ((num_frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    return tokens * itemsize * (_DIM * (_HINTS + 8) + _FFN * 2)


def decode_bytes(width: int, height: int, num_frames: int) -> int:
    """Upper bound of an untiled fp32 Wan VAE decode (~8 GiB for 81 frames at 832x480, issue 16)."""
    return num_frames * width * height * 256


@dataclass(frozen=True)
class MemoryChoice:
    """What the CLI chose and why (the ``reason`` is printed and added to the job's notes)."""

    staged: bool
    batch_cfg: bool
    reason: str


def choose_memory_mode(
    *,
    available: int | None,
    stage_one: int,
    text_encoder: int,
    sampler_weights: int,
    width: int,
    height: int,
    num_frames: int,
    staged: bool | None = None,
    batch_cfg: bool | None = None,
    single_job: bool = False,
) -> MemoryChoice:
    """Staging and guidance batching for one job; an explicit ``staged`` / ``batch_cfg`` wins.

    ``stage_one`` / ``text_encoder`` / ``sampler_weights``: bytes each holds once loaded.
    ``single_job`` (the CLI): each model is loaded once whether staged or not, so staging only
    lowers the peak and is chosen whatever the free memory; batching still follows it.
    """
    branch = sampling_activation_bytes(width, height, num_frames)
    work = max(branch, decode_bytes(width, height, num_frames))
    everything = stage_one + text_encoder + sampler_weights
    if available is None:
        free = "unknown free memory"
        auto_staged, auto_batched = True, False
    else:
        free = f"{available / GIB:.1f} GiB free"
        auto_staged = single_job or everything + work + HEADROOM_BYTES > available
        resident = sampler_weights if (auto_staged if staged is None else staged) else everything
        auto_batched = resident + max(2 * branch, work) + HEADROOM_BYTES <= available
    chosen_staged = auto_staged if staged is None else staged
    chosen_batched = auto_batched if batch_cfg is None else batch_cfg
    how = "staged (one model at a time: stage one, umT5, then transformer + VAE)" if chosen_staged \
        else "all models resident"
    guidance = "batched guidance" if chosen_batched else "two-pass guidance"
    said = []
    if staged is None:
        said.append(f"models {everything / GIB:.1f} GiB" + (", one job: staging costs no extra loading"
                                                            if single_job else ""))
    if batch_cfg is None:
        said.append(f"sampler work ~{branch / GIB:.1f} GiB per branch")
    basis = f" (chosen from {free}; {', '.join(said)})" if said else " (as asked)"
    return MemoryChoice(chosen_staged, chosen_batched, f"memory: {how}, {guidance}{basis}")
