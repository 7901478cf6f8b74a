"""What the chosen device can compute, and the compute dtype each model runs in there.

One policy for both stages, decided for the device the user chose (``cuda:1`` is asked about
``cuda:1``, never about whichever GPU happens to be current):

=====================  ============================  ==========================  ===========  ======
device                 VACE transformer              umT5 / Qwen2.5-VL           Wan VAE      why
=====================  ============================  ==========================  ===========  ======
CUDA sm80+ (Ampere+)   bf16                          bf16                        fp32         native bf16
CUDA sm60 - sm7x       fp16, fp32 residual stream    fp32                        fp32         no native bf16
CUDA below sm60        fp32                          fp32                        fp32         no fast fp16
ROCm                   bf16                          bf16                        fp32         native bf16
MPS / other GPUs       bf16                          bf16                        fp32         as before
CPU                    fp32                          fp32                        fp32         speed
=====================  ============================  ==========================  ===========  ======

Why not bf16 below sm80: ``torch.cuda.is_bf16_supported()`` says yes there by default
(``including_emulation=True``), but those cards emulate bf16 slowly, and SDPA's fused kernels
have no bf16 below sm80 (flash needs sm80, memory-efficient has no bf16 there), so attention
falls back to the math kernel and materialises the whole score matrix (tens of GiB for a video).

Why fp16 only for the VACE transformer: diffusers' Wan blocks keep the residual stream in the
model dtype, whose fp16 range (65504) large activations exceed; Wan's reference keeps it in fp32
(fp32 weights under ``torch.autocast``). :mod:`unison_runtime.vace.fp16` restores that: the
stream is fp32, the matrix products fp16 (tested on CPU against fp32 with activations beyond
the fp16 range). umT5 (T5 overflows in fp16) and Qwen2.5-VL (not verified in fp16) run in fp32
there unless a dtype is asked for explicitly.

Each non-obvious choice is logged once, as one line naming the device, its capability and the
choice. The CUDA queries go through ``torch.cuda`` so tests can simulate any card.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UnisonError

log = logging.getLogger(__name__)

#: The first compute capability with native bf16 (Ampere) and flash-attn 2 kernels.
AMPERE = (8, 0)
#: Below this (Maxwell and older) fp16 has no fast path: fp32 is used.
PASCAL = (6, 0)

ROLES = ("transformer", "text_encoder", "planner", "vae")
_ROLE_NAMES = {"transformer": "VACE transformer", "text_encoder": "umT5 text encoder",
               "planner": "Qwen2.5-VL (stage one)", "vae": "Wan VAE"}
_said: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class CudaCard:
    """One CUDA (or ROCm) device as the policy sees it."""

    device: torch.device  # always with its index: cuda:N
    name: str
    capability: tuple[int, int]
    rocm: bool

    @property
    def label(self) -> str:
        arch = "ROCm" if self.rocm else f"sm{self.capability[0]}{self.capability[1]}"
        return f"{self.device} ({self.name}, {arch})"


def cuda_device(device: str | torch.device) -> torch.device:
    """``device`` with its index filled in (bare ``cuda`` means the current CUDA device), checked to exist.

    A CUDA device torch cannot see (no GPU or driver, an index past the last card) is a
    :class:`~unison_runtime.errors.UnisonError` naming it, not a driver traceback.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UnisonError(f"device {device} asks for CUDA, but torch sees no CUDA device here (no GPU, no driver, "
                          "or a CPU-only torch); choose cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UnisonError(f"device {device} does not exist: torch sees {count} CUDA device(s), cuda:0 to "
                          f"cuda:{count - 1}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def cuda_card(device: str | torch.device) -> CudaCard:
    """Name and compute capability of the CUDA device ``device`` (``cuda`` = the current one)."""
    device = cuda_device(device)
    index = device.index
    properties = torch.cuda.get_device_properties(index)
    return CudaCard(device, str(getattr(properties, "name", "CUDA device")),
                    tuple(torch.cuda.get_device_capability(index)), bool(torch.version.hip))


def bf16_native(device: str | torch.device) -> bool:
    """True when ``device`` computes bf16 in hardware: CUDA sm80+, ROCm; MPS and other accelerators as torch says.

    Asked of that device: torch's ``is_bf16_supported`` looks at the *current* device, so it is
    called with ``device`` made current, without emulation, and checked against its capability.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return False
    if device.type != "cuda":
        return True  # MPS (macOS 14+), XPU: the previous policy, not changed here
    card = cuda_card(device)
    if card.rocm:
        return True
    with torch.cuda.device(card.device.index):
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    return native and card.capability >= AMPERE


def fp16_fast(device: str | torch.device) -> bool:
    """True when ``device`` has usable fp16 arithmetic (CUDA sm60+, any ROCm card)."""
    card = cuda_card(device)
    return card.rocm or card.capability >= PASCAL


def _say_once(device: Any, role: str, message: str) -> None:
    key = (str(device), role, message)
    if key not in _said:
        _said.add(key)
        log.warning(message)


def default_compute_dtype(device: str | torch.device, role: str) -> torch.dtype:
    """The dtype ``role`` (see :data:`ROLES`) computes in on ``device`` when the user did not choose one.

    The policy is the module's table; a choice other than bf16 on a GPU is logged once, in one line.
    """
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; expected one of {', '.join(ROLES)}")
    device = torch.device(device)
    if device.type == "cpu" or role == "vae":
        return torch.float32
    if device.type != "cuda" or bf16_native(device):
        return torch.bfloat16
    card = cuda_card(device)
    what = _ROLE_NAMES[role]
    if role == "transformer" and fp16_fast(device):
        _say_once(card.device, role, f"{card.label} has no native bf16: the {what} runs in fp16 with its residual "
                                     "stream kept in fp32 (choose dtype fp32 to override)")
        return torch.float16
    if role == "transformer":
        reason = "no native bf16 and no fast fp16"
    elif role == "text_encoder":
        reason = "no native bf16, and umT5 overflows in fp16"
    else:
        reason = "no native bf16, and fp16 is not verified for it"
    _say_once(card.device, role, f"{card.label}: {reason}: the {what} runs in fp32 (more memory; choose a dtype "
                                 "explicitly to override)")
    return torch.float32


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo``).

    Without them PyTorch emulates bf16 matmuls: measured ~58x slower than fp32 on this project's
    AVX2 test machine (BENCHMARKS.md, real-size section), so bf16 is the CPU default only here.
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
