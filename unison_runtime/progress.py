"""What a long job tells its user while it runs: model loads, stages, a per-step bar, written files.

The engine never prints. :class:`~unison_runtime.pipeline.UnisonPipeline` and the CLI call a
:class:`Progress` object; the default (:class:`Progress` itself) says nothing, so Python callers
and ComfyUI nodes stay silent. :class:`StderrProgress` is what ``python -m unison_runtime`` uses
(``--quiet`` swaps it for the silent one): one line per event on stderr, and a step bar with
elapsed time, seconds per step and ETA. stdout is left to the command's JSON.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

StepFn = Callable[[int, int], None]


def human_size(size: float) -> str:
    """Bytes as ``1.3 GB`` / ``512 MB`` / ``12 KB`` (powers of 1024, one decimal from GB up)."""
    for unit, scale in (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if unit in ("TB", "GB") else f"{value:.0f} {unit}"
    return f"{int(size)} B"


def human_time(seconds: float) -> str:
    """``0:07`` / ``12:30`` / ``1:02:03``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def files_size(paths: Iterable[str | Path | None]) -> int:
    """Total bytes of the files (folders walked) a model loads from; unreadable entries count 0."""
    total = 0
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        try:
            if path.is_dir():
                total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            else:
                total += path.stat().st_size
        except OSError:
            continue
    return total


class Progress:
    """Silent progress: every event is accepted and dropped. Subclass to show them."""

    def stage(self, text: str) -> None:
        """A stage starts (``planning with the rule planner``, ``decoding 81 frames with the VAE``)."""

    def loading(self, what: str, where: str, size: int | None = None) -> None:
        """A model starts loading from ``where`` (``size`` bytes on disk when known)."""

    def loaded(self, what: str, seconds: float) -> None:
        """The model announced by :meth:`loading` is ready."""

    def steps(self, what: str = "sampling") -> StepFn:
        """A ``step(done, total)`` callback for a loop of steps (the sampler's ``progress``)."""
        return lambda done, total: None

    def wrote(self, path: str | Path, what: str = "output") -> None:
        """A file was written."""

    def note(self, text: str) -> None:
        """Something the user should know that is not a stage (a switch turned on by itself)."""

    def info(self, text: str) -> None:
        """A result line, shown as it is (the selftest's line per task)."""


class StderrProgress(Progress):
    """Progress as plain lines on stderr; the step bar redraws in place on a terminal.

    Off a terminal (a log file, a pipe) the bar prints a line on the first and last step and at
    most every ``interval`` seconds in between, so logs stay short.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, interval: float = 5.0,
                 width: int = 24, clock: Callable[[], float] = time.perf_counter) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.interval = interval
        self.width = width
        self.clock = clock
        self._open_bar = False

    def _line(self, text: str) -> None:
        if self._open_bar:
            self.stream.write("\n")
            self._open_bar = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def stage(self, text: str) -> None:
        self._line(f"{text} ...")

    def loading(self, what: str, where: str, size: int | None = None) -> None:
        weight = f", {human_size(size)}" if size else ""
        self._line(f"loading {what} from {where}{weight} ...")

    def loaded(self, what: str, seconds: float) -> None:
        self._line(f"loaded {what} in {seconds:.1f} s")

    def wrote(self, path: str | Path, what: str = "output") -> None:
        self._line(f"wrote {what}: {path}")

    def note(self, text: str) -> None:
        self._line(f"note: {text}")

    def info(self, text: str) -> None:
        self._line(text)

    def steps(self, what: str = "sampling") -> StepFn:
        start = self.clock()
        last_print = [float("-inf")]

        def step(done: int, total: int) -> None:
            now = self.clock()
            text = self.bar(what, done, total, now - start)
            if self.tty:
                self.stream.write("\r" + text)
                self._open_bar = done < total
                if done >= total:
                    self.stream.write("\n")
                self.stream.flush()
            elif done in (1, total) or now - last_print[0] >= self.interval:
                last_print[0] = now
                self._line(text)

        return step

    def bar(self, what: str, done: int, total: int, elapsed: float) -> str:
        """``sampling [######------] 12/50 0:06 elapsed, 0.50 s/step, ETA 0:19``."""
        total = max(total, 1)
        filled = int(self.width * min(done, total) / total)
        per_step = elapsed / done if done > 0 else 0.0
        eta = per_step * (total - done)
        return (f"{what} [{'#' * filled}{'-' * (self.width - filled)}] {done}/{total} "
                f"{human_time(elapsed)} elapsed, {per_step:.2f} s/step, ETA {human_time(eta)}")


def make_progress(quiet: bool, stream: TextIO | None = None) -> Progress:
    """The CLI's choice: silent with ``--quiet``, else lines on stderr."""
    return Progress() if quiet else StderrProgress(stream)
