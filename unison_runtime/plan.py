"""The plan: which of the 12 tasks a prompt is, and the meta-information stage two needs.

The :class:`Plan` is the spine of the pack. Planners produce it, nodes carry it, the engine
consumes it. A ``Plan`` validates itself on construction, so an invalid plan never exists:
an out-of-range value is a :class:`PlanError` naming the field, never silently clamped.

This module also holds the codec for the tokens the Unison planning LoRA emits
(``<BORES>768,480<EORES><BONF>72<EONF><CFV>``), see DESIGN section 5. It imports nothing
heavy: planning must stay a microsecond, torch-free affair.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from .errors import PlanError, PlannerOutputError

OutputKind = Literal["text", "image", "video"]
MediaKind = Literal["image", "video"]

DEFAULT_WIDTH = 832
DEFAULT_HEIGHT = 480
DEFAULT_VIDEO_FRAMES = 81
DEFAULT_FPS = 24
SIZE_STEP = 16
MIN_SIDE = 16
MAX_SIDE = 2048
MAX_FRAMES = 1025  # 4 * 256 + 1: about 43 s at 24 fps, far past what VACE-1.3B was trained on
MAX_FPS = 120

MEDIA_ROLES = ("source", "mask", "reference", "control", "frame", "context")
PLAN_SOURCES = ("rules", "lora", "override")
FRAME_INDICES = ("first", "last")
#: Where image_to_video places its frame image(s). With two images both ends are set: the frame
#: media, in plan.media order, go to the first and last frame ("first_last") or the other way round.
FRAME_PLACEMENTS = (*FRAME_INDICES, "first_last", "last_first")


class Task(str, Enum):
    """The 12 Unison tasks; the value is the id used in JSON and on the nodes."""

    TEXT_UNDERSTANDING = "text_understanding"
    IMAGE_UNDERSTANDING = "image_understanding"
    VIDEO_UNDERSTANDING = "video_understanding"
    TEXT_TO_IMAGE = "text_to_image"
    IMAGE_EDITING = "image_editing"
    IMAGE_CONTROLLABLE = "image_controllable"
    IMAGE_REFERENCE = "image_reference"
    TEXT_TO_VIDEO = "text_to_video"
    IMAGE_TO_VIDEO = "image_to_video"
    VIDEO_REFERENCE = "video_reference"
    VIDEO_EDITING = "video_editing"
    VIDEO_CONTROLLABLE = "video_controllable"

    @property
    def output(self) -> OutputKind:
        if self in UNDERSTANDING_TASKS:
            return "text"
        return "video" if self in VIDEO_TASKS else "image"

    @property
    def is_generation(self) -> bool:
        return self not in UNDERSTANDING_TASKS

    @classmethod
    def parse(cls, value: str | Task, field_name: str = "task") -> Task:
        """A task from its id, with an error that lists the valid ids."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(t.value for t in cls)
            raise PlanError(field_name, f"unknown task {value!r}; expected one of: {valid}", value) from None


UNDERSTANDING_TASKS = frozenset(
    {Task.TEXT_UNDERSTANDING, Task.IMAGE_UNDERSTANDING, Task.VIDEO_UNDERSTANDING}
)
VIDEO_TASKS = frozenset(
    {
        Task.TEXT_TO_VIDEO,
        Task.IMAGE_TO_VIDEO,
        Task.VIDEO_REFERENCE,
        Task.VIDEO_EDITING,
        Task.VIDEO_CONTROLLABLE,
    }
)
EDITING_TASKS = frozenset({Task.IMAGE_EDITING, Task.VIDEO_EDITING})


@dataclass(frozen=True)
class MediaRef:
    """One medium the instruction refers to, as written, with its kind and its role in the task."""

    path: str
    kind: MediaKind
    role: str = "context"

    def __post_init__(self) -> None:
        if self.kind not in ("image", "video"):
            raise PlanError("media.kind", f"expected 'image' or 'video', got {self.kind!r}", self.kind)
        if self.role not in MEDIA_ROLES:
            raise PlanError("media.role", f"expected one of {MEDIA_ROLES}, got {self.role!r}", self.role)

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "role": self.role}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MediaRef:
        if not isinstance(data, dict):
            raise PlanError("media", f"each entry must be an object, got {data!r}", data)
        missing = [k for k in ("path", "kind") if k not in data]
        if missing:
            raise PlanError("media", f"entry {data!r} lacks {', '.join(missing)}", data)
        return cls(path=str(data["path"]), kind=data["kind"], role=data.get("role", "context"))


@dataclass(frozen=True)
class Plan:
    """What to do with a prompt: the task and every parameter stage two needs.

    ``output`` is derived from the task. Validation runs on construction; use
    :meth:`with_changes` to derive a plan with other values (it validates again).
    """

    task: Task
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    num_frames: int = 1
    fps: int = DEFAULT_FPS
    frame_index: str | None = None
    mask_index: int | None = None
    source_index: int | None = None
    media: tuple[MediaRef, ...] = ()
    prompt: str = ""
    planner_text: str = ""
    answer: str | None = None
    source: str = "rules"
    #: True when the width and height were asked for (instruction or override): stage two then uses
    #: them as given instead of following a source's aspect ratio at their area (vace/framing.py).
    fixed_size: bool = field(default=False, compare=False)  # how to read the size, not another plan
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", Task.parse(self.task))
        object.__setattr__(self, "media", tuple(self.media))
        object.__setattr__(self, "notes", tuple(self.notes))
        _validate(self)

    @property
    def output(self) -> OutputKind:
        return self.task.output

    def with_changes(self, **changes: Any) -> Plan:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of DESIGN section 4 (plus ``notes`` when there are any)."""
        data: dict[str, Any] = {
            "task": self.task.value,
            "output": self.output,
            "width": self.width,
            "height": self.height,
            "num_frames": self.num_frames,
            "fps": self.fps,
            "frame_index": self.frame_index,
            "mask_index": self.mask_index,
            "source_index": self.source_index,
            "media": [m.to_dict() for m in self.media],
            "prompt": self.prompt,
            "planner_text": self.planner_text,
            "answer": self.answer,
            "source": self.source,
        }
        if self.fixed_size:
            data["fixed_size"] = True
        if self.notes:
            data["notes"] = list(self.notes)
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Read the JSON form back; unknown keys and an ``output`` that contradicts the task are errors."""
        if not isinstance(data, dict):
            raise PlanError("plan", f"expected a JSON object, got {type(data).__name__}", data)
        known = {f.name for f in dataclasses.fields(cls)} | {"output"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(unknown[0], f"unknown plan field(s) {unknown}", None)
        if "task" not in data:
            raise PlanError("task", "missing", None)
        values = {k: v for k, v in data.items() if k != "output"}
        values["media"] = tuple(MediaRef.from_dict(m) for m in values.get("media") or ())
        values["notes"] = tuple(values.get("notes") or ())
        plan = cls(**values)
        if "output" in data and data["output"] != plan.output:
            raise PlanError(
                "output", f"{data['output']!r} contradicts task {plan.task.value!r} ({plan.output!r})", data["output"]
            )
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError("plan", f"not valid JSON ({exc})", text) from None
        return cls.from_dict(data)


def default_plan(
    task: Task | str, media: Sequence[MediaRef] = (), *, derive_planner_text: bool = False, **values: Any
) -> Plan:
    """A plan with the reference defaults for ``task``: 832x480, 81 frames for video, 1 for images.

    ``derive_planner_text``: ``planner_text`` is what the planning LoRA would emit for this plan
    (:func:`format_planner_text`), as the rule planner reports it.
    """
    task = Task.parse(task)
    values.setdefault("num_frames", DEFAULT_VIDEO_FRAMES if task.output == "video" else 1)
    if task is Task.IMAGE_TO_VIDEO:
        values.setdefault("frame_index", "first")
    plan = Plan(task=task, media=tuple(media), **values)
    if derive_planner_text:
        # Set on the new, validated plan before anyone sees it (as __post_init__ sets its normalised fields):
        # the tokens are written from validated values, and with_changes would validate the whole plan again.
        object.__setattr__(plan, "planner_text", format_planner_text(plan))
    return plan


# --------------------------------------------------------------------------- validation


def _require_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(name, f"expected an integer, got {value!r}", value)
    return value


def validate_side(name: str, value: Any) -> int:
    """Width or height: a multiple of 16 within [16, 2048]."""
    value = _require_int(name, value)
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise PlanError(name, f"{value} is outside [{MIN_SIDE}, {MAX_SIDE}]", value)
    if value % SIZE_STEP:
        raise PlanError(name, f"{value} is not a multiple of {SIZE_STEP}", value)
    return value


def validate_num_frames(value: Any, output: OutputKind) -> int:
    """1 for images and text; of the form 4k+1 (5 to 1025) for video."""
    value = _require_int("num_frames", value)
    if output != "video":
        if value != 1:
            raise PlanError("num_frames", f"an {output} plan has 1 frame, got {value}", value)
        return value
    if not 5 <= value <= MAX_FRAMES or (value - 1) % 4:
        raise PlanError("num_frames", f"{value} is not of the form 4k+1 within [5, {MAX_FRAMES}]", value)
    return value


def _validate_index(plan: Plan, name: str, value: Any) -> None:
    if value is None:
        return
    value = _require_int(name, value)
    if not 0 <= value < len(plan.media):
        raise PlanError(name, f"{value} points past the {len(plan.media)} referenced media", value)


def _validate(plan: Plan) -> None:
    output = plan.task.output
    validate_side("width", plan.width)
    validate_side("height", plan.height)
    validate_num_frames(plan.num_frames, output)
    fps = _require_int("fps", plan.fps)
    if not 1 <= fps <= MAX_FPS:
        raise PlanError("fps", f"{fps} is outside [1, {MAX_FPS}]", fps)
    if not isinstance(plan.fixed_size, bool):
        raise PlanError("fixed_size", f"expected true or false, got {plan.fixed_size!r}", plan.fixed_size)
    if plan.source not in PLAN_SOURCES:
        raise PlanError("source", f"expected one of {PLAN_SOURCES}, got {plan.source!r}", plan.source)
    for m in plan.media:
        if not isinstance(m, MediaRef):
            raise PlanError("media", f"expected MediaRef entries, got {m!r}", m)

    if plan.task is Task.IMAGE_TO_VIDEO:
        if plan.frame_index not in FRAME_PLACEMENTS:
            raise PlanError(
                "frame_index",
                "image_to_video needs 'first' or 'last' (or 'first_last' / 'last_first' for two frame images), "
                f"got {plan.frame_index!r}",
            )
        _validate_frame_media(plan)
    elif plan.frame_index is not None:
        raise PlanError("frame_index", f"only image_to_video has one, not {plan.task.value}", plan.frame_index)

    _validate_index(plan, "mask_index", plan.mask_index)
    _validate_index(plan, "source_index", plan.source_index)
    if plan.task in EDITING_TASKS:
        if plan.mask_index is not None and plan.mask_index == plan.source_index:
            raise PlanError("mask_index", f"mask and source are the same medium ({plan.mask_index})", plan.mask_index)
    elif plan.mask_index is not None or plan.source_index is not None:
        raise PlanError("mask_index", f"only editing tasks have mask/source indices, not {plan.task.value}")

    if plan.answer is not None and output != "text":
        raise PlanError("answer", f"only understanding tasks carry an answer, not {plan.task.value}")
    _validate_media_kinds(plan)


def frame_positions(plan: Plan) -> list[tuple[int, int]]:
    """(media index, frame number) for each frame image of an image_to_video plan, in plan.media order."""
    frames = [i for i, m in enumerate(plan.media) if m.role == "frame"]
    last = plan.num_frames - 1
    order = {"first": [0], "last": [last], "first_last": [0, last], "last_first": [last, 0]}[str(plan.frame_index)]
    return list(zip(frames, order, strict=False))


def _validate_frame_media(plan: Plan) -> None:
    """Both ends need exactly two frame images (once roles are assigned: all 'context' means not yet)."""
    if plan.frame_index not in ("first_last", "last_first") or all(m.role == "context" for m in plan.media):
        return
    frames = [i for i, m in enumerate(plan.media) if m.role == "frame"]
    if len(frames) != 2:
        raise PlanError(
            "frame_index",
            f"{plan.frame_index!r} places 2 images (first and last frame), but {len(frames)} media have role 'frame'",
            plan.frame_index,
        )


#: Tasks that need an image among their media, and what the error calls it.
_NEEDS_IMAGE = {
    Task.IMAGE_UNDERSTANDING: "at least one image",
    Task.IMAGE_CONTROLLABLE: "a condition image",
    Task.IMAGE_REFERENCE: "at least one reference image",
    Task.IMAGE_TO_VIDEO: "an image",
    Task.VIDEO_REFERENCE: "at least one reference image",
}


def _validate_media_kinds(plan: Plan) -> None:
    """The media a task needs must be there, of the right kind (DESIGN section 3)."""
    kinds = [m.kind for m in plan.media]
    task = plan.task
    if task in _NEEDS_IMAGE and "image" not in kinds:
        raise PlanError("media", f"{task.value} needs {_NEEDS_IMAGE[task]}, got {kinds or 'none'}")
    if task in (Task.VIDEO_UNDERSTANDING, Task.VIDEO_CONTROLLABLE) and "video" not in kinds:
        raise PlanError("media", f"{task.value} needs a video, got {kinds or 'none'}")
    if task in EDITING_TASKS:
        if plan.source_index is None:
            raise PlanError("source_index", f"{task.value} needs the index of its source medium")
        expected = "image" if task is Task.IMAGE_EDITING else "video"
        source = plan.media[plan.source_index]
        if source.kind != expected:
            raise PlanError("source_index", f"{task.value} needs a {expected} source, got a {source.kind}")


# --------------------------------------------------------------------------- roles


def assign_roles(
    task: Task,
    media: Sequence[MediaRef],
    *,
    mask_index: int | None = None,
    source_index: int | None = None,
    frame_count: int = 1,
) -> tuple[MediaRef, ...]:
    """Give every medium the role it plays in ``task`` (what the engine will read it as).

    image_to_video places the first ``frame_count`` images (1, or 2 for first + last frame).
    """
    roles: list[str] = []
    frames_taken = 0
    for i, m in enumerate(media):
        if task in EDITING_TASKS:
            role = "mask" if i == mask_index else "source" if i == source_index else "context"
        elif task in (Task.IMAGE_REFERENCE, Task.VIDEO_REFERENCE):
            role = "reference" if m.kind == "image" else "context"
        elif task is Task.IMAGE_CONTROLLABLE:
            role = "control" if m.kind == "image" else "context"
        elif task is Task.VIDEO_CONTROLLABLE:
            role = "control" if m.kind == "video" else "context"
        elif task is Task.IMAGE_TO_VIDEO and m.kind == "image" and frames_taken < frame_count:
            role, frames_taken = "frame", frames_taken + 1
        else:
            role = "context"
        roles.append(role)
    return tuple(MediaRef(m.path, m.kind, r) for m, r in zip(media, roles, strict=True))


def understanding_task(media: Iterable[MediaRef]) -> Task:
    """Which understanding task the media call for: video > image > text."""
    kinds = {m.kind for m in media}
    if "video" in kinds:
        return Task.VIDEO_UNDERSTANDING
    if "image" in kinds:
        return Task.IMAGE_UNDERSTANDING
    return Task.TEXT_UNDERSTANDING


# --------------------------------------------------------------------------- token codec

CLASS_IMAGE = "<CFI>"
CLASS_VIDEO = "<CFV>"
TOKEN_REF = "<REF>"
TOKEN_CTRL = "<CTRL>"
IMAGE_PAD = "<IMGPAD>"
VIDEO_PAD = "<VIDPAD>"
PAIRED = {"BORES": "EORES", "BONF": "EONF", "BOFIDX": "EOFIDX", "BOEDIT": "EOEDIT"}

#: The 14 special tokens the Unison planning LoRA was trained with (DESIGN section 5).
PLANNER_TOKENS = (
    "<CFI>", "<CFV>", "<BORES>", "<EORES>", "<BONF>", "<EONF>", "<BOFIDX>", "<EOFIDX>",
    "<REF>", "<CTRL>", "<BOEDIT>", "<EOEDIT>", "<IMGPAD>", "<VIDPAD>",
)  # fmt: skip

# Chat-template tokens a decoder may leave around the planner's answer.
_CHAT_NOISE = re.compile(r"<\|im_end\|>|<\|endoftext\|>|<\|im_start\|>assistant")
_TOKEN = re.compile(r"<([A-Z]+)>")


def format_planner_text(plan: Plan) -> str:
    """The token string the planning LoRA would emit for ``plan``: parameters first, class last."""
    if plan.output == "text":
        return ""
    parts = [f"<BORES>{plan.width},{plan.height}<EORES>"]
    if plan.output == "video":
        parts.append(f"<BONF>{plan.num_frames - 1}<EONF>")
    if plan.task is Task.IMAGE_TO_VIDEO:
        # One index as the LoRA writes it; first + last frame (our extension) lists one per frame image.
        positions = {"first": "0", "last": "1", "first_last": "0,1", "last_first": "1,0"}
        parts.append(f"<BOFIDX>{positions[str(plan.frame_index)]}<EOFIDX>")
    if plan.task in EDITING_TASKS:
        # The LoRA always names both; an unmasked edit is written as mask == source, which
        # parse_planner_text reads back as "no mask" (the whole frame is editable).
        mask = plan.mask_index if plan.mask_index is not None else plan.source_index
        parts.append(f"<BOEDIT>{mask},{plan.source_index}<EOEDIT>")
    if plan.task in (Task.IMAGE_REFERENCE, Task.VIDEO_REFERENCE):
        parts.append(TOKEN_REF)
    if plan.task in (Task.IMAGE_CONTROLLABLE, Task.VIDEO_CONTROLLABLE):
        parts.append(TOKEN_CTRL)
    parts.append(CLASS_VIDEO if plan.output == "video" else CLASS_IMAGE)
    return "".join(parts)


@dataclass
class _Tokens:
    """What a planner string says, before it becomes a plan."""

    classes: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


def _scan(text: str) -> _Tokens:
    """Split a planner string into class tokens, paired values and flags; reject anything else."""
    body = _CHAT_NOISE.sub("", text).strip()
    found = _Tokens()
    pos = 0
    while pos < len(body):
        if body[pos].isspace():
            pos += 1
            continue
        match = _TOKEN.match(body, pos)
        if not match:
            raise PlannerOutputError(text, f"unexpected text {body[pos:pos + 20]!r} at position {pos}")
        name = match.group(1)
        pos = match.end()
        if name in PAIRED:
            close = f"<{PAIRED[name]}>"
            end = body.find(close, pos)
            if end < 0:
                raise PlannerOutputError(text, f"<{name}> is never closed by {close}")
            if name in found.values:
                raise PlannerOutputError(text, f"<{name}> appears twice")
            value = body[pos:end]
            if "<" in value:
                raise PlannerOutputError(text, f"<{name}> holds {value!r} before its {close}")
            found.values[name] = value.strip()
            pos = end + len(close)
        elif name in ("CFI", "CFV"):
            found.classes.append(f"<{name}>")
        elif name in ("REF", "CTRL"):
            if f"<{name}>" in found.flags:
                raise PlannerOutputError(text, f"<{name}> appears twice")
            found.flags.append(f"<{name}>")
        elif name in PAIRED.values():
            raise PlannerOutputError(text, f"<{name}> closes a pair that was never opened")
        else:
            raise PlannerOutputError(text, f"<{name}> is not a Unison planner token")
    return found


def _ints(text: str, name: str, value: str, count: int) -> list[int]:
    # ASCII digits only, at most 9: the LoRA writes plain numbers, and int() of a 5000-digit
    # string raises a bare ValueError (CPython's digit limit) instead of this clear error.
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != count or not all(re.fullmatch(r"[0-9]{1,9}", p) for p in parts):
        expected = ",".join(["<int>"] * count)
        raise PlannerOutputError(text, f"<{name}> holds {value!r}, expected {expected}")
    return [int(p) for p in parts]


def _task_from_tokens(text: str, tokens: _Tokens, media: Sequence[MediaRef]) -> Task:
    if len(tokens.classes) > 1:
        raise PlannerOutputError(text, f"more than one class token: {tokens.classes}")
    markers = [f"<{n}>" for n in ("BOFIDX", "BOEDIT") if n in tokens.values] + tokens.flags
    if len(markers) > 1:
        raise PlannerOutputError(text, f"conflicting task markers {markers}")
    if not tokens.classes:
        if tokens.values or tokens.flags:
            raise PlannerOutputError(text, "generation parameters without a <CFI>/<CFV> class token")
        return understanding_task(media)
    video = tokens.classes[0] == CLASS_VIDEO
    marker = markers[0] if markers else None
    if marker == "<BOFIDX>" and not video:
        raise PlannerOutputError(text, "<BOFIDX> (image_to_video) needs <CFV>, not <CFI>")
    table = {
        None: (Task.TEXT_TO_IMAGE, Task.TEXT_TO_VIDEO),
        "<BOEDIT>": (Task.IMAGE_EDITING, Task.VIDEO_EDITING),
        "<REF>": (Task.IMAGE_REFERENCE, Task.VIDEO_REFERENCE),
        "<CTRL>": (Task.IMAGE_CONTROLLABLE, Task.VIDEO_CONTROLLABLE),
        "<BOFIDX>": (Task.IMAGE_TO_VIDEO, Task.IMAGE_TO_VIDEO),
    }
    return table[marker][int(video)]


def parse_planner_text(
    text: str,
    media: Sequence[MediaRef] = (),
    *,
    prompt: str = "",
    source: str = "lora",
    fallback: Plan | None = None,
) -> Plan:
    """Turn a planner token string into a validated :class:`Plan`.

    ``media`` are the instruction's references in order (their roles are reassigned for the
    task). A malformed string raises :class:`PlannerOutputError` quoting it, carrying
    ``fallback`` so the caller may choose the rule planner's plan; nothing is guessed.
    """
    try:
        return _parse(text, media, prompt=prompt, source=source)
    except PlannerOutputError as exc:
        if fallback is None:
            raise
        raise PlannerOutputError(text, exc.reason, fallback) from None


def _parse(text: str, media: Sequence[MediaRef], *, prompt: str, source: str) -> Plan:
    tokens = _scan(text)
    task = _task_from_tokens(text, tokens, media)
    values: dict[str, Any] = {}
    if "BORES" in tokens.values:
        values["width"], values["height"] = _ints(text, "BORES", tokens.values["BORES"], 2)
    if "BONF" in tokens.values:
        (n,) = _ints(text, "BONF", tokens.values["BONF"], 1)
        if task.output == "image" and n != 0:
            raise PlannerOutputError(text, f"an image plan asks for {n + 1} frames")
        values["num_frames"] = n + 1
    frame_count = 1
    if "BOFIDX" in tokens.values:
        raw = tokens.values["BOFIDX"]
        indices = _ints(text, "BOFIDX", raw, 2 if "," in raw else 1)
        if any(i not in (0, 1) for i in indices) or indices in ([0, 0], [1, 1]):
            raise PlannerOutputError(
                text, f"<BOFIDX> is {raw!r}; expected 0 (first frame) or 1 (last frame), or 0,1 / 1,0 for both ends"
            )
        values["frame_index"] = {(0,): "first", (1,): "last", (0, 1): "first_last", (1, 0): "last_first"}[
            tuple(indices)
        ]
        frame_count = len(indices)
    if "BOEDIT" in tokens.values:
        mask, src = _ints(text, "BOEDIT", tokens.values["BOEDIT"], 2)
        for name, index in (("mask", mask), ("source", src)):
            if index >= len(media):
                raise PlannerOutputError(
                    text, f"{name} index {index} is out of range for {len(media)} referenced media"
                )
        values["mask_index"] = None if mask == src else mask
        values["source_index"] = src
    roles = assign_roles(
        task,
        media,
        mask_index=values.get("mask_index"),
        source_index=values.get("source_index"),
        frame_count=frame_count,
    )
    try:
        return default_plan(
            task, roles, prompt=prompt, planner_text=_CHAT_NOISE.sub("", text).strip(), source=source, **values
        )
    except PlanError as exc:
        raise PlannerOutputError(text, str(exc)) from None
