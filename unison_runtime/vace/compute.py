"""How a loaded VACE transformer computes: fp16 safety and the attention kernel, set once after loading."""

from __future__ import annotations

from typing import Any

from ..attention import use_best_vace_attention
from .fp16 import keep_residual_stream_fp32


def prepare_transformer(transformer: Any, device: Any, dtype: Any) -> str:
    """Keep an fp16 transformer's residual stream in fp32, pick its attention backend; returns the backend.

    Every loader calls this on the transformer it built, whatever the file format.
    """
    import torch

    if dtype == torch.float16:
        keep_residual_stream_fp32(transformer, dtype)
    return use_best_vace_attention(transformer, device, dtype)
