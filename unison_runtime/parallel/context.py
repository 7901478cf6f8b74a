"""Context parallelism for the Wan2.1-VACE transformer with diffusers' own machinery.

diffusers (0.42) splits a model's sequence across processes from a *context-parallel plan*: which
module inputs or outputs to split along which dimension, and which output to gather.
``WanTransformer3DModel`` ships one (``_cp_plan``); ``WanVACETransformer3DModel`` does not, and
Wan's plan would be wrong for it: the VACE blocks run *before* ``blocks.0`` and add their hints to
the main blocks' hidden states, so the hints must be split exactly like the video tokens.
:func:`vace_cp_plan` splits

- the rotary embeddings (``rope`` outputs, sequence dimension 1),
- ``vace_blocks.0``'s ``hidden_states`` and ``control_hidden_states`` (the patched control
  latents, padded to the video's length by the model): every hint the VACE blocks return is then
  a shard aligned with the video shard it is added to,
- ``blocks.0``'s ``hidden_states``,

and gathers ``proj_out``'s output. The text context is not split: cross-attention runs each
rank's query shard against the whole text (Wan's processor passes no parallel config there).
The timestep is one value per sample in Wan 2.1 and needs no split.

Only the self-attention is distributed: Ulysses (all-to-all, heads split across ranks; the degree
must divide the head count) or ring attention (key/value shards passed round; needs an attention
backend that returns log-sum-exp, i.e. flash-attn here, not PyTorch SDPA). A sequence that does
not split evenly is refused (:func:`check_sequence`).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import UnisonError

log = logging.getLogger(__name__)

#: Attention backends whose diffusers forward op returns the log-sum-exp ring attention needs.
RING_BACKENDS = ("flash", "flash_hub", "_flash_3_hub", "_native_cudnn", "_native_flash", "sage", "sage_hub")


def vace_cp_plan() -> dict[str, Any]:
    """The context-parallel plan for ``WanVACETransformer3DModel`` (see the module docstring)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    def split(dims: int, *, output: bool = False) -> Any:
        return ContextParallelInput(split_dim=1, expected_dims=dims, split_output=output)

    return {
        "rope": {0: split(4, output=True), 1: split(4, output=True)},
        "vace_blocks.0": {"hidden_states": split(3), "control_hidden_states": split(3)},
        "blocks.0": {"hidden_states": split(3)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


@dataclass(frozen=True)
class ParallelDegrees:
    """How the sequence is split: ``ulysses * ring`` processes."""

    ulysses: int = 1
    ring: int = 1

    @property
    def world(self) -> int:
        return self.ulysses * self.ring

    def describe(self) -> str:
        parts = [f"Ulysses {self.ulysses}"] if self.ulysses > 1 else []
        parts += [f"ring {self.ring}"] if self.ring > 1 else []
        return " x ".join(parts) or "none"


def choose_degrees(world_size: int, ulysses: int | None = None, ring: int | None = None) -> ParallelDegrees:
    """The degrees for ``world_size`` processes: by default all Ulysses; given ones must multiply to it."""
    if world_size < 2:
        raise UnisonError(f"context parallelism needs at least 2 processes; this run has {world_size} "
                          "(start it with torchrun --nproc-per-node N)")
    for name, value in (("--ulysses", ulysses), ("--ring", ring)):
        if value is not None and value < 1:
            raise UnisonError(f"{name} {value}: expected a degree of 1 or more")
    if ulysses is None and ring is None:
        ulysses, ring = world_size, 1
    elif ulysses is None:
        ulysses = world_size // ring if world_size % ring == 0 else 0
    elif ring is None:
        ring = world_size // ulysses if world_size % ulysses == 0 else 0
    if not ulysses or not ring or ulysses * ring != world_size:
        raise UnisonError(f"--ulysses {ulysses or '?'} x --ring {ring or '?'} must equal the {world_size} processes "
                          "torchrun started")
    return ParallelDegrees(ulysses=ulysses, ring=ring)


def check_degrees(transformer: Any, degrees: ParallelDegrees) -> None:
    """Refuse a split this transformer cannot run, with the degrees that would work."""
    heads = int(transformer.config.num_attention_heads)
    if degrees.ulysses > 1 and heads % degrees.ulysses:
        fits = [d for d in range(2, heads + 1) if heads % d == 0]
        raise UnisonError(f"Ulysses degree {degrees.ulysses} does not divide the transformer's {heads} attention "
                          f"heads (each rank computes whole heads); use a Ulysses degree of {', '.join(map(str, fits))}"
                          ", or --ring for the rest of the processes")
    backend = _attention_backend(transformer)
    if degrees.ring > 1 and backend not in RING_BACKENDS:
        raise UnisonError(f"ring attention needs an attention backend that returns the log-sum-exp (flash-attn on a "
                          f"GPU); this transformer attends with {backend!r} (PyTorch SDPA): use Ulysses instead "
                          f"(--ulysses {degrees.world}, which must divide the {heads} heads)")
    if getattr(transformer, "is_cache_enabled", False):
        raise UnisonError("diffusers' cache hooks (first-block cache, ...) are on for this transformer: with context "
                          "parallelism each rank would decide to skip blocks from its own shard and the ranks would "
                          "drift apart; turn caching off for context-parallel runs")


def _attention_backend(transformer: Any) -> str:
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend
            return str(getattr(backend, "value", backend) or "native")
    return "native"


@contextmanager
def _quiet_experimental_notice() -> Any:
    """diffusers warns on every rank that ``enable_parallelism`` is experimental; said once in our docs instead."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextmanager
def _device_index_on_cpu(device_type: str) -> Any:
    """diffusers 0.42 names each rank's device ``rank % torch.accelerator.device_count()``, which divides by
    zero where there is no accelerator; on CPU ranks the count is 1 (``cpu:0``) while the model is set up."""
    import torch

    if device_type != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = original  # type: ignore[assignment]


def enable_context_parallel(transformer: Any, degrees: ParallelDegrees, *, mesh: Any = None) -> Any:
    """Split ``transformer``'s sequence across the process group (already initialised); returns the config.

    ``mesh``: a ``("ring", "ulysses")`` device mesh made once per process (:func:`.distributed.device_mesh`),
    so loading the transformer again does not make new process groups.
    """
    import torch
    from diffusers.models._modeling_parallel import ContextParallelConfig

    check_degrees(transformer, degrees)
    config = ContextParallelConfig(ulysses_degree=degrees.ulysses, ring_degree=degrees.ring, mesh=mesh)
    device_type = torch.device(next(transformer.parameters()).device).type
    with _quiet_experimental_notice(), _device_index_on_cpu(device_type):
        transformer.enable_parallelism(config=config, cp_plan=vace_cp_plan())
    _check_self_attention_parallel(transformer)
    # torch's functional all-gather that diffusers' gather hook calls is deprecated in favour of a
    # renamed twin; the warning would print on every rank at every step.
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)
    return config


def _check_self_attention_parallel(transformer: Any) -> None:
    """Every self-attention processor must carry the parallel config, or its rank would attend to its shard
    only (a processor wrapped by another feature, e.g. a cache, that hides ``_parallel_config``)."""
    missing = [name for name, module in transformer.named_modules()
               if name.endswith("attn1") and getattr(getattr(module, "processor", None), "_parallel_config", None)
               is None]
    if missing:
        raise UnisonError(f"context parallelism could not reach the self-attention of {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}: its attention processor was replaced by one "
                          "without diffusers' _parallel_config; enable context parallelism on the plain model")


def check_sequence(degrees: ParallelDegrees, tokens: int) -> None:
    """Refuse a sequence of ``tokens`` video tokens that does not split evenly across the ranks.

    diffusers' even split asserts divisibility. Its "anything" modes split unevenly, but gather
    the uneven shards with an uneven ``all_gather``, which gloo refuses (checked on CPU: "invalid
    tensor size") and which was not verified on NCCL here; so an uneven sequence is refused with
    the sizes that work rather than tried. Wan makes ``(latent frames + references) x (H/16) x
    (W/16)`` tokens: 832x480 gives 1560 per latent frame, which 2, 3, 4, 6, 8 and 12 divide.
    """
    world = degrees.world
    if tokens % world:
        raise UnisonError(f"this job's {tokens} video tokens do not split evenly across {world} processes "
                          "(tokens = (latent frames + reference images) x height/16 x width/16): choose a size "
                          f"or length whose token count {world} divides, or another process count")


def video_tokens(transformer: Any, hidden_states_shape: tuple[int, ...]) -> int:
    """How many tokens the transformer makes of latents ``[B, C, F, H, W]`` (1x2x2 patches for Wan)."""
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, frames, height, width = hidden_states_shape
    return (frames // p_t) * (height // p_h) * (width // p_w)
