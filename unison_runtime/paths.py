"""Safe resolution of media references: a name from an instruction never leaves the allowed roots.

Instructions and shared workflows are untrusted. A reference resolves only to a regular file
inside one of the allowed roots (ComfyUI's input folder, or the CLI's ``--input-dir``):
``..`` escapes, absolute paths elsewhere, symlinks pointing out, device files and names with
control characters are refused with an error that names the reference and the roots.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .errors import PathError

MAX_REFERENCE_LENGTH = 1024


def check_reference_text(reference: str) -> str:
    """Refuse names no real file of ours would have: empty, NUL/control characters, too long."""
    if not reference or not reference.strip():
        raise PathError("empty media reference ###…###; expected a file name")
    if len(reference) > MAX_REFERENCE_LENGTH:
        raise PathError(f"media reference is {len(reference)} characters long; at most {MAX_REFERENCE_LENGTH}")
    bad = [c for c in reference if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise PathError(f"media reference {reference!r} contains control character(s) {bad!r}")
    return reference.strip()


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "(none)"


def resolve_reference(reference: str, roots: Sequence[str | Path], *, must_exist: bool = True) -> Path:
    """The real path of ``reference`` inside one of ``roots``, or a :class:`PathError`.

    A relative reference is tried against each root in order; an absolute one must lie inside
    a root. Symlinks are followed, and where they lead must stay inside the root. With
    ``must_exist=False`` a missing file is allowed (planning needs only the name).
    """
    reference = check_reference_text(reference)
    if not roots:
        raise PathError(f"media reference {reference!r} cannot be resolved: no allowed folder is configured")
    real_roots = [Path(r).resolve() for r in roots]
    given = Path(reference)
    inside = []
    for root in real_roots:
        real = Path(os.path.realpath(given if given.is_absolute() else root / given))
        if real.is_relative_to(root):
            inside.append(real)
    if not inside:
        raise PathError(
            f"media reference {reference!r} points outside the allowed folder(s) {_roots_text(real_roots)}; "
            "'..', absolute paths elsewhere and symlinks out of the folder are refused"
        )
    for real in inside:
        if real.exists():
            if not stat.S_ISREG(real.stat().st_mode):
                raise PathError(f"media reference {reference!r} is not a regular file ({real})")
            return real
    if must_exist:
        raise PathError(f"media reference {reference!r} was not found in the allowed folder(s) {_roots_text(real_roots)}")
    return inside[0]
