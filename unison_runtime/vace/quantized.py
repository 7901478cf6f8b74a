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

from collections.abc import Mapping

import torch

from .wan_keys import QUANT_MARKER_KEY

FP8_TORCH_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def dequantize(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Return a state dict with every fp8 tensor in ``dtype`` and the scaled-fp8 bookkeeping removed.

    Non-fp8 tensors are passed through untouched (the model loader casts them).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == QUANT_MARKER_KEY or name.endswith(".scale_input"):
            continue
        if name.endswith(".scale_weight"):
            continue
        if name.endswith(".weight") and (scale := state_dict.get(name[: -len("weight")] + "scale_weight")) is not None:
            # Multiply in float32: the scale is float32 and fp8 has too few bits to round twice.
            out[name] = (tensor.to(torch.float32) * scale.to(torch.float32)).to(dtype)
        elif tensor.dtype in FP8_TORCH_DTYPES:
            out[name] = tensor.to(dtype)
        else:
            out[name] = tensor
    return out
