"""The process group torchrun (or a test) describes in the environment, set up once per process.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for each
process it starts, on one node or many. CPU ranks talk over gloo; GPU ranks over NCCL, with gloo
beside it for the small CPU-side exchanges diffusers makes (``cpu:gloo,cuda:nccl``), each rank on
``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import UnisonError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    local_rank: int
    device: str

    @property
    def leader(self) -> bool:
        """Rank 0 plans, encodes, decodes, writes and prints."""
        return self.rank == 0


def launched_by_torchrun(environ: Any = None) -> bool:
    """True when torchrun (or an equivalent launcher) started this process as one of several."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def rank_from_env(device: str | None = None, environ: Any = None) -> RankInfo:
    """This process's rank, world size and device from torchrun's variables (checked, one clear error)."""
    environ = os.environ if environ is None else environ
    missing = [name for name in _ENV if name not in environ]
    if missing:
        raise UnisonError(f"context parallelism runs under torchrun, which sets {', '.join(missing)}; start it as "
                          "torchrun --nproc-per-node N -m unison_runtime run ...")
    try:
        rank, world, local = (int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as exc:
        raise UnisonError(f"torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers ({exc})") from None
    return RankInfo(rank=rank, world=world, local_rank=local, device=rank_device(device, local))


def rank_device(device: str | None, local_rank: int) -> str:
    """``--device`` for this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process); default: a GPU
    when there is one, else the CPU."""
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UnisonError(f"rank with LOCAL_RANK {local_rank} has no GPU of its own: this node has "
                              f"{torch.cuda.device_count()}; start at most that many processes per node")
        return f"cuda:{local_rank}"
    return device


def backend_for(device: str) -> str:
    """gloo for CPU ranks; NCCL for GPU ranks, gloo beside it for CPU tensors."""
    return "cpu:gloo" if device.startswith("cpu") else "cpu:gloo,cuda:nccl"


def init_process_group(info: RankInfo) -> None:
    """Join the group (a no-op when this process already has one)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if info.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(info.device))
    kwargs: dict[str, Any] = {}
    if info.device.startswith("cuda"):
        kwargs["device_id"] = torch.device(info.device)
    dist.init_process_group(backend_for(info.device), rank=info.rank, world_size=info.world, **kwargs)


def device_mesh(info: RankInfo, ring: int, ulysses: int) -> Any:
    """The ``("ring", "ulysses")`` mesh diffusers' context parallelism runs on, made once per process."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cpu" if info.device.startswith("cpu") else "cuda"
    return init_device_mesh(device_type, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))


def close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
