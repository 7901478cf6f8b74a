"""Safe resolution of media references: a name from an instruction never leaves the allowed roots.

Instructions and shared workflows are untrusted. A reference resolves only to a regular file
inside one of the allowed roots (ComfyUI's input folder, or the CLI's ``--input-dir``):
``..`` components, absolute paths elsewhere, Windows drive/UNC paths on POSIX, symlinks
pointing out, device files, FIFOs and sockets, and names with control characters are refused
with an error that names the reference and the roots.

The same rules hold on every OS so a workflow behaves alike wherever it is opened: ``\\`` is a
folder separator everywhere, and containment is compared after ``os.path.normcase`` (which
folds case on Windows, where the file system does).

Checking a path and then opening it leaves a window in which someone with write access to the
root could swap a component for a symlink. :func:`open_reference` closes it on POSIX by opening
the checked path component by component from the root with ``O_NOFOLLOW`` and checking the
opened descriptor, so what is read is what was checked.
"""

from __future__ import annotations

import errno
import os
import stat
import unicodedata
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from .errors import PathError

MAX_REFERENCE_LENGTH = 1024

#: Invisible characters that reorder or hide text: a name using them can disguise its extension.
_DISGUISING_CHARACTERS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")

_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def check_reference_text(reference: str, *, what: str = "media reference") -> str:
    """Refuse names no real file of ours would have: empty, control/bidi characters, too long.

    Returns the reference with surrounding spaces removed (``### photo.png ###`` is allowed).
    """
    if not isinstance(reference, str):
        raise PathError(f"{what} must be text, got {type(reference).__name__}")
    if not reference.strip():
        raise PathError(f"empty {what} ###…###; expected a file name such as ###photo.png###")
    if len(reference) > MAX_REFERENCE_LENGTH:
        raise PathError(f"{what} is {len(reference)} characters long; at most {MAX_REFERENCE_LENGTH}")
    # Every refused character is non-printable, so a printable name (the usual case) needs no per-character look.
    bad = [] if reference.isprintable() else [
        c for c in reference if unicodedata.category(c) == "Cc" or c in _DISGUISING_CHARACTERS]
    if bad:
        shown = ", ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(bad))
        raise PathError(
            f"{what} {reference!r} contains control or invisible character(s) {shown}; expected a plain file name"
        )
    return reference.strip()


#: Folders named by their role in messages (real path → e.g. "ComfyUI's input folder"). A ComfyUI
#: user may be remote: errors must not reveal the server's directory layout (see :func:`name_folder`).
_FOLDER_ROLES: dict[str, str] = {}


def name_folder(folder: str | os.PathLike[str], role: str) -> None:
    """Show ``folder`` (and paths inside it) as ``role`` in this module's error messages."""
    _FOLDER_ROLES[os.path.normcase(os.path.realpath(os.path.abspath(folder)))] = role


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` as errors show it: below a named folder as ``<role>/<relative path>``, else as is."""
    text = os.path.normcase(os.path.realpath(os.path.abspath(path)))
    for root, role in _FOLDER_ROLES.items():
        if text == root:
            return role
        if text.startswith(root.rstrip(os.sep) + os.sep):
            return f"{role}/{Path(os.path.relpath(text, root)).as_posix()}"
    return str(path)


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(shown(r) for r in roots) or "(none)"


def _real_roots(roots: Sequence[str | Path]) -> list[Path]:
    """Each root with its symlinks resolved (a root may itself be a link to the real folder)."""
    real = []
    for root in roots:
        if not isinstance(root, str | os.PathLike) or not str(root) or "\x00" in str(root):
            raise PathError(f"allowed folder {root!r} is not a usable folder path")
        real.append(Path(os.path.realpath(os.path.abspath(root))))
    return real


def _is_within(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or below it, compared the way the OS compares names."""
    p, r = os.path.normcase(str(path)), os.path.normcase(str(root))
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def _reference_path(text: str, what: str, real_roots: Sequence[Path]) -> Path:
    """The reference as a path, with the same separator and ``..`` rules on every OS."""
    if os.name == "nt":
        parts = PureWindowsPath(text).parts
    else:
        if PureWindowsPath(text).drive:  # "C:\\x.png", "\\\\server\\share\\x.png": never inside a POSIX root
            raise PathError(
                f"{what} {text!r} is a Windows path; name a file inside the allowed folder(s) "
                f"{_roots_text(real_roots)} instead"
            )
        parts = PurePosixPath(text.replace("\\", "/")).parts
    if ".." in parts:
        raise PathError(
            f"{what} {text!r} contains '..'; name a file inside the allowed folder(s) "
            f"{_roots_text(real_roots)} without climbing out of it"
        )
    return Path(*parts) if parts else Path(".")


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def resolve_reference(
    reference: str,
    roots: Sequence[str | Path],
    *,
    must_exist: bool = True,
    what: str = "media reference",
) -> Path:
    """The real path of ``reference`` inside one of ``roots``, or a :class:`PathError`.

    A relative reference is tried against each root in order; an absolute one must lie inside
    a root. Symlinks are followed, and where they lead must stay inside the root the
    reference was resolved against. The returned path contains no symlink. With
    ``must_exist=False`` a missing file is allowed (planning needs only the name), but an
    existing non-regular file is still refused. ``what`` names the reference in errors.
    """
    text = check_reference_text(reference, what=what)
    if not roots:
        raise PathError(f"{what} {text!r} cannot be resolved: no allowed folder is configured")
    real_roots = _real_roots(roots)
    given = _reference_path(text, what, real_roots)

    outside_error = PathError(
        f"{what} {text!r} points outside the allowed folder(s) {_roots_text(real_roots)}; "
        "absolute paths elsewhere and symlinks out of the folder are refused"
    )
    if given.is_absolute():
        real = Path(os.path.realpath(given))
        pairs = [(root, real) for root in real_roots if _is_within(real, root)][:1]
        if not pairs:
            raise outside_error
    else:
        pairs = [(root, root / given) for root in real_roots]
    missing: list[Path] = []
    for root, candidate in pairs:
        real = Path(os.path.realpath(candidate))
        if not _is_within(real, root):
            if os.path.lexists(candidate):  # the name is there but leads out: that is the answer
                raise outside_error
            continue
        try:
            mode = os.stat(real).st_mode
        except (FileNotFoundError, NotADirectoryError):
            missing.append(real)
            continue
        except OSError as exc:  # symlink loop, name too long, permission denied...
            raise PathError(f"{what} {text!r} cannot be used ({shown(real)}): {exc.strerror or exc}") from None
        if not stat.S_ISREG(mode):
            raise PathError(f"{what} {text!r} is {_file_kind(mode)} ({shown(real)}); expected a regular image or "
                          "video file")
        return real  # the first root holding the name decides
    if not missing:
        raise outside_error
    if must_exist:
        raise PathError(f"{what} {text!r} was not found in the allowed folder(s) {_roots_text(real_roots)}")
    return missing[0]

def open_regular_file(path: str | Path, *, what: str = "file") -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file; never blocks on a FIFO.

    ``O_NONBLOCK`` makes opening a FIFO return at once, and the check runs on the opened
    descriptor (``fstat``), so a file swapped after an earlier check is still caught.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC | _O_BINARY)
    except OSError as exc:
        raise PathError(f"{what} {Path(path).name!r} cannot be opened: {exc.strerror or exc}") from None
    return _checked_file(fd, what, Path(path).name)


def _checked_file(fd: int, what: str, label: str) -> BinaryIO:
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise PathError(f"{what} {label!r} is {_file_kind(mode)}; expected a regular file")
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_within(path: str | Path, root: str | Path, *, what: str = "media reference") -> BinaryIO:
    """Open the symlink-free ``path`` below ``root`` so that no component can be a symlink.

    On POSIX each component is opened relative to its parent's descriptor with
    ``O_NOFOLLOW``: if someone replaced a folder or the file by a symlink after the path was
    checked, the open fails instead of following it. Elsewhere this is :func:`open_regular_file`.
    """
    path, root = Path(path), Path(root)
    if not _is_within(path, root) or path == root:
        raise PathError(f"{what} {shown(path)!r} is not a file inside the allowed folder {shown(root)}")
    if not (_O_NOFOLLOW and _O_DIRECTORY and os.open in os.supports_dir_fd):
        return open_regular_file(path, what=what)
    parts = path.relative_to(root).parts
    try:
        dir_fd = os.open(root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError as exc:
        raise PathError(f"allowed folder {shown(root)} cannot be opened: {exc.strerror or exc}") from None
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = os.open(parts[-1], os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise PathError(
                f"{what} {shown(path)!r} changed while it was being opened (a symlink appeared); refused"
            ) from None
        raise PathError(f"{what} {shown(path)!r} cannot be opened: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)
    return _checked_file(fd, what, path.name)


def open_reference(reference: str, roots: Sequence[str | Path], *, what: str = "media reference") -> BinaryIO:
    """Resolve ``reference`` inside ``roots`` and open it for reading without a check-then-use gap.

    Pass the returned file to :func:`unison_runtime.media.read_medium` with ``name=reference``.
    """
    real = resolve_reference(reference, roots, must_exist=True, what=what)
    root = next(r for r in _real_roots(roots) if _is_within(real, r))
    return open_within(real, root, what=what)
