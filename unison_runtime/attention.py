"""Which attention kernel each stage runs: flash-attn where it is installed and can run, else PyTorch's SDPA.

flash-attn (2) is the fastest exact attention on NVIDIA GPUs but only for fp16/bf16 tensors on
CUDA, and it is an optional, compiled package; PyTorch's ``scaled_dot_product_attention`` runs
everywhere. Stage one (transformers) names them ``flash_attention_2`` / ``sdpa``; stage two
(diffusers' attention dispatcher, which Wan's attention goes through) ``flash`` / ``native``.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)


def flash_attention_available() -> bool:
    """True when the flash-attn package can be imported (it is never installed by this pack)."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_attention_fits(device: str | torch.device, dtype: torch.dtype) -> bool:
    """flash-attn is installed and the model runs in half precision on CUDA."""
    return torch.device(device).type == "cuda" and dtype in HALF_DTYPES and flash_attention_available()


def vace_attention_backend(device: str | torch.device, dtype: torch.dtype) -> str:
    """The diffusers attention backend for the VACE transformer: ``flash`` where it fits, else ``native`` SDPA."""
    return "flash" if flash_attention_fits(device, dtype) else "native"


def use_best_vace_attention(transformer: Any, device: str | torch.device, dtype: torch.dtype) -> str:
    """Set the fastest fitting attention backend on a diffusers transformer; returns its name.

    ``native`` is diffusers' default, so nothing is set for it (and its "experimental feature"
    warning is not printed on every CPU load).
    """
    backend = vace_attention_backend(device, dtype)
    if backend != "native":
        transformer.set_attention_backend(backend)
        log.info("VACE transformer attention: flash-attn (diffusers backend %r)", backend)
    return backend
