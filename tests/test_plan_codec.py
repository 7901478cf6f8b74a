"""The plan contract: validation with field-named errors, JSON, and the planner-token codec (DESIGN 4-5)."""

from __future__ import annotations

import itertools
import json

import pytest

from unison_runtime.errors import PlanError, PlannerOutputError
from unison_runtime.plan import (
    MAX_FRAMES,
    MediaRef,
    Plan,
    Task,
    assign_roles,
    default_plan,
    format_planner_text,
    parse_planner_text,
)

IMG = MediaRef("a.png", "image")
IMG2 = MediaRef("b.png", "image")
VID = MediaRef("v.mp4", "video")
VID2 = MediaRef("m.mp4", "video")

#: Media each task is planned with in these tests (enough for every marker, incl. two edit indices).
MEDIA: dict[Task, tuple[MediaRef, ...]] = {
    Task.TEXT_UNDERSTANDING: (),
    Task.IMAGE_UNDERSTANDING: (IMG,),
    Task.VIDEO_UNDERSTANDING: (IMG, VID),
    Task.TEXT_TO_IMAGE: (),
    Task.IMAGE_EDITING: (IMG, IMG2),
    Task.IMAGE_CONTROLLABLE: (IMG,),
    Task.IMAGE_REFERENCE: (IMG, IMG2),
    Task.TEXT_TO_VIDEO: (),
    Task.IMAGE_TO_VIDEO: (IMG,),
    Task.VIDEO_REFERENCE: (IMG,),
    Task.VIDEO_EDITING: (VID, VID2),
    Task.VIDEO_CONTROLLABLE: (VID,),
}

#: DESIGN section 5 mapping: (class token, marker) -> task, written independently of plan.py.
MAPPING = {
    ("<CFI>", "<BOEDIT>"): Task.IMAGE_EDITING,
    ("<CFI>", "<CTRL>"): Task.IMAGE_CONTROLLABLE,
    ("<CFI>", "<REF>"): Task.IMAGE_REFERENCE,
    ("<CFI>", None): Task.TEXT_TO_IMAGE,
    ("<CFV>", "<BOFIDX>"): Task.IMAGE_TO_VIDEO,
    ("<CFV>", "<BOEDIT>"): Task.VIDEO_EDITING,
    ("<CFV>", "<REF>"): Task.VIDEO_REFERENCE,
    ("<CFV>", "<CTRL>"): Task.VIDEO_CONTROLLABLE,
    ("<CFV>", None): Task.TEXT_TO_VIDEO,
}


def _marker_text(marker: str | None, values: tuple[int, ...]) -> str:
    if marker == "<BOEDIT>":
        return f"<BOEDIT>{values[0]},{values[1]}<EOEDIT>"
    if marker == "<BOFIDX>":
        return f"<BOFIDX>{values[0]}<EOFIDX>"
    return marker or ""


def _marker_values(marker: str | None) -> list[tuple[int, ...]]:
    if marker == "<BOEDIT>":
        return [(1, 0), (0, 1), (0, 0)]  # (0, 0): mask == source, an unmasked edit
    if marker == "<BOFIDX>":
        return [(0,), (1,)]
    return [()]


def _combinations() -> list[tuple[str, Task, dict[str, object]]]:
    """Every class x marker x marker value x (size given or not) x (frames given or not)."""
    out = []
    for (cls, marker), task in MAPPING.items():
        video = cls == "<CFV>"
        for values, size, frames in itertools.product(
            _marker_values(marker), [None, (1280, 720)], [None, 48] if video else [None, 0]
        ):
            text = ""
            expected: dict[str, object] = {"width": 832, "height": 480, "num_frames": 81 if video else 1}
            if size:
                text += f"<BORES>{size[0]},{size[1]}<EORES>"
                expected["width"], expected["height"] = size
            if frames is not None:
                text += f"<BONF>{frames}<EONF>"
                expected["num_frames"] = frames + 1
            text += _marker_text(marker, values) + cls
            if marker == "<BOFIDX>":
                expected["frame_index"] = ["first", "last"][values[0]]
            if marker == "<BOEDIT>":
                mask, source = values
                expected["mask_index"] = None if mask == source else mask
                expected["source_index"] = source
            out.append((text, task, expected))
    return out


COMBINATIONS = _combinations()


@pytest.mark.parametrize(("text", "task", "expected"), COMBINATIONS, ids=[c[0] for c in COMBINATIONS])
def test_parse_every_token_combination(text: str, task: Task, expected: dict[str, object]) -> None:
    media = MEDIA[task]
    plan = parse_planner_text(text, media, prompt="p")
    assert plan.task is task
    assert plan.source == "lora" and plan.prompt == "p" and plan.planner_text == text
    for name, value in expected.items():
        assert getattr(plan, name) == value, name
    # parse -> format -> parse is stable, and format writes every field explicitly
    canonical = format_planner_text(plan)
    assert parse_planner_text(canonical, media, prompt="p").with_changes(planner_text=text) == plan
    assert canonical.startswith("<BORES>") and canonical.endswith(text[-5:])


# The form the LoRA writes: size always, frames for video only (format_planner_text writes exactly that).
CANONICAL = [
    (text, task)
    for text, task, _ in COMBINATIONS
    if "<BORES>" in text and ("<BONF>" in text) == (task.output == "video")
]


def test_every_class_and_marker_has_a_canonical_string() -> None:
    assert {task for _, task in CANONICAL} == set(MAPPING.values())


@pytest.mark.parametrize(("text", "task"), CANONICAL, ids=[c[0] for c in CANONICAL])
def test_canonical_strings_round_trip_exactly(text: str, task: Task) -> None:
    """A string written the way the LoRA writes it formats back verbatim after parsing."""
    assert format_planner_text(parse_planner_text(text, MEDIA[task])) == text


def _plan_for(task: Task, **values: object) -> Plan:
    media = MEDIA[task]
    if task in (Task.IMAGE_EDITING, Task.VIDEO_EDITING):
        values.setdefault("mask_index", 1)
        values.setdefault("source_index", 0)
    roles = assign_roles(task, media, mask_index=values.get("mask_index"), source_index=values.get("source_index"))
    return default_plan(task, roles, prompt="a prompt", source="rules", **values)


def _variants() -> list[Plan]:
    plans = []
    for task in Task:
        plans.append(_plan_for(task))
        if task.output != "text":
            plans.append(_plan_for(task, width=1280, height=720))
        if task.output == "video":
            plans.append(_plan_for(task, num_frames=5))
            plans.append(_plan_for(task, num_frames=MAX_FRAMES))
    plans.append(_plan_for(Task.IMAGE_TO_VIDEO, frame_index="last"))
    plans.append(_plan_for(Task.IMAGE_EDITING, mask_index=None, source_index=1))
    plans.append(_plan_for(Task.IMAGE_EDITING, mask_index=0, source_index=1))
    plans.append(_plan_for(Task.VIDEO_EDITING, mask_index=None, source_index=0))
    return plans


VARIANTS = _variants()


@pytest.mark.parametrize("plan", VARIANTS, ids=[f"{p.task.value}-{i}" for i, p in enumerate(VARIANTS)])
def test_format_then_parse_gives_the_same_plan(plan: Plan) -> None:
    text = format_planner_text(plan)
    back = parse_planner_text(text, plan.media, prompt=plan.prompt, source=plan.source)
    assert back == plan.with_changes(planner_text=text)
    if plan.output == "text":
        assert text == ""
    else:
        assert text.endswith("<CFV>" if plan.output == "video" else "<CFI>")
        assert text.startswith(f"<BORES>{plan.width},{plan.height}<EORES>")


def test_format_writes_parameters_first_and_class_last() -> None:
    plan = _plan_for(Task.IMAGE_TO_VIDEO, width=768, height=480, num_frames=73, frame_index="last")
    assert format_planner_text(plan) == "<BORES>768,480<EORES><BONF>72<EONF><BOFIDX>1<EOFIDX><CFV>"
    plan = _plan_for(Task.IMAGE_EDITING, mask_index=1, source_index=0)
    assert format_planner_text(plan) == "<BORES>832,480<EORES><BOEDIT>1,0<EOEDIT><CFI>"
    plan = _plan_for(Task.VIDEO_CONTROLLABLE)
    assert format_planner_text(plan) == "<BORES>832,480<EORES><BONF>80<EONF><CTRL><CFV>"


@pytest.mark.parametrize(
    ("media", "task"),
    [
        ((), Task.TEXT_UNDERSTANDING),
        ((IMG,), Task.IMAGE_UNDERSTANDING),
        ((IMG, IMG2), Task.IMAGE_UNDERSTANDING),
        ((VID,), Task.VIDEO_UNDERSTANDING),
        ((IMG, VID), Task.VIDEO_UNDERSTANDING),
    ],
)
def test_no_class_token_is_understanding_by_media_kind(media: tuple[MediaRef, ...], task: Task) -> None:
    for text in ("", "  ", "<|im_end|>", "\n<|endoftext|>"):
        plan = parse_planner_text(text, media)
        assert plan.task is task and plan.output == "text" and plan.num_frames == 1
        assert all(m.role == "context" for m in plan.media)


def test_order_whitespace_and_chat_noise_are_tolerated() -> None:
    expected = parse_planner_text("<BORES>768,480<EORES><BONF>48<EONF><CFV>")
    for text in (
        "<CFV><BONF>48<EONF><BORES>768,480<EORES>",
        " <BORES> 768 , 480 <EORES>\n<BONF>48<EONF> <CFV> ",
        "<|im_start|>assistant<BORES>768,480<EORES><BONF>48<EONF><CFV><|im_end|>",
    ):
        plan = parse_planner_text(text)
        assert (plan.task, plan.width, plan.height, plan.num_frames) == (
            expected.task, expected.width, expected.height, expected.num_frames
        )
        assert "<|" not in plan.planner_text


def test_parse_assigns_roles_for_the_task() -> None:
    plan = parse_planner_text("<BOEDIT>1,0<EOEDIT><CFI>", (IMG, IMG2))
    assert [m.role for m in plan.media] == ["source", "mask"]
    plan = parse_planner_text("<BOFIDX>1<EOFIDX><CFV>", (IMG, IMG2))
    assert [m.role for m in plan.media] == ["frame", "context"]
    plan = parse_planner_text("<REF><CFV>", (VID, IMG))
    assert [m.role for m in plan.media] == ["context", "reference"]
    plan = parse_planner_text("<CTRL><CFV>", (IMG, VID))
    assert [m.role for m in plan.media] == ["context", "control"]


# --------------------------------------------------------------------------- malformed planner output

MALFORMED = [
    # unclosed pairs
    ("<BORES>768,480<CFV>", (), "<BORES>"),
    ("<BORES>768,480", (), "never closed"),
    ("<BONF>48<CFV>", (), "<BONF>"),
    ("<BOEDIT>1,0<CFI>", (IMG, IMG2), "<BOEDIT>"),
    ("<EORES><CFI>", (), "never opened"),
    # non-integers
    ("<BORES>768,abc<EORES><CFI>", (), "expected <int>,<int>"),
    ("<BORES>768<EORES><CFI>", (), "expected <int>,<int>"),
    ("<BORES>768,480,3<EORES><CFI>", (), "expected <int>,<int>"),
    ("<BORES>-16,480<EORES><CFI>", (), "expected <int>,<int>"),
    ("<BONF>4.5<EONF><CFV>", (), "expected <int>"),
    ("<BONF><EONF><CFV>", (), "expected <int>"),
    ("<BOFIDX>first<EOFIDX><CFV>", (IMG,), "expected <int>"),
    ("<BORES>٧٦٨,٤٨٠<EORES><CFI>", (), "expected <int>,<int>"),
    ("<BONF>" + "9" * 5000 + "<EONF><CFV>", (), "expected <int>"),
    # indices out of range
    ("<BOEDIT>2,0<EOEDIT><CFI>", (IMG, IMG2), "out of range"),
    ("<BOEDIT>0,5<EOEDIT><CFV>", (VID,), "out of range"),
    ("<BOEDIT>0,0<EOEDIT><CFI>", (), "out of range"),
    ("<BOFIDX>2<EOFIDX><CFV>", (IMG,), "expected 0 (first frame) or 1 (last frame)"),
    # two classes / conflicting markers
    ("<CFI><CFV>", (), "more than one class"),
    ("<BORES>768,480<EORES><CFV><CFV>", (), "more than one class"),
    ("<REF><CTRL><CFI>", (IMG,), "conflicting"),
    ("<BOEDIT>1,0<EOEDIT><REF><CFI>", (IMG, IMG2), "conflicting"),
    ("<BOFIDX>0<EOFIDX><CTRL><CFV>", (IMG,), "conflicting"),
    ("<BOFIDX>0<EOFIDX><CFI>", (IMG,), "needs <CFV>"),
    ("<BORES>768,480<EORES><BORES>768,480<EORES><CFI>", (), "twice"),
    ("<REF><REF><CFI>", (IMG,), "twice"),
    ("<BORES>768,480<EORES>", (), "without a <CFI>/<CFV>"),
    ("<REF>", (IMG,), "without a <CFI>/<CFV>"),
    # unknown tokens and stray text
    ("<FOO><CFI>", (), "not a Unison planner token"),
    ("<IMGPAD><CFI>", (IMG,), "<IMGPAD>"),
    ("<cfi>", (), "unexpected text"),
    ("Sure! <BORES>768,480<EORES><CFI>", (), "unexpected text"),
    ("<BORES>768,480<EORES><CFI> is the plan", (), "unexpected text"),
    ("text_to_image", (), "unexpected text"),
    # values a plan cannot hold
    ("<BORES>770,480<EORES><CFI>", (), "multiple of 16"),
    ("<BORES>4096,480<EORES><CFI>", (), "width"),
    ("<BORES>0,480<EORES><CFI>", (), "width"),
    ("<BONF>81<EONF><CFV>", (), "4k+1"),
    ("<BONF>2000<EONF><CFV>", (), "num_frames"),
    ("<BONF>80<EONF><CFI>", (), "81 frames"),
    ("<CTRL><CFV>", (IMG,), "needs a video"),
    ("<REF><CFI>", (VID,), "reference image"),
    ("<BOEDIT>1,0<EOEDIT><CFI>", (VID, IMG), "needs a image source"),
    ("<BOFIDX>0<EOFIDX><CFV>", (VID,), "needs an image"),
]


@pytest.mark.parametrize(("text", "media", "reason"), MALFORMED, ids=[m[0][:60] for m in MALFORMED])
def test_malformed_strings_are_planner_errors_quoting_them(
    text: str, media: tuple[MediaRef, ...], reason: str
) -> None:
    with pytest.raises(PlannerOutputError) as err:
        parse_planner_text(text, media)
    assert err.value.text == text
    assert repr(text) in str(err.value)
    assert reason in str(err.value)
    assert err.value.fallback is None


def test_a_malformed_string_carries_the_fallback_plan() -> None:
    fallback = _plan_for(Task.TEXT_TO_IMAGE)
    with pytest.raises(PlannerOutputError) as err:
        parse_planner_text("<CFI><CFV>", fallback=fallback)
    assert err.value.fallback is fallback
    assert "fallback" in str(err.value) and "'<CFI><CFV>'" in str(err.value)
    assert err.value.reason.startswith("more than one class")


def test_a_wellformed_string_ignores_the_fallback() -> None:
    fallback = _plan_for(Task.TEXT_TO_VIDEO)
    plan = parse_planner_text("<BORES>768,480<EORES><CFI>", fallback=fallback)
    assert plan.task is Task.TEXT_TO_IMAGE


# --------------------------------------------------------------------------- plan validation


def _raises_field(field: str, make: object) -> PlanError:
    with pytest.raises(PlanError) as err:
        make()  # type: ignore[operator]
    assert err.value.field == field, str(err.value)
    assert f"'{field}'" in str(err.value)
    return err.value


@pytest.mark.parametrize(
    ("field", "values", "words"),
    [
        ("width", {"width": 770}, "multiple of 16"),
        ("width", {"width": 0}, "outside [16, 2048]"),
        ("width", {"width": -16}, "outside"),
        ("width", {"width": 2064}, "outside"),
        ("width", {"width": "832"}, "integer"),
        ("width", {"width": 832.0}, "integer"),
        ("width", {"width": True}, "integer"),
        ("height", {"height": 481}, "multiple of 16"),
        ("height", {"height": 4096}, "outside"),
        ("num_frames", {"num_frames": 80}, "4k+1"),
        ("num_frames", {"num_frames": 1}, "4k+1"),
        ("num_frames", {"num_frames": 0}, "4k+1"),
        ("num_frames", {"num_frames": MAX_FRAMES + 4}, "4k+1"),
        ("fps", {"fps": 0}, "outside"),
        ("fps", {"fps": 500}, "outside"),
        ("source", {"source": "magic"}, "expected one of"),
        ("frame_index", {"frame_index": "first"}, "only image_to_video"),
        ("mask_index", {"mask_index": 0}, "points past the 0 referenced media"),
        ("answer", {"answer": "a cat"}, "only understanding"),
    ],
)
def test_text_to_video_validation_names_the_field(field: str, values: dict[str, object], words: str) -> None:
    error = _raises_field(field, lambda: default_plan(Task.TEXT_TO_VIDEO, **values))
    assert words in str(error)


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("num_frames", lambda: default_plan(Task.TEXT_TO_IMAGE, num_frames=5)),
        ("num_frames", lambda: default_plan(Task.TEXT_UNDERSTANDING, num_frames=81)),
        ("frame_index", lambda: default_plan(Task.IMAGE_TO_VIDEO, (IMG,), frame_index=None)),
        ("frame_index", lambda: default_plan(Task.IMAGE_TO_VIDEO, (IMG,), frame_index="middle")),
        ("mask_index", lambda: default_plan(Task.IMAGE_EDITING, (IMG, IMG2), mask_index=2, source_index=0)),
        ("mask_index", lambda: default_plan(Task.IMAGE_EDITING, (IMG, IMG2), mask_index=-1, source_index=0)),
        ("mask_index", lambda: default_plan(Task.IMAGE_EDITING, (IMG, IMG2), mask_index=0, source_index=0)),
        ("source_index", lambda: default_plan(Task.IMAGE_EDITING, (IMG, IMG2), source_index=2)),
        ("source_index", lambda: default_plan(Task.IMAGE_EDITING, (IMG, IMG2))),
        ("source_index", lambda: default_plan(Task.IMAGE_EDITING, (VID, IMG), source_index=0)),
        ("source_index", lambda: default_plan(Task.VIDEO_EDITING, (IMG, VID), source_index=0)),
        ("source_index", lambda: default_plan(Task.TEXT_TO_IMAGE, source_index=0)),
        ("mask_index", lambda: default_plan(Task.IMAGE_REFERENCE, (IMG, IMG2), mask_index=1)),
        ("media", lambda: default_plan(Task.IMAGE_UNDERSTANDING)),
        ("media", lambda: default_plan(Task.VIDEO_UNDERSTANDING, (IMG,))),
        ("media", lambda: default_plan(Task.VIDEO_CONTROLLABLE, (IMG,))),
        ("media", lambda: default_plan(Task.IMAGE_CONTROLLABLE, (VID,))),
        ("media", lambda: default_plan(Task.IMAGE_REFERENCE)),
        ("media", lambda: default_plan(Task.VIDEO_REFERENCE, (VID,))),
        ("media", lambda: default_plan(Task.IMAGE_TO_VIDEO, (VID,))),
        ("media", lambda: Plan(task=Task.TEXT_TO_IMAGE, media=({"path": "a.png"},))),
        ("media.kind", lambda: MediaRef("a.wav", "audio")),
        ("media.role", lambda: MediaRef("a.png", "image", "boss")),
        ("task", lambda: default_plan("image_generation")),
    ],
)
def test_validation_names_the_field(field: str, make: object) -> None:
    _raises_field(field, make)


def test_an_unknown_task_lists_the_valid_ids() -> None:
    error = _raises_field("task", lambda: Task.parse("paint"))
    assert all(t.value in str(error) for t in Task)


def test_with_changes_validates_again() -> None:
    plan = _plan_for(Task.TEXT_TO_VIDEO)
    assert plan.with_changes(num_frames=49).num_frames == 49
    _raises_field("num_frames", lambda: plan.with_changes(num_frames=50))
    _raises_field("width", lambda: plan.with_changes(width=100))


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("plan", VARIANTS, ids=[f"{p.task.value}-{i}" for i, p in enumerate(VARIANTS)])
def test_json_round_trip(plan: Plan) -> None:
    plan = plan.with_changes(planner_text=format_planner_text(plan), notes=("a note",))
    text = plan.to_json()
    data = json.loads(text)
    assert data["task"] == plan.task.value and data["output"] == plan.output
    assert data["notes"] == ["a note"]
    back = Plan.from_json(text)
    assert back == plan and back.notes == plan.notes
    assert Plan.from_dict(plan.to_dict()) == plan


def test_json_form_has_the_design_keys() -> None:
    plan = _plan_for(Task.TEXT_TO_VIDEO, width=768, num_frames=73)
    assert list(plan.to_dict()) == [
        "task", "output", "width", "height", "num_frames", "fps", "frame_index", "mask_index",
        "source_index", "media", "prompt", "planner_text", "answer", "source",
    ]  # fmt: skip


def test_json_defaults_and_answers() -> None:
    plan = Plan.from_dict({"task": "image_understanding", "media": [{"path": "a.png", "kind": "image"}]})
    assert plan.media[0].role == "context" and plan.answer is None
    answered = plan.with_changes(answer="a cat")
    assert Plan.from_json(answered.to_json()).answer == "a cat"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"task": "text_to_image", "colour": "red"}, "colour"),
        ({"width": 832}, "task"),
        ({"task": "text_to_image", "output": "video"}, "output"),
        ({"task": "text_to_image", "media": ["a.png"]}, "media"),
        ({"task": "text_to_image", "media": [{"path": "a.png"}]}, "media"),
        ({"task": "text_to_video", "num_frames": 80}, "num_frames"),
        ([1, 2], "plan"),
    ],
)
def test_json_errors_name_the_field(data: object, field: str) -> None:
    _raises_field(field, lambda: Plan.from_dict(data))  # type: ignore[arg-type]
    _raises_field(field, lambda: Plan.from_json(json.dumps(data)))


def test_invalid_json_is_a_plan_error() -> None:
    _raises_field("plan", lambda: Plan.from_json("{not json"))
