"""The speed options as command-line flags and files (no torch import: ``plan`` starts without it).

See :mod:`.speed` for what each option does; ``run --help`` lists the flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import UnisonError

#: The caches ``SamplingOptions.cache`` accepts (``none`` = off); fastercache is listed to be refused with its reason.
CACHES = ("none", "first_block", "magcache", "taylorseer", "pab", "fastercache")


def add_speed_arguments(run: argparse.ArgumentParser) -> None:
    """``run``'s speed flags (issue 19)."""
    group = run.add_argument_group("speed (stage two)")
    group.add_argument("--cache", default=None, choices=CACHES,
                       help="skip transformer work on steps that change little (diffusers' caches; default none). "
                            "Presets for Wan 2.1 1.3B and their sources: README, 'Speed options'")
    group.add_argument("--cache-threshold", type=float, default=None, metavar="X",
                       help="the cache's main setting (first_block/magcache: threshold, 0 = never skip; "
                            "taylorseer: cache interval; pab: attention skip range; 1 = never skip); default: preset")
    group.add_argument("--cache-ratios", type=Path, default=None, metavar="FILE",
                       help="MagCache magnitude ratios (JSON from --calibrate-cache); default: the published "
                            "Wan2.1 T2V-1.3B ratios")
    group.add_argument("--calibrate-cache", type=Path, default=None, metavar="FILE",
                       help="with --cache magcache: measure this model's magnitude ratios during the run (nothing "
                            "is skipped) and write them to FILE for --cache-ratios")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the repeated transformer blocks (regional compilation; the first steps "
                            "are slow while it compiles)")
    group.add_argument("--no-text-kv-cache", action="store_true",
                       help="recompute the cross-attention text keys/values every step (they are computed once per "
                            "run by default: same result, less work, more memory)")


def speed_values(args: Any) -> dict[str, Any]:
    """``SamplingOptions`` fields from the parsed flags (files read here; errors name the flag)."""
    values: dict[str, Any] = {}
    cache = getattr(args, "cache", None)
    if cache is not None:
        values["cache"] = cache
    if getattr(args, "cache_threshold", None) is not None:
        values["cache_threshold"] = args.cache_threshold
    if getattr(args, "cache_ratios", None) is not None:
        values["cache_ratios"] = read_calibration(args.cache_ratios)
    calibrate = getattr(args, "calibrate_cache", None)
    if calibrate is not None:
        folder = Path(calibrate).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UnisonError(f"--calibrate-cache {calibrate}: the folder {folder} does not exist or is not writable")
        values["calibrate_cache"] = str(calibrate)
    if getattr(args, "compile", False):
        values["compile"] = True
    if getattr(args, "no_text_kv_cache", False):
        values["text_kv_cache"] = False
    return values


def write_calibration(path: str | os.PathLike, ratios: list[float], steps: int) -> Path:
    """Write calibrated MagCache ratios as JSON (``{"mag_ratios": [...], "steps": N}``) for ``--cache-ratios``."""
    target = Path(path)
    data = {"cache": "magcache", "steps": steps, "mag_ratios": ratios,
            "note": "MagCache magnitude ratios calibrated by ComfyUI-Unison on the model at hand (conditional branch)"}
    target.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return target


def read_calibration(path: str | os.PathLike) -> tuple[float, ...]:
    """Read ratios written by :func:`write_calibration` (or a bare JSON list); a clear error otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnisonError(f"MagCache ratios file {path}: cannot read it as JSON ({exc})") from None
    ratios = data.get("mag_ratios") if isinstance(data, dict) else data
    if not isinstance(ratios, list) or not ratios or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0 for r in ratios):
        raise UnisonError(f"MagCache ratios file {path}: expected {{\"mag_ratios\": [positive numbers, ...]}}")
    return tuple(float(r) for r in ratios)
