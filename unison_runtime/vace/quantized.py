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


def dequantize_into(
    out: torch.Tensor, tensor: torch.Tensor, scale: torch.Tensor | None, *, work: torch.Tensor | None = None
) -> torch.Tensor:
    """Write ``tensor`` (fp8 or any float), times its scaled-fp8 ``scale`` when it has one, into ``out``.

    The product is taken in float32 (the scale is float32 and fp8 has too few bits to round
    twice) in one work tensor multiplied in place, then cast by the copy into ``out``. ``scale`` is
    one number, or one per row of ``tensor``. ``work``: a float32 buffer of at least
    ``out.numel()`` elements on ``out``'s device to reuse instead of allocating. Returns ``out``.
    """
    tensor = tensor.reshape(out.shape)
    if scale is None:
        return out.copy_(tensor)
    if work is None:
        work = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    else:
        work = work.view(-1)[: out.numel()].view(out.shape)
    work.copy_(tensor)
    work.mul_(scale.to(device=work.device, dtype=torch.float32))
    return out.copy_(work)


def dequantize_tensor(tensor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` (see :func:`dequantize_into`), as a new tensor on its device."""
    return dequantize_into(torch.empty(tensor.shape, dtype=dtype, device=tensor.device), tensor, scale)
