"""The shipped workflows: UI format as the editor saves it, converted to API prompts, run end to end.

Each workflow is converted the way ComfyUI's frontend does (``harness.workflow.ui_to_api``) and run
with the pack's node classes, tiny models in the real formats, and test doubles of the core nodes
(``harness.core_nodes``). Only what a user would change is changed: bypassing the Planner Loader
(Ctrl+B), Router overrides, and fewer sampling steps so the tests stay fast.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import build_workflows, core_nodes, fixtures
from harness.fixtures import PROJECTOR_NAME, comfy, install_models, link, tiny_models  # noqa: F401 - fixtures
from harness.workflow import BYPASSED, MUTED, ConversionError, execute_prompt, ui_to_api, validate_prompt
from PIL import Image

import nodes
from nodes.planning import NO_ANSWER
from unison_runtime.media import read_video

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
FAST = {"UnisonVaceSampler": {"steps": 2, "guidance": 1.0}}


@pytest.fixture
def classes(comfy) -> dict[str, type]:  # noqa: F811
    return {**core_nodes.CORE_NODES, **nodes.NODE_CLASS_MAPPINGS}


def load(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text(encoding="utf-8"))


def nodes_of(workflow: dict[str, Any], type_: str) -> list[dict[str, Any]]:
    return [n for n in workflow["nodes"] if n["type"] == type_]


def write_example_media(env) -> None:
    fixtures.write_example_media(env.input)


def prepare(workflow: dict[str, Any], classes: dict[str, type], *, rule_planner: bool = False,
            set_inputs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Convert as the frontend does; optionally bypass the Planner Loader first and then set inputs by class."""
    workflow = copy.deepcopy(workflow)
    if rule_planner:
        for node in nodes_of(workflow, "UnisonPlannerLoader"):
            node["mode"] = BYPASSED
    prompt = ui_to_api(workflow, classes)
    for node in prompt.values():
        node["inputs"].update({**FAST, **(set_inputs or {})}.get(node["class_type"], {}))
    return prompt


def executed_types(prompt: dict[str, Any], ids: list[str]) -> set[str]:
    return {prompt[i]["class_type"] for i in ids}


def run_with_rules(env, tiny, classes: dict[str, type], name: str, instruction: str) -> tuple[dict[str, Any], Any]:
    """Run workflow ``name`` on the tiny models, the Planner Loader bypassed so the rule planner decides."""
    install_models(env, tiny)
    prompt = prepare(load(name), classes, rule_planner=True, set_inputs={"UnisonPlanner": {"instruction": instruction}})
    return prompt, execute_prompt(prompt, classes)


# --------------------------------------------------------------------------- the files


def test_every_expected_workflow_is_shipped() -> None:
    assert sorted(build_workflows.BUILDERS) == SHIPPED
    assert {"unison_auto", "unison_native_wan"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_is_what_the_builder_writes(name: str, classes) -> None:
    built = build_workflows.BUILDERS[name](classes).to_json()
    assert load(name) == built, f"workflows/{name}.json is stale: run python tests/harness/build_workflows.py"


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_is_a_consistent_ui_format_graph(name: str, classes) -> None:
    workflow = load(name)
    assert {"id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra",
            "version"} <= set(workflow)
    assert workflow["version"] == 0.4
    by_id = {n["id"]: n for n in workflow["nodes"]}
    assert workflow["last_node_id"] == max(by_id) and workflow["last_link_id"] == len(workflow["links"])
    for link_id, origin, origin_slot, target, target_slot, type_ in workflow["links"]:
        source, sink = by_id[origin], by_id[target]
        assert link_id in source["outputs"][origin_slot]["links"]
        assert source["outputs"][origin_slot]["type"] == type_
        entry = sink["inputs"][target_slot]
        assert entry["link"] == link_id
        assert entry["type"] in (type_, "*") or (entry["type"] == "COMBO" and type_ == "STRING")
    for node in workflow["nodes"]:
        assert node["type"] == "MarkdownNote" or node["properties"]["Node name for S&R"] == node["type"]
        assert [n["order"] for n in workflow["nodes"]].count(node["order"]) == 1
    prompt = ui_to_api(workflow, classes)  # every widgets_values list lines up with its node definition
    assert set(prompt) == {str(n["id"]) for n in workflow["nodes"] if n["type"] != "MarkdownNote"}


def test_conversion_maps_widgets_controls_links_and_bypass(classes) -> None:
    workflow = load("unison_native_wan")
    prompt = ui_to_api(workflow, classes)
    by_type = {n["class_type"]: (i, n) for i, n in prompt.items()}
    ksampler = by_type["KSampler"][1]["inputs"]
    # [seed, "randomize", steps, cfg, sampler, scheduler, denoise]: the control value is skipped.
    assert (ksampler["seed"], ksampler["steps"], ksampler["cfg"], ksampler["sampler_name"], ksampler["denoise"]) == (
        0, 30, 5.0, "uni_pc", 1.0)
    router_id = by_type["UnisonTaskRouter"][0]
    wan = by_type["WanVaceToVideo"][1]["inputs"]
    assert wan["width"] == [router_id, 2] and wan["height"] == [router_id, 3] and wan["length"] == [router_id, 4]
    assert wan["batch_size"] == 1 and wan["strength"] == 1.0
    planner_id = by_type["UnisonPlanner"][0]
    loader_id = by_type["UnisonPlannerLoader"][0]
    assert prompt[planner_id]["inputs"]["planner"] == [loader_id, 0]

    bypassed = copy.deepcopy(workflow)
    for node in nodes_of(bypassed, "UnisonPlannerLoader"):
        node["mode"] = BYPASSED
    prompt = ui_to_api(bypassed, classes)
    assert loader_id not in prompt and "planner" not in prompt[planner_id]["inputs"]
    muted = copy.deepcopy(workflow)
    for node in nodes_of(muted, "SaveImage"):
        node["mode"] = MUTED
    assert "SaveImage" not in {n["class_type"] for n in ui_to_api(muted, classes).values()}
    broken = copy.deepcopy(workflow)
    nodes_of(broken, "KSampler")[0]["widgets_values"].pop()
    with pytest.raises(ConversionError, match="KSampler"):
        ui_to_api(broken, classes)


def test_upload_widget_value_is_skipped(comfy, classes) -> None:  # noqa: F811
    write_example_media(comfy)
    prompt = ui_to_api(load("unison_reference"), classes)
    (load_image,) = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    assert load_image["inputs"] == {"image": build_workflows.EXAMPLE_IMAGE}


def test_invalid_router_override_is_refused_at_submit(comfy, tiny_models, classes) -> None:  # noqa: F811
    install_models(comfy, tiny_models)
    prompt = prepare(load("unison_auto"), classes, set_inputs={"UnisonTaskRouter": {"width": 100, "frames": 8}})
    errors = validate_prompt(prompt, classes)
    (router_errors,) = [e for i, e in errors.items() if prompt[i]["class_type"] == "UnisonTaskRouter"]
    assert "multiple of 16" in router_errors[0] and "4k+1" in router_errors[0]


# --------------------------------------------------------------------------- unison_auto end to end


@pytest.mark.slow
def test_auto_answers_a_question_without_loading_stage_two(comfy, tiny_models, classes) -> None:  # noqa: F811
    prompt, run = run_with_rules(comfy, tiny_models, classes, "unison_auto", "What is the capital of France?")
    ran = executed_types(prompt, run.executed)
    assert ran == {"UnisonPlanner", "UnisonTaskRouter", "PreviewAny"}
    (preview,) = run.of_type(prompt, "PreviewAny")
    assert run.ui[preview]["text"] == (NO_ANSWER,)
    assert executed_types(prompt, run.blocked) == {"UnisonVaceSampler", "SaveImage", "CreateVideo", "SaveVideo"}
    assert not run.blocked_messages  # branches not taken are skipped silently
    assert not list(comfy.output.rglob("*.png")) and not list(comfy.output.rglob("*.mp4"))


@pytest.mark.slow
def test_auto_makes_an_image(comfy, tiny_models, classes) -> None:  # noqa: F811
    prompt, run = run_with_rules(comfy, tiny_models, classes, "unison_auto",
                                 "A watercolor painting of a harbor at dusk, 32x48.")
    assert executed_types(prompt, run.executed) >= {"UnisonVaceLoader", "UnisonProjector", "UnisonVaceSampler",
                                                    "SaveImage"}
    assert executed_types(prompt, run.blocked) == {"UnisonVaceSampler", "CreateVideo", "SaveVideo", "PreviewAny"}
    assert len(run.of_type(prompt, "UnisonVaceSampler")) == 1
    (saved,) = comfy.output.rglob("*.png")
    assert saved.parent == comfy.output / "unison" and Image.open(saved).size == (32, 48)
    assert not list(comfy.output.rglob("*.mp4"))


@pytest.mark.slow
def test_auto_makes_a_video(comfy, tiny_models, classes) -> None:  # noqa: F811
    prompt, run = run_with_rules(comfy, tiny_models, classes, "unison_auto",
                                 "Create a video of waves rolling onto a beach, 32x32, 4 frames.")
    assert "SaveVideo" in executed_types(prompt, run.executed)
    assert executed_types(prompt, run.blocked) == {"UnisonVaceSampler", "SaveImage", "PreviewAny"}
    (saved,) = comfy.output.rglob("*.mp4")
    video = read_video(saved)
    assert video.frames.shape == (5, 32, 32, 3) and round(video.fps) == 24
    assert not list(comfy.output.rglob("*.png"))


@pytest.mark.slow
def test_auto_with_the_qwen_planner_and_projector_tokens(comfy, tiny_models, classes, tmp_path) -> None:  # noqa: F811
    from unison_runtime.testing.tiny_qwen import script_tiny_planner

    scripted = script_tiny_planner(tiny_models.merged, "<BORES>32,16<EORES><BONF>4<EONF><CFV>", tmp_path / "video")
    install_models(comfy, tiny_models, planner=scripted)
    prompt = prepare(load("unison_auto"), classes, set_inputs={"UnisonPlannerLoader": {"lora": "none"}})
    run = execute_prompt(prompt, classes)
    (planner,) = run.of_type(prompt, "UnisonPlanner")
    packet, _, hidden = run.outputs[planner]
    assert packet.plan.source == "lora" and hidden is not None
    (projector,) = run.of_type(prompt, "UnisonProjector")
    assert run.outputs[projector][0].shape == (1, 4, 32)
    (saved,) = comfy.output.rglob("*.mp4")
    assert read_video(saved).frames.shape == (5, 16, 32, 3)


@pytest.mark.slow
def test_auto_shows_the_qwen_answer(comfy, tiny_models, classes, tmp_path) -> None:  # noqa: F811
    from unison_runtime.testing.tiny_qwen import script_tiny_planner

    install_models(comfy, tiny_models, planner=script_tiny_planner(tiny_models.merged, "Two cats", tmp_path / "a"))
    prompt = prepare(load("unison_auto"), classes, set_inputs={
        "UnisonPlannerLoader": {"lora": "none"}, "UnisonPlanner": {"instruction": "How many cats are there?"}})
    run = execute_prompt(prompt, classes)
    (preview,) = run.of_type(prompt, "PreviewAny")
    assert run.ui[preview]["text"] == ("Two cats",)
    assert "UnisonVaceLoader" not in executed_types(prompt, run.executed)


# --------------------------------------------------------------------------- the family workflows


FAMILIES = {
    "unison_edit": ("image_editing", "png"),
    "unison_reference": ("image_reference", "png"),
    "unison_frame_to_video": ("image_to_video", "mp4"),
    "unison_control": ("video_controllable", "mp4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_workflow_wires_its_media(name: str, comfy, tiny_models, classes) -> None:  # noqa: F811
    install_models(comfy, tiny_models)
    write_example_media(comfy)
    task, extension = FAMILIES[name]
    prompt = prepare(load(name), classes, rule_planner=True,
                     set_inputs={"UnisonTaskRouter": {"width": 32, "height": 32, "frames": "5"}})
    run = execute_prompt(prompt, classes)
    (router,) = run.of_type(prompt, "UnisonTaskRouter")
    plan = run.outputs[router][0].plan
    assert plan.task.value == task and plan.source == "override"
    assert all(m.path in ("image1", "mask1", "video1") for m in plan.media) and plan.media
    (saved,) = [p for p in comfy.output.rglob("*") if p.suffix in (".png", ".mp4")]
    assert saved.suffix == f".{extension}"
    if name == "unison_edit":
        assert (plan.source_index, plan.mask_index) == (0, 1)
        mask = run.outputs[router][0].ordered_media()[1].frames[0, ..., 0]
        assert mask[16, 16] == 255 and mask[0, 0] == 0  # LoadImage's alpha became the edit mask


# --------------------------------------------------------------------------- the native Wan workflow


@pytest.mark.slow
def test_native_wan_feeds_plan_sizes_vace_inputs_and_tokens(comfy, tiny_models, classes, tmp_path) -> None:  # noqa: F811
    from unison_runtime.testing.tiny_projector import build_tiny_projector
    from unison_runtime.testing.tiny_qwen import script_tiny_planner

    scripted = script_tiny_planner(tiny_models.merged, "<BORES>32,16<EORES><BONF>4<EONF><CFV>", tmp_path / "video")
    install_models(comfy, tiny_models, planner=scripted)
    # ComfyUI's umT5 conditioning is 4096 wide, like the released projector's tokens.
    (comfy.models / "unison" / PROJECTOR_NAME).unlink()
    link(comfy.models / "unison" / PROJECTOR_NAME,
         build_tiny_projector(tmp_path / "wide.pth", input_dim=64, hidden_dim=16, t5_dim=4096))
    core_nodes.RECORDED.clear()
    prompt = prepare(load("unison_native_wan"), classes, set_inputs={"UnisonPlannerLoader": {"lora": "none"}})
    run = execute_prompt(prompt, classes)
    (wan,) = core_nodes.RECORDED["WanVaceToVideo"]
    assert (wan["width"], wan["height"], wan["length"]) == (32, 16, 5)
    assert wan["control_video"].shape == (5, 16, 32, 3) and wan["control_masks"].shape == (5, 16, 32)
    assert wan["reference_image"] is None
    positive, negative = wan["positive"][0][0], wan["negative"][0][0]
    assert positive.shape == negative.shape == (1, 2048, 4096)
    (projector,) = run.of_type(prompt, "UnisonProjector")
    torch.testing.assert_close(positive[:, 512:516], run.outputs[projector][0])
    assert negative[:, 512:].abs().sum() == 0
    titles = {prompt[i]["_meta"]["title"] for i in run.executed}
    assert {"umT5: the plan's prompt", "umT5: negative prompt"} <= titles
    assert executed_types(prompt, run.blocked) == {"SaveImage"}
    assert len(list(comfy.output.rglob("*.mp4"))) == 1


@pytest.mark.slow
def test_native_wan_saves_an_image_plan_as_png(comfy, tiny_models, classes) -> None:  # noqa: F811
    prompt, run = run_with_rules(comfy, tiny_models, classes, "unison_native_wan",
                                 "A watercolor painting of a harbor, 32x32.")
    assert executed_types(prompt, run.blocked) == {"CreateVideo", "SaveVideo"}
    (saved,) = comfy.output.rglob("*.png")
    assert Image.open(saved).size == (32, 32)
    (wan,) = [r for r in core_nodes.RECORDED["WanVaceToVideo"] if r["length"] == 1][-1:]
    assert wan["control_masks"].min() == 1  # text_to_image: generate everything
