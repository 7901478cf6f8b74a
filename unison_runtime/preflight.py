"""Cheap checks that run before anything heavy: output paths, input files, device names, model folders.

A mistake found after a minute of loading (or, worse, after the generation, losing the result)
costs the user that minute. Everything here uses the standard library only, so the CLI can check
its arguments before importing torch; :func:`check_device_available` is the one check that needs
torch, and only for accelerator devices.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UnisonError

DEVICE_PATTERN = re.compile(r"^(cpu|cuda|mps|xpu)(:\d{1,3})?$")
#: A batch line longer than this is refused without being parsed (a prompt is a few KB at most).
MAX_BATCH_LINE = 1_000_000
#: Deeper JSON than this in a batch line is refused before ``json.loads`` could recurse that far.
MAX_JSON_DEPTH = 64


# --------------------------------------------------------------------------- outputs


def writable_folder(folder: Path, what: str) -> Path:
    """``folder`` exists (or can be created) and this process can write in it; nothing is left behind.

    The first existing ancestor must be a folder this process can create a file in (checked by
    creating and removing a temporary one): a path "under" a file, or in a folder without write
    permission or on a read-only mount, is refused here, before any model loads.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UnisonError(f"{what} {folder}: {probe} is a file, not a folder")
    try:  # a real probe: permissions, read-only mounts and ACLs all answer the same way
        with tempfile.TemporaryFile(dir=probe, prefix=".unison-write-check-"):
            pass
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise UnisonError(f"{what} {folder}: cannot write in {probe} ({reason})") from None
    return folder


def output_stem(out: str | Path) -> tuple[Path, bool]:
    """Where ``run --out OUT`` writes, checked: ``(path, inside)``.

    ``OUT`` that is an existing folder, or ends with a slash, is a folder to write in (the file is
    named after the task, ``inside`` is True); otherwise ``OUT`` is the file's path, its suffix
    set from the task. Either way the folder must be writable (checked, not created).
    """
    text = str(out)
    path = Path(out)
    if text.endswith(("/", os.sep)) or path.is_dir():
        writable_folder(path, "--out folder")
        return path, True
    if path.name in ("", ".", ".."):
        raise UnisonError(f"--out {out}: expected a file name or a folder")
    writable_folder(path.parent, "--out folder")
    return path, False


def output_path(out: str | Path, task: str, suffix: str) -> Path:
    """The file ``run`` writes for ``task`` (see :func:`output_stem`); an existing folder there is refused."""
    stem, inside = output_stem(out)
    path = stem / f"{task}{suffix}" if inside else stem.with_suffix(suffix)
    if path.is_dir():
        raise UnisonError(f"--out {out}: {path} is a folder; give a file name or another folder")
    return path


def new_file_target(target: str | Path, *, force: bool, what: str) -> Path:
    """A file about to be written: its folder writable, and no existing file replaced unless ``force``."""
    target = Path(target)
    if target.is_dir():
        raise UnisonError(f"{what} {target} is a folder; expected a file path")
    if target.exists() and not force:
        raise UnisonError(f"{what} {target} already exists; pass --force to overwrite it")
    writable_folder(target.parent, f"{what} folder")
    return target


# --------------------------------------------------------------------------- inputs


def input_file(path: str | Path, what: str) -> Path:
    """An existing, readable regular file (a folder, a missing path or no permission: one clear error)."""
    path = Path(path)
    if not path.exists():
        raise UnisonError(f"{what} {path}: file not found")
    if path.is_dir():
        raise UnisonError(f"{what} {path} is a folder; expected a file")
    if not os.access(path, os.R_OK):
        raise UnisonError(f"{what} {path} cannot be read (permission denied)")
    return path


def input_folder(path: str | Path, what: str, expected: str = "") -> Path:
    """An existing folder; said fast, before any heavy import."""
    path = Path(path)
    if not path.exists():
        raise UnisonError(f"{what} {path} not found" + (f"; expected {expected}" if expected else ""))
    if not path.is_dir():
        raise UnisonError(f"{what} {path} is a file; expected a folder" + (f" ({expected})" if expected else ""))
    return path


def batch_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Each non-blank line of a JSON-lines file as ``(number, text, problem)``.

    Lines are read as bytes and decoded one by one, so a line with bytes that are not UTF-8 is
    that line's problem (``text`` None) and every other line is still planned.
    """
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; opening errors become one clear line
    except OSError as exc:
        raise UnisonError(f"--batch {path} cannot be read ({exc.strerror or exc})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if len(raw) > MAX_BATCH_LINE:
                yield number, None, f"line is {len(raw)} bytes; at most {MAX_BATCH_LINE} are read"
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, f"not UTF-8 text (byte {exc.start + 1} is 0x{raw[exc.start]:02x})"
                continue
            if text.strip():
                yield number, text, None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is too large for a float")
    return value


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the brackets in ``text`` (outside strings) nest at most ``limit`` deep."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return False
        elif char in "]}":
            depth -= 1
    return True


def parse_json_line(text: str) -> Any:
    """Strict JSON: NaN/Infinity and numbers beyond float range are refused, deep nesting too
    (``ValueError`` with the reason), so what is echoed back is always valid JSON."""
    if not json_depth_ok(text):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                      parse_int=_bounded_int)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 100:
        raise ValueError("an integer of more than 100 digits")
    return int(text)


# --------------------------------------------------------------------------- devices


def check_device_name(device: str | None, flag: str) -> str | None:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``xpu[:N]`` (``None``/``auto``: the default)."""
    if device is None or device == "auto":
        return None
    if not DEVICE_PATTERN.match(device):
        raise UnisonError(f"{flag} {device!r}: expected cpu, cuda, cuda:N or mps")
    return device


def check_device_available(device: str | None, flag: str) -> None:
    """The named accelerator exists on this machine (imports torch for cuda/mps/xpu only)."""
    device = check_device_name(device, flag)
    if device is None or device == "cpu":
        return
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UnisonError(f"{flag} {device}: no CUDA GPU is usable on this machine; use cpu")
        if index and int(index) >= count:
            raise UnisonError(f"{flag} {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise UnisonError(f"{flag} {device}: Apple MPS is not available on this machine; use cpu")
    elif kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise UnisonError(f"{flag} {device}: no Intel XPU is usable on this machine; use cpu")
