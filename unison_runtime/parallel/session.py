"""One generation split across the processes torchrun started: the Python API and the CLI command.

In every process (``torchrun --nproc-per-node N your_script.py``)::

    with ContextParallelSession() as session:          # joins the group; Ulysses over all N by default
        if session.leader:                             # rank 0: the ordinary pipeline
            pipeline = UnisonPipeline(vace=session.wrap_loader(lambda: load_vace_diffusers(folder)))
            result = pipeline.run("A red fox in the snow, 480P")
        else:                                          # the others: the transformer alone
            session.follow(lambda: load_vace_diffusers(folder, parts=("transformer",)).transformer)

Rank 0 gives the others the signal to load when its own VACE models load, so a job that needs no
generation (an understanding task) never loads the transformer anywhere else.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from ..errors import UnisonError
from .context import ParallelDegrees, choose_degrees
from .distributed import RankInfo, close_process_group, device_mesh, init_process_group, rank_from_env
from .mirror import Leader, follow


class ContextParallelSession:
    """This process's part in a context-parallel run (see the module docstring).

    ``ulysses`` / ``ring``: the degrees (default: Ulysses over every process); ``device``: as the
    CLI's ``--device`` (``cuda`` means this rank's own GPU). A process group that already exists is
    used and left open; one made here is closed on exit.
    """

    def __init__(self, *, ulysses: int | None = None, ring: int | None = None, device: str | None = None) -> None:
        self.info: RankInfo = rank_from_env(device)
        self.degrees: ParallelDegrees = choose_degrees(self.info.world, ulysses, ring)
        self._owns_group = False
        self._leader: Leader | None = None
        self.mesh: Any = None

    @property
    def leader(self) -> bool:
        return self.info.leader

    @property
    def device(self) -> str:
        return self.info.device

    def __enter__(self) -> ContextParallelSession:
        import torch.distributed as dist

        self._owns_group = not dist.is_initialized()
        init_process_group(self.info)
        self.mesh = device_mesh(self.info, self.degrees.ring, self.degrees.ulysses)
        if self.leader:
            self._leader = Leader(self.info, self.degrees, self.mesh)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._leader is not None:
                self._leader.stop()
        finally:
            if self._owns_group:
                close_process_group()

    # ------------------------------------------------------------------ rank 0

    def prepare_vace(self, models: Any) -> Any:
        """Split loaded VACE models' transformer across the ranks (rank 0; the others load theirs now)."""
        if self._leader is None:
            raise UnisonError("only rank 0 prepares the VACE models; the other ranks call follow()")
        return self._leader.prepare_vace(models)

    def wrap_loader(self, load: Callable[[], Any]) -> Callable[[], Any]:
        """A VACE loader for :class:`~unison_runtime.pipeline.UnisonPipeline` whose models come out split."""
        def load_split() -> Any:
            return self.prepare_vace(load())

        return load_split

    def new_job(self) -> None:
        """Between two generations on rank 0: the others forget the inputs cached from the last one."""
        if self._leader is not None:
            self._leader.new_job()

    @property
    def transformer_calls(self) -> int:
        return self._leader.calls if self._leader is not None else 0

    # ------------------------------------------------------------------ the others

    def follow(self, load_transformer: Callable[[], Any]) -> int:
        """Repeat rank 0's transformer calls until it stops; returns how many were made."""
        if self.leader:
            raise UnisonError("rank 0 runs the pipeline; follow() is for the other ranks")
        return follow(self.info, self.degrees, self.mesh, load_transformer)


# --------------------------------------------------------------------------- CLI


def follower_transformer_loader(args: Any, device: str) -> Callable[[], Any]:
    """The transformer alone, as ``run`` would load it on rank 0 (same files, dtype), on this rank's device."""
    def load() -> Any:
        from ..pipeline import locate_models

        locations = locate_models(args.models)
        if locations.load_vace is None:
            locations.paths.require_generation()
        models = locations.load_vace(parts=("transformer",), device=device, dtype=getattr(args, "vace_dtype", None))
        return models.transformer

    return load


def run_context_parallel(args: Any, out: TextIO, progress: Any) -> int:
    """``torchrun --nproc-per-node N -m unison_runtime run ...``: rank 0 runs the job, the others follow."""
    from ..pipeline import run_cli_job
    from ..progress import Progress

    if getattr(args, "batch", None) is not None:
        raise UnisonError("--batch under torchrun is not supported: torchrun splits one generation across "
                          "processes; for many instructions use run --batch FILE [--ray]")
    session = ContextParallelSession(ulysses=args.ulysses, ring=args.ring, device=getattr(args, "device", None))
    with session:
        if not session.leader:
            try:
                session.follow(follower_transformer_loader(args, session.device))
            except UnisonError:
                raise
            except Exception as exc:  # said with the rank: rank 0 only sees the connection drop
                print(f"error: rank {session.info.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
                raise
            return 0
        args.device = session.device
        progress.note(f"context parallel: {session.info.world} processes ({session.degrees.describe()})")
        report = run_cli_job(args, progress or Progress(), prepare_vace=session.prepare_vace)
        report.setdefault("notes", []).append(
            f"context parallel over {session.info.world} processes ({session.degrees.describe()}), "
            f"{session.transformer_calls} transformer calls")
    out.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    return 0
