"""Plans are untrusted (issue 8, item 4): bad planner output and bad overrides are refused up front.

Planner text that does not parse, overrides out of range (sizes not multiples of 16, frames not
4k+1, zero, negative or absurd values) and indices past the media list give a field-named
:class:`PlanError` / :class:`PlannerOutputError` where the plan is made or edited, and the
ComfyUI Router refuses bad widget values at submit time. A bad plan handed to the pipeline fails
before any model is loaded or run (spied on), never deep inside sampling.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from unison_runtime.errors import MediaError, PlanError, PlannerOutputError, UnisonError
from unison_runtime.instruction import parse_instruction
from unison_runtime.media import Medium
from unison_runtime.pipeline import UnisonPipeline
from unison_runtime.plan import MAX_FRAMES, MAX_SIDE, MediaRef, Plan, default_plan, parse_planner_text
from unison_runtime.planner.rules import RulePlanner
from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers
from unison_runtime.vace.loading import load_vace_diffusers
from unison_runtime.vace.sampler import SamplingOptions

IMAGE = MediaRef("cat.png", "image")
VIDEO = MediaRef("clip.mp4", "video")


# --------------------------------------------------------------------------- planner output


UNREADABLE = [
    ("<BORES>768,480<CFI>", "never closed"),
    ("<BORES>768,480<EORES><BORES>64,64<EORES><CFI>", "appears twice"),
    ("<BORES>768<EORES><CFI>", "expected <int>,<int>"),
    ("<BORES>-16,480<EORES><CFI>", "expected <int>,<int>"),
    ("<BORES>１２８,480<EORES><CFI>", "expected <int>,<int>"),  # full-width digits
    ("<BORES>" + "9" * 5000 + ",480<EORES><CFI>", "expected <int>,<int>"),
    ("<BORES>768,480<EORES><CFI><CFV>", "more than one class token"),
    ("<BORES>768,480<EORES>", "without a <CFI>/<CFV> class token"),
    ("<EORES><CFI>", "never opened"),
    ("<BORES>7<BONF>68,480<EORES><CFI>", "holds"),
    ("<HACK><CFI>", "is not a Unison planner token"),
    ("<CFI> rm -rf /", "unexpected text"),
    ("<CFI>\x00", "unexpected text"),
    ("<BORES>768,480<EORES><BONF>4<EONF><CFI>", "an image plan asks for 5 frames"),
    ("<BOFIDX>2<EOFIDX><CFV>", "expected 0 (first frame) or 1 (last frame)"),
    ("<BOFIDX>0<EOFIDX><CFI>", "needs <CFV>"),
    ("<BOEDIT>0,3<EOEDIT><CFI>", "source index 3 is out of range for 1 referenced media"),
    ("<BOEDIT>7,0<EOEDIT><CFI>", "mask index 7 is out of range for 1 referenced media"),
    ("<REF><CTRL><CFI>", "conflicting task markers"),
]


@pytest.mark.parametrize("text, reason", UNREADABLE)
def test_unreadable_planner_output_is_a_planner_output_error(text, reason):
    with pytest.raises(PlannerOutputError) as info:
        parse_planner_text(text, [IMAGE], prompt="a cat")
    assert reason in info.value.reason and info.value.text == text
    assert repr(text[:20])[1:-1] in str(info.value)  # the offending text is quoted


OUT_OF_RANGE_OUTPUT = [
    ("<BORES>100,480<EORES><CFI>", "width", "not a multiple of 16"),
    ("<BORES>768,470<EORES><CFI>", "height", "not a multiple of 16"),
    ("<BORES>0,480<EORES><CFI>", "width", "outside [16, 2048]"),
    ("<BORES>768,999999999<EORES><CFI>", "height", "outside [16, 2048]"),
    ("<BORES>768,480<EORES><BONF>6<EONF><CFV>", "num_frames", "4k+1"),
    ("<BORES>768,480<EORES><BONF>0<EONF><CFV>", "num_frames", "4k+1"),
    ("<BORES>768,480<EORES><BONF>99999<EONF><CFV>", "num_frames", "4k+1"),
    ("<BOEDIT>0,0<EOEDIT><CFV>", "source_index", "needs a video source"),
]


@pytest.mark.parametrize("text, field, reason", OUT_OF_RANGE_OUTPUT)
def test_planner_output_out_of_range_names_the_field(text, field, reason):
    fallback = default_plan("text_to_image", prompt="a cat")
    with pytest.raises(PlannerOutputError) as info:
        parse_planner_text(text, [IMAGE], prompt="a cat", fallback=fallback)
    assert f"plan field '{field}'" in str(info.value) and reason in str(info.value)
    assert info.value.fallback == fallback  # the caller can offer the rule planner's plan instead


@pytest.fixture(scope="module")
def scripted_planner(tmp_path_factory):
    """A tiny Qwen2.5-VL whose weights make greedy decoding emit a 70-pixel width (not a multiple of 16)."""
    from unison_runtime.planner.qwen import load_planner
    from unison_runtime.testing.tiny_qwen import (
        build_tiny_merged_planner,
        build_tiny_qwen,
        build_tiny_unison_lora,
        script_tiny_planner,
    )

    root = tmp_path_factory.mktemp("scripted")
    base = build_tiny_qwen(root / "base")
    merged = build_tiny_merged_planner(base, build_tiny_unison_lora(base, root / "lora"), root / "merged",
                                       fix_tie=True)
    return load_planner(script_tiny_planner(merged, "<BORES>70,32<EORES><CFI>", root / "scripted"), device="cpu")


def test_a_real_planner_emitting_a_bad_size_fails_at_planning_with_a_fallback(scripted_planner):
    instruction = parse_instruction("Create an image of a cat")
    with pytest.raises(PlannerOutputError) as info:
        scripted_planner.plan(instruction)
    assert info.value.text == "<BORES>70,32<EORES><CFI>"
    assert "plan field 'width': 70 is not a multiple of 16" in str(info.value)
    assert info.value.fallback == RulePlanner().plan(instruction)


# --------------------------------------------------------------------------- overrides


OVERRIDES = [
    ({"width": 100}, "width", "not a multiple of 16"),
    ({"height": 470}, "height", "not a multiple of 16"),
    ({"width": 0}, "width", "outside"),
    ({"height": -16}, "height", "outside"),
    ({"width": MAX_SIDE + 16}, "width", "outside"),
    ({"width": 10**12}, "width", "outside"),
    ({"width": 32.0}, "width", "expected an integer"),
    ({"height": "480"}, "height", "expected an integer"),
    ({"width": True}, "width", "expected an integer"),
    ({"num_frames": 6}, "num_frames", "4k+1"),
    ({"num_frames": 1}, "num_frames", "4k+1"),
    ({"num_frames": 0}, "num_frames", "4k+1"),
    ({"num_frames": -3}, "num_frames", "4k+1"),
    ({"num_frames": MAX_FRAMES + 4}, "num_frames", "4k+1"),
    ({"num_frames": 81.0}, "num_frames", "expected an integer"),
    ({"fps": 0}, "fps", "outside"),
    ({"fps": 10_000}, "fps", "outside"),
    ({"frame_index": "middle"}, "frame_index", "'first' or 'last'"),
]


@pytest.mark.parametrize("changes, field, reason", OVERRIDES)
def test_out_of_range_overrides_name_the_field(changes, field, reason):
    plan = default_plan("image_to_video", [IMAGE], width=64, height=32, num_frames=9)
    with pytest.raises(PlanError) as info:
        plan.with_changes(**changes)
    assert info.value.field == field and f"plan field '{field}'" in str(info.value) and reason in str(info.value)


INDICES = [
    ("video_editing", {"source_index": 2}, "source_index", "points past the 2 referenced media"),
    ("video_editing", {"mask_index": 5}, "mask_index", "points past the 2 referenced media"),
    ("video_editing", {"mask_index": -1}, "mask_index", "points past"),
    ("video_editing", {"source_index": 0}, "source_index", "needs a video source"),
    ("video_editing", {"mask_index": 1}, "mask_index", "same medium"),
    ("text_to_video", {"source_index": 0}, "mask_index", "only editing tasks"),
]


@pytest.mark.parametrize("task, changes, field, reason", INDICES)
def test_indices_past_the_media_list_name_the_field(task, changes, field, reason):
    values = {"source_index": 1} if task == "video_editing" else {}
    plan = default_plan(task, [IMAGE, VIDEO], width=32, height=32, num_frames=5, **values)
    with pytest.raises(PlanError) as info:
        plan.with_changes(**changes)
    assert info.value.field == field and reason in str(info.value)


@pytest.mark.parametrize("edit, field", [
    ({"width": 100}, "width"), ({"num_frames": 8}, "num_frames"), ({"mask_index": 9}, "mask_index"),
    ({"task": "paint_my_house"}, "task"), ({"output": "image"}, "output"), ({"eval": "os.system"}, "eval"),
    ({"media": [{"path": "x.png"}]}, "media"), ({"media": [{"path": "x.png", "kind": "exe"}]}, "media.kind"),
])
def test_a_hand_edited_plan_json_names_the_field(edit, field):
    data = default_plan("video_editing", [VIDEO, IMAGE], width=32, height=32, num_frames=5, source_index=0).to_dict()
    with pytest.raises(PlanError) as info:
        Plan.from_dict({**data, **edit})
    assert info.value.field == field
    with pytest.raises(PlanError, match="plan field 'plan'"):
        Plan.from_json("{not json")


@pytest.mark.parametrize("options, name", [
    ({"steps": 0}, "steps"), ({"steps": -5}, "steps"), ({"steps": 2.5}, "steps"), ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"), ({"guidance": -1.0}, "guidance"), ({"shift": 0.0}, "shift"), ({"fps": 0}, "fps"),
])
def test_sampling_options_out_of_range_name_the_option(options, name):
    with pytest.raises(UnisonError, match=f"sampling option {name}="):
        SamplingOptions(**options)


def test_the_router_refuses_bad_widgets_at_submit_time():
    """ComfyUI calls VALIDATE_INPUTS when the prompt is queued: a bad width never reaches a run."""
    from nodes.planning import UnisonTaskRouter

    problem = UnisonTaskRouter.VALIDATE_INPUTS(width=100, height=-16, frames=6, fps=1000)
    assert isinstance(problem, str)
    for name in ("width 100", "height -16", "frames 6", "fps 1000"):
        assert name in problem
    assert UnisonTaskRouter.VALIDATE_INPUTS(width=0, height=480, frames=81, fps=24) is True
    assert UnisonTaskRouter.VALIDATE_INPUTS(width=None, height=None, frames=None, fps=None) is True  # linked


# --------------------------------------------------------------------------- bad plans never reach a model


class Spy:
    """Counts loads and forwards of every stage-two model, and stage one's hidden-state passes."""

    def __init__(self, vace_dir):
        self.vace_dir, self.loads, self.forwards, self.hidden = vace_dir, 0, 0, 0

    def load(self):
        self.loads += 1
        models = load_vace_diffusers(self.vace_dir, device="cpu")
        for module in (models.transformer, models.vae, models.text_encoder):
            module.register_forward_pre_hook(self._count)
        return models

    def _count(self, module, args):
        self.forwards += 1

    def hidden_states(self, instruction):
        self.hidden += 1
        return None


@pytest.fixture(scope="module")
def vace_dir(tmp_path_factory):
    return build_tiny_vace_diffusers(tmp_path_factory.mktemp("plans") / "Wan2.1-VACE-1.3B-diffusers")


def forced(plan: Plan, **values) -> Plan:
    """A plan with fields forced past validation, as a buggy or hostile caller could build one."""
    plan = dataclasses.replace(plan)
    for name, value in values.items():
        object.__setattr__(plan, name, value)
    return plan


def image(name: str) -> Medium:
    return Medium(name=name, kind="image", frames=np.zeros((1, 8, 8, 3), np.uint8))


GOOD = default_plan("text_to_video", width=32, height=32, num_frames=5, prompt="a lion")
EDIT = default_plan("image_editing", [IMAGE], width=32, height=32, source_index=0, prompt="purple sky")
BAD_PLANS = [
    ("width forced to 100", forced(GOOD, width=100), [], PlanError, "plan field 'width'"),
    ("frames forced to 6", forced(GOOD, num_frames=6), [], PlanError, "plan field 'num_frames'"),
    ("huge size forced", forced(GOOD, width=10**6, height=10**6), [], PlanError, "plan field 'width'"),
    ("source index forced past the media", forced(EDIT, source_index=3), [image("cat.png")], PlanError,
     "plan field 'source_index'"),
    ("more references than media", EDIT, [], MediaError, "media"),
    ("a video where the plan says image", EDIT,
     [Medium(name="cat.png", kind="video", frames=np.zeros((5, 8, 8, 3), np.uint8))], MediaError, "is a decoded video"),
    ("an understanding plan", default_plan("image_understanding", [IMAGE]), [image("cat.png")], UnisonError,
     "understanding task"),
]


@pytest.mark.parametrize("name, plan, media, error, needle", BAD_PLANS, ids=[case[0] for case in BAD_PLANS])
def test_a_bad_plan_fails_before_any_model_is_loaded_or_run(vace_dir, name, plan, media, error, needle):
    spy = Spy(vace_dir)
    pipeline = UnisonPipeline(planner=RulePlanner(), stage_one=spy, projector=lambda: object(), vace=spy.load,
                              options=SamplingOptions(steps=1))
    instruction = parse_instruction("Create a video of a lion")
    with pytest.raises(error, match=needle):
        pipeline.generate(plan, instruction, media)
    assert (spy.loads, spy.forwards, spy.hidden) == (0, 0, 0), name
    assert pipeline.loaded() == []


def test_the_spy_sees_a_good_plan_run(vace_dir):
    """Guard for the test above: with a valid plan the same spies do see loading and every model run."""
    spy = Spy(vace_dir)
    pipeline = UnisonPipeline(planner=RulePlanner(), stage_one=spy, vace=spy.load, options=SamplingOptions(steps=1))
    result = pipeline.generate(GOOD, parse_instruction("Create a video of a lion"), [])
    assert result.frames.shape == (5, 32, 32, 3)
    assert spy.loads == 1 and spy.forwards > 0


def test_a_user_edited_plan_given_to_run_is_checked_first(vace_dir):
    spy = Spy(vace_dir)
    pipeline = UnisonPipeline(planner=RulePlanner(), vace=spy.load, options=SamplingOptions(steps=1))
    with pytest.raises(PlanError, match="plan field 'num_frames'"):
        pipeline.run("Create a video of a lion, 32x32", plan=forced(GOOD, num_frames=2))
    assert (spy.loads, spy.forwards) == (0, 0)
