"""What every benchmark shares: the machine line, timing with medians, pairwise runs, the table, RSS probes.

Each script measures one concern and prints one markdown table. Every row is a median over several
runs and carries its target, whether this run met it, the machine and the exact command, so a row
pasted into BENCHMARKS.md says everything needed to reproduce it. Nothing here imports torch: the
planner benchmark must be able to prove that ``plan`` never does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024

#: Nothing a benchmark runs may reach a hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

#: glibc malloc settings that keep freed tensor memory in the process instead of unmapping it. On a
#: VM where a fresh page costs a slow fault (this one: Firecracker), every large temporary tensor
#: otherwise pays page faults; BENCHMARKS.md says which runs used them. They change no result.
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


# --------------------------------------------------------------------------- rows and tables


@dataclass
class Row:
    """One measured case: ``value`` is the median of ``runs`` runs, in ``unit``.

    ``target`` is the goal as text (e.g. ``"> 5000"``); ``met`` is None when the row has no target.
    """

    case: str
    value: float
    unit: str
    runs: int
    target: str = ""
    met: bool | None = None
    note: str = ""


def format_value(value: float, unit: str) -> str:
    """Three significant figures, plainly written (no exponents for the sizes benchmarks see)."""
    if value != value:  # NaN: not measured
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def _met_text(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "**no**")


def format_table(title: str, rows: Sequence[Row], *, machine: str, command: str) -> str:
    """A markdown table: one line per row, each with the machine and the command that produced it."""
    lines = [
        f"### {title}",
        "",
        "| case | median | runs | target | met | notes | machine | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row.case, format_value(row.value, row.unit), str(row.runs), row.target, _met_text(row.met),
                 row.note, machine, f"`{command}`"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(title: str, rows: Sequence[Row], *, machine: str, command: str, out: TextIO | None = None) -> str:
    text = format_table(title, rows, machine=machine, command=command)
    (out or sys.stdout).write(text)
    (out or sys.stdout).flush()
    return text


# --------------------------------------------------------------------------- machine and command


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().total / 1024**3
    except ImportError:
        return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_summary(device: str | None = None) -> str:
    """CPU, cores, RAM, Python and library versions; ``device`` (e.g. the GPU name) when not the CPU.

    Versions come from package metadata, so describing the machine never imports torch.
    """
    memory = _memory_gib()
    parts = [_cpu_name(), f"{os.cpu_count()} cores"]
    if memory is not None:
        parts.append(f"{memory:.0f} GiB")
    parts += [f"{platform.system()} py{platform.python_version()}", f"torch {_version('torch')}",
              f"diffusers {_version('diffusers')}"]
    parts.append(device or "cpu")
    return ", ".join(parts)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The exact command that reproduces a run: ``python -m bench.<name> <args>`` from the repo root."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = [f"{key}={os.environ[key]}" for key in MALLOC_TUNING if key in os.environ]
    return " ".join([*env, "python", "-m", module, *(shlex.quote(a) for a in args)])


def base_parser(description: str, *, clock: bool = False) -> argparse.ArgumentParser:
    """The flags every bench shares; ``clock``: the script times arms with :func:`interleaved` and takes ``--clock``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few runs: checks the script works, the numbers mean nothing")
    parser.add_argument("--repeats", type=int, default=None, help="runs per case (median reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a machine shared with other jobs, OpenMP threads "
                             "spin-waiting on a descheduled sibling make steps up to 50x slower, see BENCHMARKS.md)")
    if clock:
        parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                            help="time arms by wall clock, or by this process's CPU seconds (with --threads 1: "
                                 "immune to other jobs' load on a shared machine)")
    return parser


def chosen_clock(args: argparse.Namespace) -> Callable[[], float]:
    """The timer ``--clock`` names."""
    return cpu_clock if getattr(args, "clock", "wall") == "cpu" else time.perf_counter


def set_torch_threads(count: int) -> None:
    """Fix torch's CPU thread count for the run (both arms of every comparison share it)."""
    import torch

    torch.set_num_threads(max(1, count))


# --------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved(arms: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Time several arms in turns (A, B, C, then B, C, A, ...), so drifting machine load hits all alike.

    Each round runs every arm once; the starting arm rotates, so the caches a predecessor warms
    favour no arm overall. Ratios are then taken per round (:func:`pair_ratios`). ``clock``:
    wall time by default; :func:`cpu_clock` counts only this process's CPU seconds.
    """
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            arms[name]()
            times[name].append(clock() - start)
    return times


def cpu_clock() -> float:
    """This process's CPU seconds (user + system, all threads).

    On a machine shared with other jobs, wall time also counts the time the process waits for a
    core (a neighbour's load spike can double one arm's round); with one torch thread, CPU
    seconds count only the work. With several threads it would also count spin-waiting.
    """
    return time.process_time()


def pair_ratios(times_a: Sequence[float], times_b: Sequence[float]) -> list[float]:
    """Per-round ratios A/B; their median is robust to a round that a neighbour's load spike hit."""
    return [a / b for a, b in zip(times_a, times_b, strict=True)]


# --------------------------------------------------------------------------- child processes


def run_child(args: Sequence[str], *, timeout: float = 600, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python <args>`` from the repo root in a fresh process; its last stdout line is JSON.

    A fresh process per measurement means nothing loaded earlier (allocator pools, imported
    modules, page-cache mappings) distorts a memory or cold-start figure.
    """
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"child {' '.join(args)} printed nothing")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- resident memory (Linux)


def _status_bytes() -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def rss_bytes() -> int:
    """Current resident set (anonymous + file-backed + shared) of this process."""
    return _status_bytes()["VmRSS"]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next peak is this phase's alone."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak RSS of this process during a ``with`` block, relative to its start.

    Two views: the kernel's high-water mark (VmHWM, exact, reset at entry) and a 1 ms sampler of the
    anonymous part (RssAnon: memory a load really allocates, as opposed to safetensors' file pages
    mapped read-only, which the kernel can drop at will).
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.start_rss = self.start_anon = 0
        self.peak_rss = self.peak_anon = 0
        self.end_rss = self.end_anon = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.exact = False

    def _sample(self) -> None:
        while not self._stop.is_set():
            status = _status_bytes()
            self.peak_anon = max(self.peak_anon, status["RssAnon"])
            self.peak_rss = max(self.peak_rss, status["VmRSS"])
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        status = _status_bytes()
        self.start_rss, self.start_anon = status["VmRSS"], status["RssAnon"]
        self.peak_rss, self.peak_anon = self.start_rss, self.start_anon
        self.exact = reset_peak_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        status = _status_bytes()
        self.end_rss, self.end_anon = status["VmRSS"], status["RssAnon"]
        if self.exact:
            self.peak_rss = max(self.peak_rss, status["VmHWM"])
        self.peak_anon = max(self.peak_anon, self.end_anon)

    @property
    def peak_delta(self) -> int:
        """Peak RSS above the level at entry: what the block itself needed at its worst."""
        return self.peak_rss - self.start_rss

    @property
    def peak_anon_delta(self) -> int:
        return self.peak_anon - self.start_anon

    def as_dict(self) -> dict[str, int]:
        return {"start_rss": self.start_rss, "peak_rss": self.peak_rss, "end_rss": self.end_rss,
                "start_anon": self.start_anon, "peak_anon": self.peak_anon, "end_anon": self.end_anon,
                "exact_hwm": int(self.exact)}
