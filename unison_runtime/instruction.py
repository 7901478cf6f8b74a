"""Reading a user's instruction: ``###path###`` media references, the planning text, the prompt.

Each reference is replaced by ``<IMGPAD>`` or ``<VIDPAD>``; stage one plans from that text and
stage two's umT5 encodes the same text, as Unison's ``inference.py`` does (it rewrites ``prompt``
once and passes it to both Qwen2.5-VL and ``WanVaceProj.generate``). Wan's own prompt cleaning
(whitespace, HTML entities) happens right before umT5, in :func:`unison_runtime.vace.text.clean_prompt`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InstructionError, PathError
from .paths import check_reference_text, resolve_reference
from .plan import IMAGE_PAD, VIDEO_PAD, MediaKind, MediaRef

if TYPE_CHECKING:
    from .media_probe import MediaInfo

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".webm", ".mkv"})
MAX_REFERENCES = 16
MAX_INSTRUCTION_CHARS = 20_000

REFERENCE_PATTERN = re.compile(r"###(.*?)###", re.DOTALL)


@dataclass(frozen=True)
class Instruction:
    """An instruction split into what each stage reads.

    ``prompt`` is what stage two's umT5 encodes: the reference's text, identical to ``planning_text``
    (a separate name so plans and overrides say which use they mean).
    ``media`` keeps the references as written (role ``context`` until a planner assigns one);
    ``resolved`` holds their real paths when allowed roots were given, else is empty;
    ``media_info`` what is known of each medium's shape (one entry per medium, or empty), for
    planners that look at the media where the words are silent.
    """

    text: str
    prompt: str
    planning_text: str
    media: tuple[MediaRef, ...]
    resolved: tuple[Path, ...] = ()
    media_info: tuple[MediaInfo | None, ...] = ()


def _suffix(reference: str) -> str:
    """``PurePath(reference).suffix`` by string operations (the planner parses thousands of instructions a second)."""
    parts = [part for part in reference.split("/") if part not in ("", ".")]  # pathlib drops these
    name = parts[-1] if parts else ""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def media_kind(reference: str) -> MediaKind:
    """Image or video, from the file extension; anything else is refused with the accepted list."""
    suffix = _suffix(reference).lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    accepted = ", ".join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))
    raise PathError(f"media reference {reference!r} has an unsupported extension; expected one of {accepted}")


def check_references_closed(text: str) -> None:
    """A ``###`` left over once every ``###reference###`` pair is read opens a reference that never closes."""
    rest = REFERENCE_PATTERN.sub(" ", text)
    at = rest.find("###")
    if at >= 0:
        shown = rest[at : at + 40].strip()
        raise InstructionError(
            f"the instruction has a '###' that is never closed (near {shown!r}); write each medium as ###file.png###"
        )


def parse_instruction(
    text: str,
    roots: Sequence[str | Path] | None = None,
    *,
    must_exist: bool = False,
    kinds: dict[str, MediaKind] | None = None,
) -> Instruction:
    """Split ``text`` into media references and the ``<IMGPAD>``/``<VIDPAD>`` text both stages read.

    With ``roots``, every reference must resolve inside them (see :mod:`.paths`). ``kinds``
    names references whose kind is known without an extension (media wired in a graph).
    """
    if not isinstance(text, str):
        raise PathError(f"instruction must be text, got {type(text).__name__}")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise PathError(f"instruction is {len(text)} characters long; at most {MAX_INSTRUCTION_CHARS}")
    kinds = kinds or {}
    media: list[MediaRef] = []
    resolved: list[Path] = []

    def to_pad(match: re.Match[str]) -> str:
        reference = check_reference_text(match.group(1))
        if len(media) >= MAX_REFERENCES:
            raise PathError(f"instruction references more than {MAX_REFERENCES} media")
        kind = kinds.get(reference) or media_kind(reference)
        media.append(MediaRef(path=reference, kind=kind))
        if roots is not None and reference not in kinds:
            resolved.append(resolve_reference(reference, roots, must_exist=must_exist))
        return IMAGE_PAD if kind == "image" else VIDEO_PAD

    # Unison inference.py: prompt.replace(f"###{path}###", "<IMGPAD>" / "<VIDPAD>"), then used by both stages.
    planning_text = REFERENCE_PATTERN.sub(to_pad, text)
    check_references_closed(text)
    return Instruction(
        text=text, prompt=planning_text, planning_text=planning_text, media=tuple(media), resolved=tuple(resolved)
    )
