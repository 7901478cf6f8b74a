"""fp16 for the VACE transformer without fp16 overflow: the residual stream stays in fp32.

diffusers' ``WanVACETransformer3DModel`` casts each block's residual stream back to the dtype
of the stream it was given (``(hidden_states.float() + ...).type_as(hidden_states)``), which is
the model dtype when the model is loaded in fp16. fp16 stops at 65504, and a diffusion
transformer's residual stream grows past that on large activations: the output turns to inf/NaN.
Wan's reference (``wan/modules/model.py``, ``WanAttentionBlock.forward``) keeps fp32 weights and
runs under ``torch.autocast``, so its stream is fp32 and only the matrix products are half.

:func:`keep_residual_stream_fp32` gets the same with fp16 weights (half the memory):

* the patch embeddings (video and VACE control) compute in fp32, so both streams start in fp32
  and diffusers' own ``type_as`` keeps them there through every block;
* every half-precision linear or convolution layer casts its input to fp16 first (a pre-hook),
  so the matrix products run in fp16 on fp16 weights; their fp16 outputs are normalised or
  gated and added to the fp32 stream;
* the layers that start the stream or read it raw (the two patch embeddings, each VACE block's
  ``proj_in`` / ``proj_out``, whose input is not normalised) are kept in fp32 (about 2 % of the
  1.3B weights).

Hooks, not a patched class: diffusers' code runs unchanged, and the choice shows on the model
(``unison_fp32_residual_stream``). Works with diffusers' layerwise casting too: the inputs are
cast to the compute dtype, whatever the stored weight dtype.
"""

from __future__ import annotations

from typing import Any

import torch

#: Attribute set on a transformer once its residual stream is kept in fp32.
MARKER = "unison_fp32_residual_stream"
_STREAM_STARTS = ("patch_embedding", "vace_patch_embedding")
_RAW_STREAM_READERS = ("proj_in", "proj_out")  # inside vace_blocks.N only


def _inputs_to(dtype: torch.dtype):
    def cast(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    return cast


def _reads_raw_stream(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 3 and parts[0] == "vace_blocks" and parts[2] in _RAW_STREAM_READERS


def keep_residual_stream_fp32(transformer: Any, compute_dtype: torch.dtype = torch.float16) -> bool:
    """Make a half-precision diffusers Wan(VACE) transformer carry its residual stream in fp32.

    Returns True when hooks were installed, False when there was nothing to do (an fp32 or bf16
    model: bf16 has fp32's range) or they are already in place.
    """
    if getattr(transformer, MARKER, False) or compute_dtype != torch.float16:
        return False
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for name, module in transformer.named_modules():
        if not isinstance(module, layers):
            continue
        if name in _STREAM_STARTS or _reads_raw_stream(name):
            module.float().register_forward_pre_hook(_inputs_to(torch.float32))
            continue
        if module.weight.dtype != torch.float32:  # the _keep_in_fp32 layers (time embedder) stay fp32
            module.register_forward_pre_hook(_inputs_to(compute_dtype))
    setattr(transformer, MARKER, True)
    return True
