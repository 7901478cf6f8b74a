"""``run --batch prompts.jsonl --out DIR/``: every line of a JSON-lines file, each result in ``DIR/<id>/``.

One line is one job: ``{"id": "fox-01", "prompt": "A red fox in the snow, 480P"}``, optionally with
``seed``, ``steps``, ``guidance``, ``negative_prompt`` for that line (other keys are the user's own
and ignored). Ids are names of folders: letters, digits, ``.``, ``_``, ``-``, at most 100.

**Output layout**: ``DIR/<id>/<task>.png|mp4|txt`` and ``DIR/<id>/result.json`` (the report ``run``
prints, plus what "done" is checked against). ``result.json`` is written last and renamed into
place, so it exists only once the output is whole. An id is *done* when its ``result.json`` reads
back, names an output file that exists with the recorded size, and was made for the same prompt
and settings (a digest of the line's prompt, its overrides and the run's sampling flags): a rerun
skips done ids and redoes ids whose line or flags changed, or whose files were removed.

**Failures**: a line the worker refuses (bad input: a missing medium, an impossible plan) is
reported at once, since running it again cannot change that; anything else (a crash, running out
of memory, a worker lost) is retried once, then reported. The batch goes on either way; the summary
on stdout lists every failure and the exit code is 1 when there was one.

The same :class:`BatchWorker` runs the lines here (one after another, models kept loaded) and in
each Ray actor (:mod:`.ray_batch`); the output folder is written only by the driver, so a Ray
cluster needs no shared file system for results.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from ..errors import OutOfMemory, UnisonError

#: Per-line sampling overrides a batch line may carry, and the type each must have.
OVERRIDES: dict[str, tuple[type, ...]] = {"seed": (int,), "steps": (int,), "guidance": (int, float),
                                          "negative_prompt": (str,)}
#: The flags of ``run`` that change what a line produces (part of the "done" digest).
_OUTPUT_FLAGS = ("steps", "guidance", "shift", "seed", "negative_prompt", "noise_device", "vace_dtype", "model",
                 "lora", "models")
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")
RESULT_NAME = "result.json"
ATTEMPTS = 2  # a failing line is tried at most twice


@dataclass(frozen=True)
class BatchItem:
    """One line to run."""

    id: str
    prompt: str
    line: int
    overrides: dict[str, Any] = field(default_factory=dict)

    def digest(self, settings: dict[str, Any]) -> str:
        """What the result depends on: the prompt, this line's overrides and the run's output flags."""
        data = {"prompt": self.prompt, "overrides": self.overrides, "settings": settings}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class ItemResult:
    """What a worker made of one line: the report and the output file's bytes, or the error."""

    id: str
    report: dict[str, Any] | None = None
    filename: str | None = None
    data: bytes | None = None
    error: str | None = None
    retryable: bool = False
    seconds: float = 0.0
    worker: str = ""


def output_flags(args: Any) -> dict[str, Any]:
    return {name: str(getattr(args, name, None)) for name in _OUTPUT_FLAGS}


# --------------------------------------------------------------------------- reading the file


def read_batch(path: Path) -> tuple[list[BatchItem], list[dict[str, Any]]]:
    """The runnable lines and the problems (one record per bad line, naming the line and what was expected)."""
    from ..preflight import batch_lines, parse_json_line

    items: list[BatchItem] = []
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, text, problem in batch_lines(path):
        where = f"{path}:{number}"
        if problem:
            problems.append({"id": None, "line": number, "error": f"{where}: {problem}"})
            continue
        try:
            record = parse_json_line(text or "")
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc) or "too deeply nested"
            problems.append({"id": None, "line": number, "error": f"{where}: not valid JSON ({reason})"})
            continue
        item, error = _item(record, number, where)
        if item is not None and item.id in seen:
            item, error = None, f"{where}: id {item.id!r} was already used on line {seen[item.id]}"
        if item is None:
            raw_id = record.get("id") if isinstance(record, dict) else None
            problems.append({"id": raw_id if isinstance(raw_id, (str, int)) else None, "line": number,
                             "error": error})
            continue
        seen[item.id] = number
        items.append(item)
    return items, problems


def _item(record: Any, number: int, where: str) -> tuple[BatchItem | None, str]:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or "id" not in record:
        return None, f'{where}: expected {{"id": ..., "prompt": "..."}}'
    raw_id = record["id"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        return None, f"{where}: id must be a string or an integer"
    item_id = str(raw_id)
    if not ID_PATTERN.match(item_id) or item_id in (".", ".."):
        return None, (f"{where}: id {item_id!r} cannot name a folder: use letters, digits, '.', '_', '-' "
                      "(at most 100, not starting with '.')")
    overrides = {}
    for name, kinds in OVERRIDES.items():
        if name in record:
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, kinds):
                expected = " or ".join(kind.__name__ for kind in kinds)
                return None, f"{where}: {name} must be {expected}, got {value!r}"
            overrides[name] = value
    return BatchItem(id=item_id, prompt=record["prompt"], line=number, overrides=overrides), ""


# --------------------------------------------------------------------------- the output folder


def is_done(out: Path, item: BatchItem, digest: str) -> bool:
    """``out/<id>/result.json`` was written for this line and settings, and its output is whole."""
    folder = out / item.id
    try:
        record = json.loads((folder / RESULT_NAME).read_text(encoding="utf-8"))
        output = folder / record["file"]
        return record.get("digest") == digest and output.is_file() and output.stat().st_size == record["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def store_result(out: Path, item: BatchItem, result: ItemResult, digest: str) -> Path:
    """Write the output, then ``result.json`` (each under a temporary name, renamed into place)."""
    folder = out / item.id
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(result.filename or "").name
    if not name:
        raise UnisonError(f"batch line {item.line} ({item.id}): the worker returned no output file name")
    path = folder / name
    _write_atomically(path, result.data or b"")
    report = dict(result.report or {})
    report["path"] = str(path)
    record = {"id": item.id, "line": item.line, "file": name, "bytes": len(result.data or b""), "digest": digest,
              "seconds": round(result.seconds, 3), "worker": result.worker, "report": report}
    _write_atomically(folder / RESULT_NAME, (json.dumps(record, ensure_ascii=False, indent=2) + "\n").encode())
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- the worker


class BatchWorker:
    """Runs lines one at a time with one pipeline whose models stay loaded (here, or inside a Ray actor).

    ``before_item(id)`` is called before each line (tests use it to kill a worker mid-batch).
    """

    def __init__(self, args: Any, name: str = "local", before_item: Callable[[str], None] | None = None) -> None:
        from ..pipeline import pipeline_from_args, sampling_options_from_args
        from ..progress import Progress

        self.args = args
        self.name = name
        self.before_item = before_item
        self.progress = Progress()
        self.pipeline, self.locations = pipeline_from_args(args, self.progress)
        self.options = sampling_options_from_args(args)

    def run_item(self, item: BatchItem) -> ItemResult:
        start = time.perf_counter()
        try:
            if self.before_item is not None:
                self.before_item(item.id)
            report, name, data = self._run(item)
            return ItemResult(id=item.id, report=report, filename=name, data=data,
                              seconds=time.perf_counter() - start, worker=self.name)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            refused = isinstance(exc, UnisonError) and not isinstance(exc, OutOfMemory)
            what = "" if isinstance(exc, UnisonError) else f"{type(exc).__name__}: "
            return ItemResult(id=item.id, error=f"{what}{_one_line(exc)}", retryable=not refused,
                              seconds=time.perf_counter() - start, worker=self.name)

    def _run(self, item: BatchItem) -> tuple[dict[str, Any], str, bytes]:
        from ..pipeline import (
            OUTPUT_SUFFIX,
            _memory_preflight,
            choose_cli_memory,
            require_answer,
            result_report,
            write_result,
        )

        pipeline, args = self.pipeline, self.args
        options = replace(self.options, **item.overrides)
        instruction, media = pipeline.read(item.prompt)
        plan = pipeline.make_plan(instruction)
        if plan.output != "text":
            if self.locations.load_vace is None:
                self.locations.paths.require_generation()
            resident = replace_args(args, low_memory=bool(getattr(args, "low_memory", None)))
            choice = choose_cli_memory(resident, self.locations, plan)  # models stay loaded between lines
            options = replace(options, batch_cfg=choice.batch_cfg)
            if not getattr(args, "no_memory_check", False):
                options = _memory_preflight(args, plan, self.locations, options, self.progress, staged=False)
        result = pipeline.run_read(instruction, media, plan=plan, options=options)
        require_answer(result, args)
        with tempfile.TemporaryDirectory(prefix="unison-batch-") as scratch:
            path = write_result(result, Path(scratch) / f"{plan.task.value}{OUTPUT_SUFFIX[result.output]}",
                                exact=True)
            data = path.read_bytes()
        return result_report(result, item_id=item.id), path.name, data

    def release(self) -> None:
        self.pipeline.release()


def replace_args(args: Any, **changes: Any) -> Any:
    import argparse

    values = dict(vars(args))
    values.update(changes)
    return argparse.Namespace(**values)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines)[:500] if lines else type(exc).__name__


# --------------------------------------------------------------------------- the batch


@dataclass
class BatchPlan:
    """What a batch run is about to do: lines to run, lines already done, bad lines."""

    items: list[BatchItem]
    todo: list[BatchItem]
    skipped: list[BatchItem]
    problems: list[dict[str, Any]]
    digests: dict[str, str]


def plan_batch(args: Any) -> BatchPlan:
    from ..preflight import input_file

    input_file(args.batch, "--batch file")
    items, problems = read_batch(args.batch)
    settings = output_flags(args)
    digests = {item.id: item.digest(settings) for item in items}
    out = batch_folder(args.out)
    todo = [item for item in items if not is_done(out, item, digests[item.id])]
    skipped = [item for item in items if item not in todo]
    return BatchPlan(items=items, todo=todo, skipped=skipped, problems=problems, digests=digests)


def batch_folder(out: Path) -> Path:
    """``--out`` of a batch: a folder (made if missing) holding one folder per id."""
    from ..preflight import writable_folder

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UnisonError(f"--out {out} is a file: a batch writes one folder per id in the --out folder")
    writable_folder(path, "--out folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


class BatchProgress:
    """One line per finished line on stderr: ``[3/10] fox-01 done in 12.3 s ...; ETA 1:30``."""

    def __init__(self, total: int, skipped: int, quiet: bool, stream: TextIO | None = None) -> None:
        self.total, self.finished, self.quiet = total, 0, quiet
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        if skipped:
            self.say(f"batch: {skipped} id(s) already done, skipped")
        self.say(f"batch: {total} line(s) to run")

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def item(self, item: BatchItem, text: str, *, final: bool = True) -> None:
        from ..progress import human_time

        if final:
            self.finished += 1
        elapsed = time.perf_counter() - self.start
        eta = ""
        if final and self.finished < self.total:
            eta = f"; ETA {human_time(elapsed / self.finished * (self.total - self.finished))}"
        self.say(f"batch: [{self.finished}/{self.total}] {item.id}: {text}{eta}")


def finish_summary(args: Any, plan: BatchPlan, stored: dict[str, dict[str, Any]],
                   failed: list[dict[str, Any]], seconds: float, out: TextIO, **extra: Any) -> int:
    """The summary JSON on stdout; exit code 1 when any line failed."""
    from ..__main__ import EXIT_OK, EXIT_PARTIAL

    failures = [*plan.problems, *failed]
    summary = {"batch": str(args.batch), "out": str(batch_folder(args.out)), "lines": len(plan.items) +
               len(plan.problems), "done": len(stored), "skipped": [item.id for item in plan.skipped],
               "failed": failures, "results": [stored[item.id] for item in plan.todo if item.id in stored],
               "seconds": round(seconds, 3), **extra}
    out.write(json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    return EXIT_OK if not failures else EXIT_PARTIAL


def run_items(plan: BatchPlan, run_one: Callable[[BatchItem], ItemResult], out_dir: Path,
              progress: BatchProgress) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Run ``plan.todo`` one at a time with ``run_one`` (retrying as the module docstring says)."""
    stored: dict[str, dict[str, Any]] = {}
    failed: list[dict[str, Any]] = []
    for item in plan.todo:
        for attempt in range(1, ATTEMPTS + 1):
            result = run_one(item)
            if record_outcome(item, result, attempt, plan, out_dir, progress, stored, failed):
                break
    return stored, failed


def record_outcome(item: BatchItem, result: ItemResult, attempt: int, plan: BatchPlan, out_dir: Path,
                   progress: BatchProgress, stored: dict[str, dict[str, Any]], failed: list[dict[str, Any]]) -> bool:
    """Store a success or record a failure; False when the line should be tried again."""
    if result.error is None:
        path = store_result(out_dir, item, result, plan.digests[item.id])
        task = (result.report or {}).get("task", "?")
        stored[item.id] = {"id": item.id, "task": task, "path": str(path), "seconds": round(result.seconds, 3),
                           "attempts": attempt, "worker": result.worker}
        progress.item(item, f"{task} in {result.seconds:.1f} s -> {path}"
                      + (f" (attempt {attempt})" if attempt > 1 else ""))
        return True
    if result.retryable and attempt < ATTEMPTS:
        progress.item(item, f"failed ({result.error}); trying again", final=False)
        return False
    failed.append({"id": item.id, "line": item.line, "error": result.error, "attempts": attempt})
    progress.item(item, f"FAILED after {attempt} attempt(s): {result.error}")
    return True


def run_batch_command(args: Any, out: TextIO, progress: Any) -> int:
    """``run --batch FILE --out DIR/ [--ray [ADDRESS]]``."""
    plan = plan_batch(args)
    out_dir = batch_folder(args.out)
    if args.ray is not None:
        from .ray_batch import run_ray_batch

        return run_ray_batch(args, plan, out_dir, out)
    start = time.perf_counter()
    bar = BatchProgress(len(plan.todo), len(plan.skipped), bool(getattr(args, "quiet", False)))
    worker: BatchWorker | None = None
    try:
        if plan.todo:
            worker = BatchWorker(args)
        stored, failed = run_items(plan, worker.run_item if worker else _nothing, out_dir, bar)
    finally:
        if worker is not None:
            worker.release()
    return finish_summary(args, plan, stored, failed, time.perf_counter() - start, out, workers=1)


def _nothing(item: BatchItem) -> ItemResult:  # pragma: no cover - never called: nothing to run
    raise AssertionError(item)
