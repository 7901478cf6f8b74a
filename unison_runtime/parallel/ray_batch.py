"""``run --batch FILE --out DIR/ --ray [ADDRESS]``: the lines of a batch on a Ray cluster.

One actor per GPU in the cluster (``num_gpus=1``; Ray gives each its own card), or ``--workers N``
CPU actors where there is no GPU. Each actor is a :class:`~.batch.BatchWorker`: it loads its models
on its first line and keeps them for the next. The driver hands each idle actor the next line,
writes each result into ``DIR/<id>/`` (so workers on other nodes need no shared file system for
results; models and ``--input-dir`` media must be at the same paths on every node), and applies
the batch's retry rule: a line whose actor died (killed, out of host memory, node lost) is tried
again on a fresh actor, once.

Ray is imported only here, so the pack never needs it otherwise (``pip install 'unison[cluster]'``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..errors import UnisonError
from .batch import ATTEMPTS, BatchItem, BatchPlan, BatchProgress, ItemResult, finish_summary, record_outcome
from .cli import ray_address


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UnisonError("--ray needs Ray, which is not installed: pip install 'unison[cluster]' (or pip install "
                          "ray), or leave --ray out to run the batch in this process") from None
    return ray


class _Actor:
    """The Ray actor: a BatchWorker made on the first line (so a failing load is that line's error)."""

    def __init__(self, args: Any, name: str, before_item: Callable[[str], None] | None) -> None:
        self.args, self.name, self.before_item = args, name, before_item
        self.worker: Any = None

    def run_item(self, item: BatchItem) -> ItemResult:
        if self.worker is None:
            from .batch import BatchWorker

            try:
                self.worker = BatchWorker(self.args, self.name, self.before_item)
            except Exception as exc:
                refused = isinstance(exc, UnisonError)
                return ItemResult(id=item.id, error=f"{type(exc).__name__}: {exc}", retryable=not refused,
                                  worker=self.name)
        return self.worker.run_item(item)

    def pid(self) -> int:
        import os

        return os.getpid()


def worker_count(ray: Any, requested: int | None) -> tuple[int, bool]:
    """(actors, one GPU each?): one per GPU in the cluster, else ``--workers`` (default 1) CPU actors."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return (min(requested, gpus) if requested else gpus), True
    return (requested or 1), False


def run_ray_batch(args: Any, plan: BatchPlan, out_dir: Path, out: TextIO, *,
                  before_item: Callable[[str], None] | None = None) -> int:
    """Run ``plan.todo`` on Ray; connects (``--ray ADDRESS``, or a local cluster) unless Ray is already initialised
    by the caller, in which case that connection is used and left open."""
    ray = import_ray()
    start = time.perf_counter()
    quiet = bool(getattr(args, "quiet", False))
    connected_here = not ray.is_initialized()
    if connected_here:
        import logging

        ray.init(address=ray_address(args.ray), include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=not quiet)
    try:
        count, on_gpus = worker_count(ray, getattr(args, "workers", None))
        bar = BatchProgress(len(plan.todo), len(plan.skipped), quiet)
        bar.say(f"batch: {count} Ray worker(s), each with {'one GPU' if on_gpus else 'CPU only'}")
        stored, failed = _schedule(ray, args, plan, out_dir, bar, count, on_gpus, before_item)
    finally:
        if connected_here:
            ray.shutdown()
    return finish_summary(args, plan, stored, failed, time.perf_counter() - start, out, workers=count, ray=True)


def _schedule(ray: Any, args: Any, plan: BatchPlan, out_dir: Path, bar: BatchProgress, count: int, on_gpus: bool,
              before_item: Callable[[str], None] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from ray.exceptions import RayActorError

    resources = {"num_gpus": 1} if on_gpus else {"num_cpus": 1}
    actor_class = ray.remote(max_restarts=0, max_task_retries=0, **resources)(_Actor)
    made = 0

    def new_actor() -> Any:
        nonlocal made
        made += 1
        return actor_class.remote(args, f"worker-{made}", before_item)

    queue: list[tuple[BatchItem, int]] = [(item, 1) for item in plan.todo]
    idle = [new_actor() for _ in range(min(count, len(queue)))]
    running: dict[Any, tuple[Any, BatchItem, int]] = {}
    stored: dict[str, Any] = {}
    failed: list[dict[str, Any]] = []
    try:
        while queue or running:
            while queue and idle:
                item, attempt = queue.pop(0)
                actor = idle.pop()
                running[actor.run_item.remote(item)] = (actor, item, attempt)
            done, _ = ray.wait(list(running), num_returns=1)
            actor, item, attempt = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except RayActorError as exc:
                result = ItemResult(id=item.id, error=f"its Ray worker died ({type(exc).__name__})", retryable=True)
                actor = new_actor() if queue or attempt < ATTEMPTS else None
            if not record_outcome(item, result, attempt, plan, out_dir, bar, stored, failed):
                queue.insert(0, (item, attempt + 1))
            if actor is not None:
                idle.append(actor)
    finally:
        for actor in [*idle, *(entry[0] for entry in running.values())]:
            ray.kill(actor)
    return stored, failed
