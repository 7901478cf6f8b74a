"""Working memory the VACE Sampler asks ComfyUI to keep free beside the weights (``memory_required``).

ComfyUI's ``load_models_gpu(models, memory_required=...)`` offloads other models until the weights
plus this reserve fit. The sampling figure is the runtime's own accounting
(``unison_runtime.memory_estimate``, the one the CLI and the node's preflight use): the largest of
the VAE encode, the transformer's forward and the decode, minus the weights. It agrees with a CPU
measurement of the Wan VAE at the released shapes (~21-22 KB per output pixel in fp32 decoding
256x128 and 256x256 frames; the estimate says 23.5 KB). Computed, not measured on a GPU.
"""

from __future__ import annotations

from typing import Any

from ._runtime import runtime_module

_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def footprint(models: Any) -> Any:
    """Weight bytes and configs of loaded VACE models (each distinct tensor once)."""
    return runtime_module("memory_estimate").footprint_from_models(models)


def run_settings(models: Any, options: Any, references: int) -> Any:
    """The choices that change the working set, for the stage where the transformer and VAE run alone."""
    memory = runtime_module("memory_estimate")
    return memory.RunSettings(
        device=str(models.device), text_device="cpu",  # umT5 is not loaded beside them (staged)
        transformer_dtype=_DTYPE_NAMES.get(str(models.transformer.dtype), "fp32"),
        vae_dtype=_DTYPE_NAMES.get(str(models.vae.dtype), "fp32"), batch_cfg=options.batch_cfg,
        guidance=options.guidance, vae_tiling=options.vae_tiling, num_references=references)


def sampling_bytes(plan: Any, weights: Any, settings: Any) -> int:
    """Peak bytes of one VACE Sampler run beside the transformer and VAE weights (encode, sample or decode)."""
    estimate = runtime_module("memory_estimate").estimate_run(plan, weights, settings, runtime=False)
    resident = weights.transformer + weights.vae + weights.projector
    return max(0, max(estimate.phases[phase] for phase in ("encoding", "sampling", "decoding")) - resident)


def text_encoding_bytes(models: Any, *, tokens: int = 512) -> int:
    """umT5 on one prompt of up to ``tokens`` tokens: a few [tokens, d_ff] and the [heads, tokens, tokens] scores."""
    import torch

    if models.text_encoder is None:
        return 0
    config = models.text_encoder.config
    size = torch.empty((), dtype=models.text_encoder.dtype).element_size()
    return tokens * (3 * int(config.d_ff) + 6 * int(config.d_model)) * size + \
        int(config.num_heads) * tokens * tokens * 4
