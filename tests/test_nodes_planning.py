"""Planner, Task Router, Output Switch and Save Text nodes: real plans from real inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from harness.fixtures import LORA_NAME, QWEN_NAME, comfy, install_models, tiny_models  # noqa: F401 - fixtures
from PIL import Image

from nodes import comfy_bridge
from nodes.loaders import UnisonPlannerLoader
from nodes.outputs import UnisonSaveText
from nodes.packets import PlanPacket
from nodes.planning import (
    FALLBACK_ERROR,
    NO_ANSWER,
    UnisonOutputSwitch,
    UnisonPlanner,
    UnisonTaskRouter,
    override_plan,
)
from unison_runtime.errors import PathError, PlanError, PlannerOutputError, WeightsError
from unison_runtime.plan import Task

LION = ("Please create a video with a width of 768 pixels and a height of 480 pixels, that is 2 seconds long, "
        "of a lion walking around in its habitat.")


def plan_node(instruction: str, **inputs):
    out = UnisonPlanner().run(instruction, **inputs)
    packet, answer, hidden = out["result"]
    return packet, answer, hidden, out["ui"]["text"][0]


def route(packet: PlanPacket, task="auto", width=0, height=0, frames=0, frame_index="auto", fps=0):
    out = UnisonTaskRouter().route(packet, task, width, height, frames, frame_index, fps)
    names = UnisonTaskRouter.RETURN_NAMES
    return dict(zip(names, out["result"], strict=True)), out["ui"]["text"][0]


# --------------------------------------------------------------------------- Planner with the rule planner


def test_rule_planner_decides_a_plain_instruction(comfy) -> None:  # noqa: F811
    packet, answer, hidden, shown = plan_node(LION)
    plan = packet.plan
    assert (plan.task, plan.width, plan.height, plan.num_frames, plan.source) == (Task.TEXT_TO_VIDEO, 768, 480, 49,
                                                                                   "rules")
    assert plan.planner_text == "<BORES>768,480<EORES><BONF>48<EONF><CFV>"
    assert (answer, hidden) == ("", None)
    assert "task: text_to_video → video" in shown and "768x480, 49 frames @ 24 fps" in shown


def test_graph_image_becomes_a_named_medium(comfy) -> None:  # noqa: F811
    image = torch.rand(1, 24, 40, 3)
    packet, *_ , shown = plan_node("Turn ###image1### into a 2 second video, ending on this frame.", image1=image)
    plan = packet.plan
    assert plan.task is Task.IMAGE_TO_VIDEO and plan.frame_index == "last"
    assert [(m.path, m.kind, m.role) for m in plan.media] == [("image1", "image", "frame")]
    (medium,) = packet.ordered_media()
    expected = np.floor(image.numpy() * 255 + 0.5).astype(np.uint8)
    assert medium.name == "image1" and medium.frames.dtype == np.uint8
    np.testing.assert_array_equal(medium.frames, expected)
    assert "media #0: image1 (image, frame)" in shown


def test_graph_mask_makes_an_edit_with_roles(comfy) -> None:  # noqa: F811
    image, mask = torch.rand(1, 32, 32, 3), torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    packet, *_ = plan_node("Replace the masked area of ###image1### with sunflowers, using ###mask1### as the mask.",
                           image1=image, mask1=mask)
    plan = packet.plan
    assert plan.task is Task.IMAGE_EDITING
    assert (plan.source_index, plan.mask_index) == (0, 1)
    assert [m.role for m in plan.media] == ["source", "mask"]
    mask_medium = packet.ordered_media()[1]
    assert mask_medium.frames.shape == (1, 32, 32, 3)
    assert mask_medium.frames[0, 16, 16].tolist() == [255, 255, 255] and mask_medium.frames[0, 0, 0].max() == 0


def test_graph_video_frames_are_a_video(comfy) -> None:  # noqa: F811
    video = torch.rand(7, 16, 16, 3)
    packet, *_ = plan_node("Generate a video of a robot dancing, following the pose in ###video1###.", video1=video)
    assert packet.plan.task is Task.VIDEO_CONTROLLABLE
    assert packet.ordered_media()[0].frames.shape == (7, 16, 16, 3)


def test_a_wired_video_informs_the_plan_as_the_same_video_named_by_file(comfy) -> None:  # noqa: F811
    # 33 frames of 96x64: the plan takes the clip's length and shape where the words are silent (PLANNER.md).
    packet, *_ = plan_node("Generate a video of a robot dancing, following the pose in ###video1###.",
                           video1=torch.rand(33, 64, 96, 3))
    plan = packet.plan
    assert (plan.task, plan.num_frames) == (Task.VIDEO_CONTROLLABLE, 33)
    assert plan.width * 64 == plan.height * 96  # the clip's 3:2 on the plan's short side
    assert any("follows the shape of 'video1'" in note for note in plan.notes)


def test_file_reference_reads_from_the_input_folder(comfy) -> None:  # noqa: F811
    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(comfy.input / "cat.png")
    packet, *_ = plan_node("What is in ###cat.png###?")
    assert packet.plan.task is Task.IMAGE_UNDERSTANDING
    np.testing.assert_array_equal(packet.ordered_media()[0].frames[0], pixels)


def test_a_file_replaced_under_the_same_name_is_read_again(comfy) -> None:  # noqa: F811
    Image.new("RGB", (8, 8), "red").save(comfy.input / "cat.png")
    instruction = "What is in ###cat.png### and ###image1###?"
    before = UnisonPlanner.IS_CHANGED(instruction=instruction)
    assert before == UnisonPlanner.IS_CHANGED(instruction=instruction)
    Image.new("RGB", (16, 8), "blue").save(comfy.input / "cat.png")
    assert UnisonPlanner.IS_CHANGED(instruction=instruction) != before


def test_references_outside_the_input_folder_are_refused(comfy, tmp_path: Path) -> None:  # noqa: F811
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    with pytest.raises(PathError, match=r"contains .\.\..*allowed folder"):
        plan_node("Describe ###../../secret.png###")
    with pytest.raises(PathError, match="not found"):
        plan_node("Describe ###missing.png###")


def test_named_but_unconnected_slot_is_a_clear_error(comfy) -> None:  # noqa: F811
    with pytest.raises(PathError, match=r"###image2###.*no media is connected"):
        plan_node("Blend ###image1### and ###image2###", image1=torch.rand(1, 8, 8, 3))


def test_connected_but_unnamed_slot_is_noted(comfy) -> None:  # noqa: F811
    packet, *_, shown = plan_node("A watercolor painting of a harbor.", image1=torch.rand(1, 8, 8, 3))
    assert packet.plan.task is Task.TEXT_TO_IMAGE and packet.media == ()
    assert "image1 is connected but the instruction never names ###image1###" in shown
    assert packet.plan.notes[-1].startswith("image1 is connected")


def test_instruction_is_validated_at_submit_time(comfy) -> None:  # noqa: F811
    validate = UnisonPlanner.VALIDATE_INPUTS
    assert validate(instruction=LION) is True
    assert validate(instruction=None) is True  # linked from another node: checked when it runs
    assert "instruction is empty" in validate(instruction="  ")
    assert "not found" in validate(instruction="Describe ###nope.png###")
    assert "unsupported extension" in validate(instruction="Describe ###notes.txt###")
    assert validate(instruction="Describe ###image1###") is True  # a graph slot: checked when it runs


# --------------------------------------------------------------------------- Planner with Qwen


@pytest.fixture(scope="module")
def scripted(tiny_models, tmp_path_factory):  # noqa: F811
    from unison_runtime.testing.tiny_qwen import script_tiny_planner

    root = tmp_path_factory.mktemp("scripted")
    return {
        "video": script_tiny_planner(tiny_models.merged, "<BORES>32,16<EORES><BONF>4<EONF><CFV>", root / "video"),
        "answer": script_tiny_planner(tiny_models.merged, "Two cats", root / "answer"),
    }


def load_planner_node(lora: str = "none"):
    return UnisonPlannerLoader().load(QWEN_NAME, lora, "auto", "auto", "sdpa")[0]


def test_qwen_planner_plans_from_its_tokens_and_gives_hidden_states(comfy, tiny_models, scripted) -> None:  # noqa: F811
    install_models(comfy, tiny_models, planner=scripted["video"])
    loaded = load_planner_node()
    packet, answer, hidden, shown = plan_node("A kite over the sea, three seconds.", planner=loaded)
    plan = packet.plan
    assert (plan.task, plan.width, plan.height, plan.num_frames, plan.source) == (Task.TEXT_TO_VIDEO, 32, 16, 5,
                                                                                   "lora")
    assert answer == "" and hidden.dtype == torch.float32 and hidden.shape[0] == 1 and hidden.shape[2] == 64
    assert "decided by: lora" in shown
    # ComfyUI's model manager was asked to place the planner before use.
    assert comfy.loads and comfy.loads[-1][0] is loaded.patcher


def test_qwen_planner_on_the_cpu_gives_its_memory_back_and_loads_again(comfy, tiny_models, scripted,  # noqa: F811
                                                                       caplog) -> None:
    """ComfyUI's offload device is the CPU: the planner's RAM goes back after it planned, and a later plan
    (a changed instruction) loads it again through the same handle ComfyUI's cache keeps."""
    install_models(comfy, tiny_models, planner=scripted["video"])
    loaded = load_planner_node()
    reloads = []
    reload = loaded.reload
    loaded.reload = lambda: reloads.append(True) or reload()
    first, _, hidden, _ = plan_node("A kite over the sea, three seconds.", planner=loaded)
    assert loaded.on_cpu and not loaded.planner.loaded and reloads == []
    caplog.set_level("INFO", logger="unison")
    again, _, hidden_again, _ = plan_node("A kite over the sea, three seconds.", planner=loaded)
    assert reloads == [True] and "loading the planner" in caplog.text
    assert again.plan == first.plan and torch.equal(hidden_again, hidden)  # the same planner, loaded again
    assert comfy.loads[-1][0] is loaded.patcher  # the new copy was placed by ComfyUI's model manager
    assert not loaded.planner.loaded  # and given back again


def test_qwen_planner_answers_understanding_tasks(comfy, tiny_models, scripted) -> None:  # noqa: F811
    install_models(comfy, tiny_models, planner=scripted["answer"])
    packet, answer, hidden, _shown = plan_node("What is in ###image1###?", planner=load_planner_node(),
                                              image1=torch.rand(1, 16, 16, 3))
    assert packet.plan.task is Task.IMAGE_UNDERSTANDING and packet.plan.answer == answer == "Two cats"
    assert hidden is None
    result, _ = route(packet)
    assert result["text"] == "Two cats"


def test_unreadable_planner_output_falls_back_or_fails_as_chosen(comfy, tiny_models, tmp_path) -> None:  # noqa: F811
    from unison_runtime.testing.tiny_qwen import script_tiny_planner

    broken = script_tiny_planner(tiny_models.merged, "<BORES>32<EORES><CFI>", tmp_path / "broken")
    install_models(comfy, tiny_models, planner=broken)
    loaded = load_planner_node()
    packet, *_, shown = plan_node("A watercolor painting of a harbor.", planner=loaded)
    assert packet.plan.source == "rules" and packet.plan.task is Task.TEXT_TO_IMAGE
    assert "could not be read" in shown and "'<BORES>32<EORES><CFI>'" in shown
    with pytest.raises(PlannerOutputError, match="BORES"):
        UnisonPlanner().run("A watercolor painting of a harbor.", on_unreadable_plan=FALLBACK_ERROR, planner=loaded)


def test_planner_loader_with_lora_reuses_loaded_models(comfy, tiny_models, tmp_path) -> None:  # noqa: F811
    install_models(comfy, tiny_models)
    first = load_planner_node(LORA_NAME)
    assert first.planner.has_planning_lora and first.label == f"{QWEN_NAME} + {LORA_NAME}"
    assert load_planner_node(LORA_NAME) is first  # same choices, same files: the live object is reused
    assert load_planner_node("none") is not first
    # A LoRA replaced under the same name changes IS_CHANGED (ComfyUI re-runs the loader) and the key.
    copy = shutil.copytree(tiny_models.lora, tmp_path / "lora-copy")
    (comfy.models / "unison" / LORA_NAME).unlink()
    (comfy.models / "unison" / LORA_NAME).symlink_to(copy)
    before = UnisonPlannerLoader.IS_CHANGED(model=QWEN_NAME, lora=LORA_NAME)
    assert before == UnisonPlannerLoader.IS_CHANGED(model=QWEN_NAME, lora=LORA_NAME)
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert UnisonPlannerLoader.IS_CHANGED(model=QWEN_NAME, lora=LORA_NAME) != before
    assert load_planner_node(LORA_NAME) is not first
    # A deleted model is reported by the loader, not served from a cache.
    shutil.rmtree(copy)
    assert "missing" in UnisonPlannerLoader.IS_CHANGED(model=QWEN_NAME, lora=LORA_NAME)
    with pytest.raises(WeightsError, match=f"'{LORA_NAME}' is not in ComfyUI's models/unison"):
        load_planner_node(LORA_NAME)


# --------------------------------------------------------------------------- Task Router


@pytest.fixture
def video_packet(comfy) -> PlanPacket:  # noqa: F811
    return plan_node(LION)[0]


def test_router_auto_keeps_the_plan_and_opens_one_branch(video_packet) -> None:
    result, _shown = route(video_packet)
    assert result["plan"].plan == video_packet.plan
    assert (result["task"], result["width"], result["height"], result["length"], result["fps"]) == (
        "text_to_video", 768, 480, 49, 24.0)
    assert result["prompt"] == video_packet.plan.prompt
    assert comfy_bridge.is_blocked(result["text"]) and comfy_bridge.is_blocked(result["image"])
    assert result["video"].plan.task is Task.TEXT_TO_VIDEO
    assert result["text"].message is None  # silent: a branch not taken is not an error


def test_router_overrides_mark_the_plan(video_packet) -> None:
    result, shown = route(video_packet, width=32, height=48, frames=9, fps=16)
    plan = result["plan"].plan
    assert (plan.width, plan.height, plan.num_frames, plan.fps, plan.source) == (32, 48, 9, 16, "override")
    assert plan.planner_text == "<BORES>32,48<EORES><BONF>8<EONF><CFV>"
    assert (result["width"], result["height"], result["length"], result["fps"]) == (32, 48, 9, 16.0)
    assert "decided by: override" in shown


def test_router_task_override_switches_branch_and_defaults(video_packet) -> None:
    result, _ = route(video_packet, task="text_to_image")
    plan = result["plan"].plan
    assert plan.task is Task.TEXT_TO_IMAGE and plan.num_frames == 1 and plan.source == "override"
    assert not comfy_bridge.is_blocked(result["image"]) and comfy_bridge.is_blocked(result["video"])
    result, _ = route(video_packet, task="text_understanding")
    assert result["text"] == NO_ANSWER and comfy_bridge.is_blocked(result["image"])


def test_router_ignores_overrides_that_do_not_apply_with_a_note(comfy) -> None:  # noqa: F811
    packet = plan_node("A watercolor painting of a harbor.")[0]
    result, shown = route(packet, frames=49, frame_index="last", fps=12)
    plan = result["plan"].plan
    assert plan.source == "rules" and plan.num_frames == 1
    assert "override num_frames=49 ignored: text_to_image is not a video task" in shown
    assert "override frame_index=last ignored" in shown


def test_router_frame_index_override(comfy) -> None:  # noqa: F811
    packet = plan_node("Turn ###image1### into a 2 second video.", image1=torch.rand(1, 8, 8, 3))[0]
    assert packet.plan.frame_index == "first"
    result, _ = route(packet, frame_index="last")
    assert result["plan"].plan.frame_index == "last"
    assert "<BOFIDX>1<EOFIDX>" in result["plan"].plan.planner_text


def test_task_override_to_editing_picks_source_and_mask(comfy) -> None:  # noqa: F811
    packet = plan_node("Describe ###image1### and ###mask1###.", image1=torch.rand(1, 8, 8, 3),
                       mask1=torch.ones(1, 8, 8))[0]
    plan, _notes = override_plan(packet.plan, task="image_editing")
    assert (plan.source_index, plan.mask_index) == (0, 1) and [m.role for m in plan.media] == ["source", "mask"]
    with pytest.raises(PlanError, match="needs a video to edit"):
        override_plan(packet.plan, task="video_editing")


def test_router_rejects_invalid_overrides_at_submit_and_run_time(video_packet) -> None:
    validate = UnisonTaskRouter.VALIDATE_INPUTS
    assert validate(width=0, height=0, frames=0, fps=0) is True
    assert validate(width=None, height=None, frames=None, fps=None) is True  # linked: checked at run time
    assert validate(width=512, height=1024, frames=81, fps=30) is True
    message = validate(width=100, height=4096, frames=8, fps=500)
    assert "width 100 must be 0 (auto) or a multiple of 16" in message
    assert "height 4096" in message and "frames 8 must be auto or of the form 4k+1" in message
    assert "fps 500" in message
    with pytest.raises(PlanError, match=r"'width'.*multiple of 16"):
        route(video_packet, width=100)  # e.g. a linked value that bypassed submit-time checks


# --------------------------------------------------------------------------- Output Switch, Save Text, packets


def test_output_switch_routes_frames_by_plan(comfy) -> None:  # noqa: F811
    frames = torch.rand(5, 16, 16, 3)
    video = plan_node(LION)[0]
    image, out = UnisonOutputSwitch().switch(video, frames)
    assert comfy_bridge.is_blocked(image) and out is frames
    picture = plan_node("A watercolor painting of a harbor.")[0]
    image, out = UnisonOutputSwitch().switch(picture, frames)
    assert torch.equal(image, frames[:1]) and comfy_bridge.is_blocked(out)
    with pytest.raises(PlanError, match="answered by stage one"):
        UnisonOutputSwitch().switch(plan_node("What is the capital of France?")[0], frames)


def test_save_text_writes_numbered_files(comfy) -> None:  # noqa: F811
    node = UnisonSaveText()
    first = node.save("Paris.", "unison/answer")["ui"]["files"][0]
    second = node.save("Lyon.", "unison/answer")["ui"]["files"][0]
    assert (first["filename"], second["filename"]) == ("answer_00001.txt", "answer_00002.txt")
    assert (comfy.output / "unison" / "answer_00002.txt").read_text() == "Lyon."
    assert "must be a relative name" in UnisonSaveText.VALIDATE_INPUTS(filename_prefix="../../etc/x")


def test_plan_packet_prints_as_plan_json(comfy) -> None:  # noqa: F811
    packet = plan_node(LION)[0]
    assert json.loads(str(packet)) == packet.plan.to_dict()
    assert repr(packet) == "PlanPacket(text_to_video, 0 media)"


def test_cancel_stops_qwen_generation_between_tokens(comfy, tiny_models, scripted) -> None:  # noqa: F811
    from harness.comfy_env import InterruptProcessingException

    install_models(comfy, tiny_models, planner=scripted["answer"])
    loaded = load_planner_node()
    comfy.interrupt_after_checks = 2  # the first generated token passes, the second is interrupted
    with pytest.raises(InterruptProcessingException):
        plan_node("How many cats are there?", planner=loaded)
    assert comfy.interrupt_checks == 2
    _packet, answer, *_ = plan_node("How many cats are there?", planner=loaded)  # still usable afterwards
    assert answer == "Two cats"


def test_qwen_answers_about_a_graph_video(comfy, tiny_models, scripted) -> None:  # noqa: F811
    install_models(comfy, tiny_models, planner=scripted["answer"])
    packet, answer, *_ = plan_node("What happens in ###video1###?", planner=load_planner_node(),
                                   video1=torch.rand(6, 16, 16, 3))
    assert packet.plan.task is Task.VIDEO_UNDERSTANDING and answer == "Two cats"
