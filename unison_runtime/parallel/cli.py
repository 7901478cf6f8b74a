"""The scale-out flags of ``python -m unison_runtime run`` and which command they select (no heavy imports).

- under torchrun (``WORLD_SIZE`` > 1): one generation split across the processes
  (:mod:`.session`; ``--ulysses`` / ``--ring`` choose how);
- ``--batch FILE``: every line of a JSON-lines file, in this process (:mod:`.batch`) or, with
  ``--ray [ADDRESS]``, on a Ray cluster (:mod:`.ray_batch`; ``--workers N`` actors).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UnisonError
from .distributed import launched_by_torchrun

LOCAL_RAY = "local"


def _degree(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a degree of 1 or more, got {value}")
    return value


def _workers(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"expected 1 to 4096 workers, got {value}")
    return value


_degree.__name__ = "degree"
_workers.__name__ = "worker count"


def add_scaleout_args(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("scale-out (README: Scale-out)")
    group.add_argument("--batch", type=Path, default=None,
                       help='JSON-lines file of {"id": ..., "prompt": ...}: every line is run, each result in '
                            "OUT/<id>/; a rerun skips ids already done (with --out FOLDER)")
    group.add_argument("--ray", nargs="?", const=LOCAL_RAY, default=None, metavar="ADDRESS",
                       help="with --batch: run the lines on a Ray cluster (ADDRESS, e.g. auto or ray://host:10001; "
                            "none: a local one); needs pip install 'unison[cluster]'")
    group.add_argument("--workers", type=_workers, default=None,
                       help="with --batch --ray: how many workers, each holding its own models (default: one per GPU "
                            "in the cluster, else 1)")
    group.add_argument("--ulysses", type=_degree, default=None,
                       help="under torchrun: Ulysses degree (must divide the attention heads, 12 for 1.3B; "
                            "default: every process)")
    group.add_argument("--ring", type=_degree, default=None,
                       help="under torchrun: ring-attention degree (needs flash-attn; default 1)")


def scaleout_command(args: argparse.Namespace) -> Callable[..., int] | None:
    """The command for these flags, or ``None`` for an ordinary single-process ``run``."""
    if launched_by_torchrun():
        from .session import run_context_parallel

        return run_context_parallel
    if args.ulysses is not None or args.ring is not None:
        raise UnisonError("--ulysses / --ring split one generation across processes started by torchrun: "
                          "torchrun --nproc-per-node N -m unison_runtime run ...")
    if args.batch is None:
        if args.ray is not None or args.workers is not None:
            raise UnisonError("--ray / --workers run a --batch FILE; give --batch prompts.jsonl")
        return None
    if args.instruction is not None:
        raise UnisonError("give either an INSTRUCTION or --batch FILE (not both)")
    if args.workers is not None and args.ray is None:
        raise UnisonError("--workers N needs --ray (without it the batch runs in this process, one line at a time)")
    from .batch import run_batch_command

    return run_batch_command


def ray_address(value: Any) -> str | None:
    """``--ray`` given alone: a local cluster (``None`` for ``ray.init``); else the address as given."""
    return None if value in (None, LOCAL_RAY) else str(value)
