"""Rank 0 runs the ordinary pipeline; the other ranks repeat each of its transformer calls.

Context parallelism needs every rank in every transformer forward, with the same full-size
inputs (each rank keeps its own shard). Rather than a second sampling loop on the other ranks,
rank 0's transformer gets a forward pre-hook that broadcasts the call (its tensors and options)
before running it; a *follower* receives and makes the same call on its copy of the transformer.
So whatever rank 0's sampler does (two-pass or batched guidance, a fallback to two passes after
an out-of-memory error, any step count) the others do too, and only rank 0 needs the planner,
umT5, the projector, the VAE and the media: the followers hold the transformer alone.

Inputs that stay the same across calls (the text contexts, the VACE control latents) are sent
once per generation: a tensor is resent when its storage, shape, version counter or checksum
changed. The latents and timestep are sent on every call (a few MB at 480P).

Messages (``broadcast_object_list`` from rank 0): ``load`` (load the transformer now, rank 0
has loaded its own), ``job`` (a new generation: forget cached inputs), ``forward`` (a call
follows), ``stop`` (rank 0 is done).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .context import ParallelDegrees, check_sequence, enable_context_parallel, video_tokens
from .distributed import RankInfo

_TENSOR, _CACHED, _VALUE = "tensor", "cached", "value"


def _send(header: dict[str, Any]) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([header], src=0)


def _receive() -> dict[str, Any]:
    import torch.distributed as dist

    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fingerprint(tensor: Any) -> tuple[Any, ...]:
    """Identity of a tensor's contents as cheaply as possible: where it lives, its version counter, a checksum."""
    import torch

    checksum = float(torch.sum(tensor, dtype=torch.float64)) if tensor.numel() else 0.0
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype), tensor._version,
            checksum)


class Leader:
    """Rank 0's side: announces loads and generations, broadcasts each transformer call, stops the others."""

    #: Inputs worth caching between calls (large and constant over a generation).
    CACHEABLE = ("encoder_hidden_states", "control_hidden_states", "control_hidden_states_scale")

    def __init__(self, info: RankInfo, degrees: ParallelDegrees, mesh: Any) -> None:
        self.info, self.degrees, self.mesh = info, degrees, mesh
        self.config: Any = None
        self._sent: dict[str, tuple[Any, ...]] = {}
        self._handle: Any = None
        self.calls = 0
        self.broken = False  # a collective failed: the others are gone, do not talk to them again

    def prepare_vace(self, models: Any) -> Any:
        """Hook for the pipeline's VACE loader: the followers load their transformer while this one is split."""
        if models.transformer is None:  # a umT5-only load (staged runs): nothing to split
            return models
        self._talk({"op": "load"})
        if self._handle is not None:
            self._handle.remove()
        self.config = enable_context_parallel(models.transformer, self.degrees, mesh=self.mesh)
        self._handle = models.transformer.register_forward_pre_hook(self._broadcast_call, with_kwargs=True)
        self._sent.clear()
        return models

    def new_job(self) -> None:
        self._sent.clear()
        self._talk({"op": "job"})

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if not self.broken:
            self._talk({"op": "stop"})

    def _talk(self, header: dict[str, Any]) -> None:
        try:
            _send(header)
        except BaseException:
            self.broken = True
            raise

    def _broadcast_call(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch
        import torch.distributed as dist

        hidden = kwargs.get("hidden_states", args[0] if args else None)
        check_sequence(self.degrees, video_tokens(module, tuple(hidden.shape)))  # before the others hear of it
        specs: dict[str, Any] = {}
        to_send: list[Any] = []
        for name, value in [*((i, a) for i, a in enumerate(args)), *kwargs.items()]:
            if not isinstance(value, torch.Tensor):
                specs[name] = (_VALUE, value)
                continue
            if name in self.CACHEABLE:
                mark = _fingerprint(value)
                if self._sent.get(name) == mark:
                    specs[name] = (_CACHED,)
                    continue
                self._sent[name] = mark
            specs[name] = (_TENSOR, tuple(value.shape), str(value.dtype).removeprefix("torch."))
            to_send.append(value.contiguous())
        self._talk({"op": "forward", "inputs": specs})
        try:
            for tensor in to_send:
                dist.broadcast(tensor, src=0)
        except BaseException:
            self.broken = True
            raise
        self.calls += 1


def follow(info: RankInfo, degrees: ParallelDegrees, mesh: Any, load_transformer: Callable[[], Any]) -> int:
    """A follower's loop until rank 0 says stop; returns how many transformer calls it made."""
    import torch
    import torch.distributed as dist

    transformer: Any = None
    cached: dict[Any, Any] = {}
    calls = 0
    while True:
        header = _receive()
        op = header["op"]
        if op == "stop":
            return calls
        if op == "load":
            transformer = None
            transformer = load_transformer()
            enable_context_parallel(transformer, degrees, mesh=mesh)
            cached.clear()
        elif op == "job":
            cached.clear()
        elif op == "forward":
            inputs: dict[Any, Any] = {}
            for name, spec in header["inputs"].items():
                if spec[0] == _VALUE:
                    inputs[name] = spec[1]
                elif spec[0] == _CACHED:
                    inputs[name] = cached[name]
                else:
                    tensor = torch.empty(spec[1], dtype=getattr(torch, spec[2]), device=info.device)
                    dist.broadcast(tensor, src=0)
                    inputs[name] = tensor
                    if name in Leader.CACHEABLE:
                        cached[name] = tensor
            if transformer is None:
                raise RuntimeError("rank 0 sent a transformer call before the transformer was loaded")
            args = [inputs.pop(i) for i in sorted(k for k in inputs if isinstance(k, int))]
            with torch.no_grad():
                transformer(*args, **inputs)
            calls += 1
        else:
            print(f"rank {info.rank}: unknown message {op!r} from rank 0", file=sys.stderr)
            return calls
