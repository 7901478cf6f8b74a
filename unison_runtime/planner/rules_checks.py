"""Checks every planner's plan goes through, and what the media tell where the words are silent.

Shared by the rule planner and the Qwen/LoRA planner (DESIGN section 6): the same instruction
must not lose a medium silently whichever planner read it. Pure Python; the media are probed
only through :mod:`..media_probe` (Pillow / PyAV imported on first use).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import InstructionError
from ..plan import EDITING_TASKS, MAX_FPS, MAX_FRAMES, MAX_SIDE, MediaRef, Plan, Task
from .rules_meta import asks_for_length, parse_fps, round_to_step, says_size
from .rules_text import RuleText

if TYPE_CHECKING:
    from ..instruction import Instruction
    from ..media_probe import MediaInfo

#: What each generation task does with a medium of each role, for the notes on unused media.
_USES = {"source", "mask", "reference", "control", "frame"}


def check_instruction_text(text: str) -> None:
    """An empty instruction is an error (there is nothing to plan)."""
    if not isinstance(text, str) or not text.strip():
        raise InstructionError("the instruction is empty; write what to generate or what to ask")


def media_info(instruction: Instruction, *, probe: bool = True) -> tuple[MediaInfo | None, ...]:
    """What is known of each medium: the instruction's own ``media_info``, else a probe of its resolved files."""
    if instruction.media_info and len(instruction.media_info) == len(instruction.media):
        return tuple(instruction.media_info)
    if not probe or not instruction.media or len(instruction.resolved) != len(instruction.media):
        return ()
    from ..media_probe import probe_file

    return tuple(probe_file(path, ref.kind) for path, ref in zip(instruction.resolved, instruction.media, strict=True))


def _shape_for(info: MediaInfo, short: int = 480) -> tuple[int, int]:
    """The medium's aspect on a ``short`` px short side, both sides multiples of 16, long side at most 2048."""
    w, h = info.width, info.height
    if w >= h:
        return min(MAX_SIDE, round_to_step(short * w / h)), round_to_step(short)
    return round_to_step(short), min(MAX_SIDE, round_to_step(short * h / w))


def shape_from_media(
    rule_text: RuleText,
    task: Task,
    media: Sequence[MediaRef],
    info: Sequence[MediaInfo | None],
    notes: list[str],
) -> dict[str, int]:
    """Size, length and frame rate the media imply where the instruction says nothing of them.

    The medium that shapes the output is the one the task keeps in frame: the edit source, the
    control medium, the (first) frame image. The frame follows its aspect at the default 480 px
    short side; a source or control video sets the length (largest 4k+1 not past its end) and rate.
    """
    role = {Task.IMAGE_EDITING: "source", Task.VIDEO_EDITING: "source", Task.IMAGE_CONTROLLABLE: "control",
            Task.VIDEO_CONTROLLABLE: "control", Task.IMAGE_TO_VIDEO: "frame"}.get(task)  # fmt: skip
    if role is None or len(info) != len(media):
        return {}
    index = next((i for i, m in enumerate(media) if m.role == role), None)
    if index is None or info[index] is None:
        return {}
    known = info[index]
    assert known is not None
    values: dict[str, int] = {}
    if not says_size(rule_text) and known.width > 0 and known.height > 0:
        values["width"], values["height"] = _shape_for(known)
        if (values["width"], values["height"]) != (832, 480):
            notes.append(
                f"size {values['width']}x{values['height']} follows the shape of {media[index].path!r} "
                f"({known.width}x{known.height}); name a size to override"
            )
    if task.output == "video" and media[index].kind == "video" and not asks_for_length(rule_text):
        count = min(MAX_FRAMES, 4 * ((max(known.frames, 5) - 1) // 4) + 1)
        values["num_frames"] = count
        if known.frames > MAX_FRAMES:
            notes.append(f"{media[index].path!r} has {known.frames} frames; the first {MAX_FRAMES} are used")
        if known.fps and 1 <= round(known.fps) <= MAX_FPS and parse_fps(rule_text) is None:
            values["fps"] = round(known.fps)
    return values


def check_plan_media(plan: Plan, info: Sequence[MediaInfo | None] = ()) -> Plan:
    """The plan with a visible note for each medium its task does not use, and for doubtful roles.

    Understanding tasks show every medium to stage one, so nothing is unused there.
    """
    if not plan.task.is_generation:
        return plan
    notes = list(plan.notes)
    for m in plan.media:
        if m.role not in _USES:
            notes.append(f"{m.path!r} ({m.kind}) is not used by {plan.task.value}: it was given but has no role there")
    if plan.task in EDITING_TASKS and len(info) == len(plan.media):
        src = plan.source_index
        source_info = info[src] if src is not None else None
        mask_info = info[plan.mask_index] if plan.mask_index is not None else None
        if source_info and mask_info and source_info.two_level and not mask_info.two_level:
            notes.append(
                f"the source {plan.media[src].path!r} looks like a mask and the mask "  # type: ignore[index]
                f"{plan.media[plan.mask_index].path!r} does not: check the mask/source order"  # type: ignore[index]
            )
    return plan if notes == list(plan.notes) else plan.with_changes(notes=tuple(notes))
