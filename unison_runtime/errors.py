"""User-facing errors: each says what was wrong, where, and what is expected.

Every error the pack raises on purpose derives from :class:`UnisonError`, so the CLI, the
nodes and the tests can tell a clear refusal from a bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plan import Plan


class UnisonError(Exception):
    """Base class for every deliberate, user-facing refusal."""


class PlanError(UnisonError, ValueError):
    """A plan field is out of range or inconsistent; ``field`` names it."""

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        self.field = field
        self.value = value
        super().__init__(f"plan field '{field}': {message}")


class PlannerOutputError(UnisonError, ValueError):
    """Planner text that the token codec cannot read.

    ``text`` is the offending string; ``fallback`` is the rule planner's plan when the caller
    supplied one, so a node or the CLI can offer it instead of guessing silently.
    """

    def __init__(self, text: str, reason: str, fallback: Plan | None = None) -> None:
        self.text = text
        self.reason = reason
        self.fallback = fallback
        hint = " (the rule planner's plan is available as the fallback)" if fallback else ""
        super().__init__(f"cannot read planner output {text!r}: {reason}{hint}")


class InstructionError(UnisonError, ValueError):
    """An instruction that cannot be read at all: empty, or a ``###`` reference that is never closed."""


class PathError(UnisonError, ValueError):
    """A media reference that points outside the allowed folders, or is not a usable file."""


class MediaError(UnisonError, ValueError):
    """A media file that cannot be used: wrong type, corrupt, too large, empty."""


class WeightsError(UnisonError, ValueError):
    """A model file that is missing, unsafe, truncated or of the wrong kind."""


class SamplingCancelled(UnisonError):
    """The caller's cancel check asked to stop; raised between two sampling steps."""


class OutOfMemory(UnisonError, MemoryError):
    """A device ran out of memory; the message names the settings to lower and their current values.

    Raised after the memory the failed call allocated was let go, so the same models can run
    again with smaller settings. ``stage`` says what was running (``"sampling"``, ...).
    """

    def __init__(self, message: str, stage: str = "") -> None:
        self.stage = stage
        super().__init__(message)


def first_line(message: str | BaseException, *, limit: int = 300) -> str:
    """The first line of a library's message, to quote inside one of ours.

    Drops the rest (tracebacks, dumps of shapes) and the library's advice on how to bypass its
    checks ("Please ...", "If you ..."), which would be wrong advice from this pack. An exception
    without text is named by its type.
    """
    text = str(message).strip()
    if not text:
        return type(message).__name__ if isinstance(message, BaseException) else ""
    first = text.splitlines()[0]
    for advice in (". Please", ". This is", ". If you"):
        first = first.split(advice)[0]
    return first[:limit]
