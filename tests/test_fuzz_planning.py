"""Fuzzing the planning front end (issue 8, item 6): instruction parser, token codec, rule planner.

The invariant everywhere: the result is a valid plan (it survives JSON and its own planner
text), or a deliberate :class:`UnisonError` subclass. Any other exception is a bug.
Generators mix arbitrary text with the real vocabulary (tokens, cue words, numbers with
units, ###references###) so the interesting paths are reached, not just the error paths.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unison_runtime.errors import PathError, PlanError, PlannerOutputError, UnisonError
from unison_runtime.instruction import REFERENCE_PATTERN, parse_instruction
from unison_runtime.plan import PLANNER_TOKENS, MediaRef, Plan, format_planner_text, parse_planner_text
from unison_runtime.planner.rules import RulePlanner

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PLANNER = RulePlanner()

# --------------------------------------------------------------------------- generators

REFERENCES = [
    "a.png", "b.jpg", "c.jpeg", "d.webp", "e.bmp", "v.mp4", "w.avi", "x.mov", "y.webm", "z.mkv",
    "mask.png", "m_mask.mp4", "dir/1920x1080.png", "f.gif", "noext", "", "../up.png", "/etc/x.png",
]  # fmt: skip
CUES = [
    "generate", "create", "make", "draw", "paint", "render", "produce", "animate", "turn this into",
    "what", "how", "which", "why", "describe", "explain", "translate", "summarize", "?", "Choices: A) x B) y",
    "image", "picture", "photo", "illustration", "painting", "drawing", "portrait", "video", "clip",
    "animation", "timelapse", "this person", "face", "identity", "as reference", "headshot", "ID photo",
    "pose", "skeleton", "depth map", "canny edges", "sketch", "following the pose information", "mask",
    "replace", "change", "remove", "add", "first frame", "last frame", "starting from", "ends with",
    "vertical", "portrait mode", "square", "landscape format", "480P", "720P", "1080P", "16:9", "9:16",
    "aspect ratio", "width of", "height of", "pixels wide", "pixels tall", "seconds", "secs", "s", "frames",
    "frames per second", "the 80s", ".", ",", ";", "\n", "!", "<CFI>", "<VIDPAD>",
]  # fmt: skip
NUMBERS = st.one_of(
    st.integers(-10, 5000).map(str),
    st.decimals(min_value=0, max_value=100, places=2).map(str),
    st.sampled_from(["0", "1", "2.5", "00", "1e3", "٣", "9" * 30, "9" * 5000, "1." + "9" * 5000, "two", "x", "×"]),
)
SIZES = st.tuples(st.integers(0, 5000), st.sampled_from(["x", "×", "*", " x ", " by "]), st.integers(0, 5000)).map(
    lambda t: f"{t[0]}{t[1]}{t[2]}"
)
WORDS = st.one_of(
    st.sampled_from(CUES),
    NUMBERS,
    SIZES,
    st.sampled_from(REFERENCES).map(lambda r: f"###{r}###"),
    st.text(string.ascii_letters + " #", max_size=8),
)
# Instruction-shaped text: references, a verb, an output noun, cues, a size and a length.
TEMPLATES = st.tuples(
    st.lists(st.sampled_from(REFERENCES[:13]).map(lambda r: f"###{r}###"), max_size=3),
    st.sampled_from(["Generate", "Please create", "Draw", "Animate", "Replace the sky in", "Describe", "What is", ""]),
    st.sampled_from(["an image", "a video", "a 3 second clip", "a photo", "a picture", "it", ""]),
    st.lists(st.sampled_from(CUES), max_size=4),
    st.one_of(st.none(), SIZES, st.sampled_from(["720P", "1080p", "9:16", "square", "vertical"])),
    st.one_of(st.none(), st.tuples(NUMBERS, st.sampled_from(["seconds", "s", "frames", "-second"]))),
).map(
    lambda t: " ".join(
        [*t[0], t[1], t[2], "of a fox", *t[3], t[4] or "", " ".join(t[5]) if t[5] else "", "."]
    )
)
INSTRUCTIONS = st.one_of(
    st.text(max_size=200),
    st.lists(WORDS, max_size=30).map(" ".join),
    st.lists(WORDS, max_size=30).map("".join),
    TEMPLATES,
)

PLANNER_PIECES = st.one_of(
    st.sampled_from(PLANNER_TOKENS),
    st.sampled_from(["<|im_end|>", "<|endoftext|>", "<|im_start|>assistant", "<EOS>", "<cfi>", "<", ">"]),
    st.integers(-3, 3000).map(str),
    st.sampled_from([",", " ", "\n", "1,0", "0,1", "0,0", "768,480", "832,480", "48", "80", "0", "1", "2", "x"]),
    st.sampled_from(["9" * 12, "9" * 5000, "٣", "１６", "1.5", "+4", "-0"]),
)
# Mostly plausible values, sometimes absurd ones (a 5000-digit number once crashed int()).
ABSURD = st.sampled_from(["9" * 12, "9" * 5000, "٣٢", "１６", "-1", "x", "", "1.5"])
SIDE = st.one_of(st.sampled_from([16, 480, 720, 832, 1280, 2048]), st.integers(0, 2100), ABSURD)
VALUE = st.one_of(st.integers(0, 3), ABSURD)
# Token strings shaped like the LoRA's: optional parameters in any order, a marker, a class token.
SHAPED = st.tuples(
    st.one_of(st.none(), st.tuples(SIDE, SIDE).map(lambda s: f"<BORES>{s[0]},{s[1]}<EORES>")),
    st.one_of(st.none(), st.one_of(st.sampled_from([0, 4, 48, 80, 81, 1024, 1028]), ABSURD).map(
        lambda n: f"<BONF>{n}<EONF>"
    )),
    st.one_of(
        st.none(),
        st.just("<REF>"),
        st.just("<CTRL>"),
        VALUE.map(lambda i: f"<BOFIDX>{i}<EOFIDX>"),
        st.tuples(VALUE, VALUE).map(lambda e: f"<BOEDIT>{e[0]},{e[1]}<EOEDIT>"),
    ),
    st.sampled_from(["<CFI>", "<CFV>", "", "<CFI><CFV>"]),
    st.sampled_from(["", " ", "<|im_end|>", "\n"]),
).flatmap(lambda parts: st.permutations([p for p in parts[:4] if p]).map(lambda ps: "".join(ps) + parts[4]))
PLANNER_TEXTS = st.one_of(st.text(max_size=80), st.lists(PLANNER_PIECES, max_size=14).map("".join), SHAPED, SHAPED)
MEDIA = st.lists(
    st.builds(MediaRef, path=st.sampled_from(["a.png", "b.mp4", "c.jpg"]), kind=st.sampled_from(["image", "video"])),
    max_size=4,
).map(tuple)


# --------------------------------------------------------------------------- invariants


def check_plan(plan: Plan) -> None:
    """A plan re-validates through JSON, and its planner text reads back to the same decisions."""
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_json(plan.to_json()) == plan
    text = format_planner_text(plan)
    back = parse_planner_text(text, plan.media)
    assert (back.task, back.width, back.height) == (plan.task, plan.width, plan.height)
    assert back.num_frames == plan.num_frames
    assert (back.frame_index, back.mask_index, back.source_index) == (
        plan.frame_index,
        plan.mask_index,
        plan.source_index,
    )
    assert [m.role for m in back.media] == [m.role for m in plan.media]
    if plan.output == "video":
        assert plan.num_frames % 4 == 1
    else:
        assert plan.num_frames == 1
    assert plan.width % 16 == 0 and plan.height % 16 == 0


# --------------------------------------------------------------------------- instruction parser


@FUZZ
@given(INSTRUCTIONS)
def test_fuzz_parse_instruction(text: str) -> None:
    try:
        instruction = parse_instruction(text)
    except PathError:
        return
    references = REFERENCE_PATTERN.findall(text)
    assert [m.path for m in instruction.media] == [r.strip() for r in references]
    assert all(m.kind in ("image", "video") and m.role == "context" for m in instruction.media)
    pads = instruction.planning_text.count("<IMGPAD>") + instruction.planning_text.count("<VIDPAD>")
    assert pads >= len(instruction.media)
    assert instruction.prompt == instruction.planning_text  # what umT5 encodes (Unison inference.py)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz")
    inside = base / "input"
    (inside / "sub").mkdir(parents=True)
    (inside / "a.png").write_bytes(b"x")
    (inside / "sub" / "b.mp4").write_bytes(b"x")
    (base / "secret.png").write_bytes(b"x")
    (inside / "out.png").symlink_to(base / "secret.png")
    (inside / "outdir").symlink_to(base)
    (inside / "in.png").symlink_to(inside / "a.png")
    return inside


SEGMENTS = st.sampled_from(
    ["..", ".", "sub", "a.png", "b.mp4", "out.png", "outdir", "in.png", "secret.png", "", "x", "x" * 300]
)


@settings(FUZZ, max_examples=150)
@given(st.lists(SEGMENTS, min_size=1, max_size=6), st.booleans(), st.sampled_from([".png", ".mp4", ""]))
def test_fuzz_references_never_leave_the_root(root: Path, parts: list[str], absolute: bool, ext: str) -> None:
    reference = "/".join(parts) + ext
    if absolute:
        reference = str(root.parent) + "/" + reference
    try:
        instruction = parse_instruction(f"Describe ###{reference}###", [root], must_exist=False)
    except PathError:
        return  # refusal wording is tested in test_instruction.py; here only confinement matters
    real_root = root.resolve()
    for path in instruction.resolved:
        assert path.is_relative_to(real_root), (reference, path)
        assert Path(path).resolve().is_relative_to(real_root)


# --------------------------------------------------------------------------- token codec


@FUZZ
@given(PLANNER_TEXTS, MEDIA)
def test_fuzz_parse_planner_text(text: str, media: tuple[MediaRef, ...]) -> None:
    try:
        plan = parse_planner_text(text, media)
    except PlannerOutputError as err:
        assert err.text == text and repr(text) in str(err)
        return
    assert plan.source == "lora"
    check_plan(plan)


# --------------------------------------------------------------------------- rule planner


@FUZZ
@given(INSTRUCTIONS)
def test_fuzz_rule_planner(text: str) -> None:
    try:
        instruction = parse_instruction(text)
        plan = PLANNER.plan(instruction)
    except PlanError as err:
        assert err.field in {"width", "height", "num_frames", "source_index"}, err
        return
    except UnisonError:
        return
    assert plan.source == "rules"
    assert plan.prompt == instruction.prompt
    assert plan.planner_text == format_planner_text(plan)
    assert len(plan.media) == len(instruction.media)
    check_plan(plan)


@FUZZ
@given(INSTRUCTIONS)
def test_fuzz_rule_planner_is_deterministic(text: str) -> None:
    try:
        instruction = parse_instruction(text)
        first = PLANNER.plan(instruction)
    except UnisonError as err:
        with pytest.raises(type(err)):
            PLANNER.plan(parse_instruction(text))
        return
    assert RulePlanner().plan(instruction).to_dict() == first.to_dict()
