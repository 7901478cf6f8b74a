"""The VACE Sampler's memory figures, from the runtime's one accounting (``unison_runtime.memory_estimate``).

Two questions, one estimate: the preflight (does this plan fit the device's free memory, before
anything runs; VAE tiling switched on when only the decode would not) and the reserve the Sampler
asks ComfyUI to keep free beside the weights (``load_models_gpu(..., memory_required=...)``, so
ComfyUI offloads umT5 and other models first). The CLI's preflight and staging choice use the
same functions. The VAE figure is derived from the released decoder's shapes per 4-frame chunk
(feature cache + one chunk) and checked on the CPU (BENCHMARKS.md section 7). Computed, not
measured on a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._runtime import runtime_module


def _memory() -> Any:
    return runtime_module("memory_estimate")


def footprint(models: Any) -> Any:
    """Weight bytes (as held: stored fp8 / fp16 at their stored size) and configs of loaded VACE models."""
    return _memory().footprint_from_models(models)


def run_settings(models: Any, options: Any, references: int) -> Any:
    """The choices that change the working set. Staged: umT5 is loaded only to encode and ComfyUI may
    offload it before the transformer and VAE load, so it is not counted beside them."""
    memory = _memory()
    return memory.RunSettings(
        device=str(models.device), text_device="cpu", transformer_dtype=memory.dtype_name(models.transformer.dtype),
        vae_dtype=memory.dtype_name(getattr(models.vae, "dtype", None)), batch_cfg=options.batch_cfg,
        guidance=options.guidance, vae_tiling=options.vae_tiling, num_references=references, low_memory=True,
        text_kv_cache=options.text_kv_cache)


def sampling_bytes(plan: Any, weights: Any, settings: Any) -> int:
    """Peak bytes of one VACE Sampler run beside the transformer and VAE weights (encode, sample or decode)."""
    estimate = _memory().estimate_run(plan, weights, settings, runtime=False)
    resident = weights.transformer + weights.vae + weights.projector
    return max(0, max(estimate.phases[phase] for phase in ("encoding", "sampling", "decoding")) - resident)


def text_encoding_bytes(models: Any, *, tokens: int = 512) -> int:
    """umT5 on one prompt of up to ``tokens`` tokens, beside its weights (0 when umT5 is not loaded)."""
    if models.text_encoder is None:
        return 0
    weights = footprint(models)
    return _memory().text_encoding_bytes(weights.text_config, weights.text_dtype, tokens=tokens)


def preflight(plan: Any, models: Any, options: Any, *, evictable: int = 0) -> tuple[Any, list[str]]:
    """Refuse a plan whose estimated peak does not fit the device's free memory, before it runs.

    A clear node error (``MemoryWontFit``, with the estimate and what to change) instead of a
    server taken down by the OOM killer; the text K/V is recomputed every step, or VAE tiling
    switched on, when that is what it takes to fit. ``evictable``: bytes of models ComfyUI holds on
    the device (ours from an earlier run, others), which it can offload for this run, so they count
    as free.
    """
    references = sum(1 for ref in plan.media if ref.role == "reference")
    settings = run_settings(models, options, references)
    decision = _memory().check_fits(plan, footprint(models), settings, resident=evictable, where="comfyui",
                                    runtime=False)
    notes = []
    if decision.text_kv_switched_off:
        options = dataclasses.replace(options, text_kv_cache=False)
        notes.append("text K/V recomputed every step: keeping it for the run would not fit in the free memory")
    if decision.tiling_switched_on:
        options = dataclasses.replace(options, vae_tiling=True)
        notes.append("VAE tiling switched on: decoding whole frames would not fit in the free memory")
    return options, notes
