"""Working memory the VACE Sampler asks ComfyUI to keep free beside the weights (``memory_required``).

ComfyUI's ``load_models_gpu(models, memory_required=...)`` offloads other models until the weights
plus this reserve fit. The figures are computed from the released Wan2.1-VACE shapes, not measured
on a GPU (none was available): the transformer's per-token activations, and the Wan VAE's peak
per output pixel, which on the CPU measured ~21-22 KB per pixel in fp32 (decoding 2 latent frames
at 256x128 and 256x256, ``diffusers.AutoencoderKLWan``; it decodes one latent frame at a time, so
the peak grows with the picture, not with the frame count). Local to the nodes until a shared
runtime estimate (the CLI's preflight) lands; the numbers are the same kind either would use.
"""

from __future__ import annotations

from typing import Any

#: Wan VAE decode/encode peak per output pixel in bytes at 4-byte precision (see the module docstring).
VAE_BYTES_PER_PIXEL_FP32 = 22 * 1024
#: Live [tokens, dim] tensors in a VACE block besides the hints: input, norm, q, k, v, attention output,
#: residual and the control stream.
WORKING_TENSORS = 8


def _element_size(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size() if dtype is not None else 4


def latent_tokens(width: int, height: int, frames: int, references: int = 0, *, temporal: int = 4,
                  spatial: int = 8, patch: int = 2) -> int:
    """Transformer sequence length: latent frames (+ reference frames) x patches per frame."""
    latent_frames = (max(frames, 1) - 1) // temporal + 1 + references
    return latent_frames * (height // (spatial * patch)) * (width // (spatial * patch))


def transformer_activation_bytes(tokens: int, *, dim: int, ffn_dim: int, vace_blocks: int, batch: int,
                                 dtype: Any) -> int:
    """Peak activations of one VACE transformer forward: the VACE hints (one [tokens, dim] per VACE block,
    kept for the whole pass), the block's working tensors and its feed-forward intermediate (twice: GELU in
    and out). Attention is assumed memory-efficient (flash / SDPA kernels: no [tokens, tokens] matrix)."""
    per_token = dim * (vace_blocks + WORKING_TENSORS) + 2 * ffn_dim
    return tokens * batch * per_token * _element_size(dtype)


def vae_peak_bytes(width: int, height: int, frames: int, *, dtype: Any) -> int:
    """Decode (or encode) peak of the Wan VAE for one clip, plus the decoded video in float32."""
    per_pixel = VAE_BYTES_PER_PIXEL_FP32 * _element_size(dtype) // 4
    return width * height * per_pixel + 3 * max(frames, 1) * width * height * 4


def sampling_bytes(models: Any, *, width: int, height: int, frames: int, references: int, batched_guidance: bool,
                   ) -> int:
    """What one VACE Sampler run needs beside the weights: the larger of a transformer forward and the VAE."""
    config = models.transformer.config
    tokens = latent_tokens(width, height, frames, references, patch=int(config.patch_size[1]))
    transformer = transformer_activation_bytes(
        tokens, dim=int(config.num_attention_heads) * int(config.attention_head_dim), ffn_dim=int(config.ffn_dim),
        vace_blocks=len(config.vace_layers), batch=2 if batched_guidance else 1, dtype=models.transformer.dtype)
    return max(transformer, vae_peak_bytes(width, height, frames, dtype=models.vae.dtype))


def decode_bytes(models: Any, *, width: int, height: int, frames: int) -> int:
    return vae_peak_bytes(width, height, frames, dtype=models.vae.dtype)


def text_encoding_bytes(models: Any, *, tokens: int = 512) -> int:
    """umT5 on one prompt of up to ``tokens`` tokens: a few [tokens, d_ff] and the [heads, tokens, tokens] scores."""
    if models.text_encoder is None:
        return 0
    config = models.text_encoder.config
    size = _element_size(models.text_encoder.dtype)
    return tokens * (3 * int(config.d_ff) + 6 * int(config.d_model)) * size + \
        int(config.num_heads) * tokens * tokens * 4
