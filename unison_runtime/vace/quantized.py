"""Turn fp8 weights (plain or ComfyUI's "scaled fp8") back into a compute dtype.

ComfyUI ships fp8 files two ways (``comfy/ops.py`` ``scaled_fp8_ops``, ``sd3_clip.t5_xxl_detect``):

* plain ``float8_e4m3fn`` weights, used as stored (``*_fp8_e4m3fn.safetensors``);
* *scaled* fp8: each quantized ``X.weight`` has a float32 ``X.scale_weight`` (the real weight is
  ``weight * scale_weight``), optionally an ``X.scale_input`` used only by fp8 matmuls, and the
  file carries an empty ``scaled_fp8`` tensor whose dtype marks the format.

diffusers and transformers modules compute in fp16/bf16/fp32, so weights are dequantized once at
load time; the scales are consumed and dropped.
"""

from __future__ import annotations

import torch

from .wan_keys import QUANT_MARKER_KEY, QUANT_SUFFIXES


def scale_name(name: str) -> str | None:
    """The name of the scale a scaled-fp8 ``X.weight`` is stored with (``X.scale_weight``), else ``None``."""
    return name[: -len("weight")] + "scale_weight" if name.endswith(".weight") else None


def is_quant_bookkeeping(name: str) -> bool:
    """Tensors that only describe the fp8 format and are consumed by :func:`dequantize_tensor`."""
    return name == QUANT_MARKER_KEY or name.endswith(QUANT_SUFFIXES)


def dequantize_tensor(tensor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` (fp8 or any float) in ``dtype``, multiplied by its scaled-fp8 ``scale`` when it has one.

    The product is taken in float32 (the scale is float32 and fp8 has too few bits to round
    twice) in one temporary that is multiplied in place, so converting the largest tensor costs
    one float32 copy of it, not two.
    """
    if scale is None:
        return tensor.to(dtype)
    work = tensor.to(torch.float32, copy=True)
    work.mul_(scale.to(device=work.device, dtype=torch.float32))
    return work.to(dtype)
