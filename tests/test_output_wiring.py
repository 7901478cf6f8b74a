"""Every output of every Unison node, wired into what a user would put behind it in ComfyUI.

IMAGE outputs go into core Save Image (the test double reads ``images[0]`` first, as ComfyUI's does,
so ``None`` or an empty batch would fail it), MASK outputs through Mask To Image's conversion into
Save Image, everything else into Preview Any. Outputs the tooltips call blocked must carry ComfyUI's
``ExecutionBlocker`` (their consumers then do not run). VACE Inputs' ``reference_image`` for a task
without a reference is decided by who is wired to it (the node reads the prompt, as ComfyUI hands it
the hidden ``PROMPT``/``UNIQUE_ID``): ``None`` for optional inputs only (WanVaceToVideo's "no
reference"), a blocker with a message naming the consumer when one needs an image. The same graphs
are queued in a real ComfyUI by ``tests/harness/live_comfyui.py`` (step 3, "VACE Inputs wired into
core nodes").
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch
from harness import core_nodes
from harness.fixtures import PROJECTOR_NAME, comfy, install_models, tiny_models  # noqa: F401
from test_nodes_generation import load_vace

import nodes
from nodes import comfy_bridge
from nodes.generation import UnisonProjector, UnisonVaceInputs, UnisonVaceSampler
from nodes.loaders import UnisonProjectorLoader
from nodes.planning import UnisonOutputSwitch, UnisonPlanner, UnisonTaskRouter

PACK = nodes.NODE_CLASS_MAPPINGS


def consume(type_: str, value: Any) -> str:
    """Feed ``value`` to the core node a user wires behind an output of ``type_``; what ran."""
    if comfy_bridge.is_blocked(value):
        return "blocked"
    if type_ == "IMAGE":
        core_nodes.SaveImage().save_images(value, "wiring/out")
        return "SaveImage"
    if type_ == "MASK":  # core MaskToImage: mask.reshape((-1, 1, H, W)).movedim(1, -1).expand(-1, -1, -1, 3)
        image = value.reshape((-1, 1, value.shape[-2], value.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3)
        core_nodes.SaveImage().save_images(image, "wiring/mask")
        return "SaveImage"
    core_nodes.PreviewAny().main(value)
    return "PreviewAny"


def wire_all(node: str, result: tuple[Any, ...]) -> dict[str, str]:
    cls = PACK[node]
    names = cls.RETURN_NAMES
    assert len(result) == len(cls.RETURN_TYPES)
    return {name: consume(type_, value) for name, type_, value in zip(names, cls.RETURN_TYPES, result, strict=True)}


def run_plan(instruction: str, **media: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    planned = UnisonPlanner().run(instruction, **media)["result"]
    routed = UnisonTaskRouter().route(planned[0], "auto", 32, 32, "5", "auto", 0)["result"]
    return planned, routed


def test_planner_and_router_outputs_for_each_output_kind(comfy) -> None:  # noqa: F811
    planned, routed = run_plan("What is the capital of France?")
    assert wire_all("UnisonPlanner", planned) == dict.fromkeys(("plan", "answer", "hidden"), "PreviewAny")
    wired = wire_all("UnisonTaskRouter", routed)
    assert wired.pop("image") == wired.pop("video") == "blocked" and set(wired.values()) == {"PreviewAny"}
    _, routed = run_plan("A watercolor painting of a harbor.")
    wired = wire_all("UnisonTaskRouter", routed)
    assert wired["text"] == wired["video"] == "blocked" and wired["image"] == "PreviewAny"
    _, routed = run_plan("A video of waves rolling onto a beach, 2 seconds.")
    wired = wire_all("UnisonTaskRouter", routed)
    assert wired["text"] == wired["image"] == "blocked" and wired["video"] == "PreviewAny"


def vace_inputs_graph(instruction: str, consumers: list[tuple[str, str]], **media: Any) -> dict[str, Any]:
    """An API prompt: Planner → Router → VACE Inputs (#5), each of ``consumers`` (class, input) on reference_image."""
    media_inputs = {name: ["1", 0] for name in media}
    prompt: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {}},  # stands for the graph's media; never run here
        "3": {"class_type": "UnisonPlanner", "inputs": {"instruction": instruction, **media_inputs}},
        "4": {"class_type": "UnisonTaskRouter", "inputs": {"plan": ["3", 0]}},
        "5": {"class_type": "UnisonVaceInputs", "inputs": {"plan": ["4", 0]}},
    }
    for i, (class_type, name) in enumerate(consumers):
        prompt[str(10 + i)] = {"class_type": class_type, "inputs": {name: ["5", 2]}}
    return prompt


def prepare_in(prompt: dict[str, Any], **media: Any) -> tuple[Any, ...]:
    """Run VACE Inputs #5 of ``prompt`` with the hidden inputs ComfyUI gives it."""
    _, routed = run_plan(prompt["3"]["inputs"]["instruction"], **media)
    return UnisonVaceInputs().prepare(routed[0], prompt=prompt, unique_id="5")["result"]


def test_vace_inputs_outputs_with_a_reference(comfy) -> None:  # noqa: F811
    image = {"image1": torch.rand(1, 24, 32, 3)}
    prompt = vace_inputs_graph("Generate a photo of the person in ###image1### as reference, in a cafe.",
                               [("SaveImage", "images"), ("WanVaceToVideo", "reference_image")], **image)
    result = prepare_in(prompt, **image)
    assert wire_all("UnisonVaceInputs", result) == {
        **dict.fromkeys(("control_video", "control_masks", "reference_image"), "SaveImage"),
        **dict.fromkeys(("width", "height", "length"), "PreviewAny"),  # the size used, for WanVaceToVideo
    }
    assert result[2].shape[0] == 1


SAVE, PREVIEW, NATIVE = ("SaveImage", "images"), ("PreviewImage", "images"), ("WanVaceToVideo", "reference_image")


@pytest.mark.parametrize("instruction", ["A watercolor painting of a harbor.",
                                         "Create a video of waves rolling onto a beach, 2 seconds."])
def test_vace_inputs_outputs_without_a_reference(comfy, instruction: str) -> None:  # noqa: F811
    result = prepare_in(vace_inputs_graph(instruction, [SAVE]))
    assert wire_all("UnisonVaceInputs", result) == {
        **dict.fromkeys(("control_video", "control_masks"), "SaveImage"),
        "reference_image": "blocked",  # not None, which core Save Image would crash on
        **dict.fromkeys(("width", "height", "length"), "PreviewAny"),
    }
    task = "text_to_image" if "painting" in instruction else "text_to_video"
    assert result[2].message.startswith(f"Unison VACE Inputs: the plan's task {task} has no reference image")
    assert "SaveImage #10.images needs an image" in result[2].message
    assert "WanVaceToVideo" in result[2].message

    # Only WanVaceToVideo behind it: None, its optional input's "no reference" (no reference frame, trim 0).
    reference = prepare_in(vace_inputs_graph(instruction, [NATIVE]))[2]
    assert reference is None
    native = core_nodes.WanVaceToVideo().execute(None, None, None, 32, 32, 5, 1, 1.0, reference_image=reference)
    assert native[3] == 0
    assert prepare_in(vace_inputs_graph(instruction, []))[2] is None  # nothing wired: nothing to block

    # Preview Image and WanVaceToVideo on the same output: one value reaches both, so both are blocked.
    both = prepare_in(vace_inputs_graph(instruction, [NATIVE, PREVIEW]))[2]
    assert comfy_bridge.is_blocked(both) and "PreviewImage #11.images" in both.message
    assert "WanVaceToVideo #10" not in both.message  # only the consumer that needs an image is named


def test_reference_tooltip_says_what_the_output_carries() -> None:
    tooltip = UnisonVaceInputs.OUTPUT_TOOLTIPS[UnisonVaceInputs.RETURN_NAMES.index("reference_image")]
    assert "Only reference tasks have one" in tooltip and "WanVaceToVideo" in tooltip and "blocked" in tooltip
    assert "hidden" in UnisonVaceInputs.INPUT_TYPES()  # it is handed the prompt to see its consumers


def test_optional_inputs_are_read_from_comfyuis_registry(monkeypatch) -> None:
    registry = types.ModuleType("nodes")
    registry.NODE_CLASS_MAPPINGS = dict(core_nodes.CORE_NODES)
    monkeypatch.setitem(sys.modules, "nodes", registry)
    assert comfy_bridge.input_is_optional("WanVaceToVideo", "reference_image")
    assert not comfy_bridge.input_is_optional("SaveImage", "images")
    assert not comfy_bridge.input_is_optional("NoSuchNode", "images")  # unknown: treated as needing a value
    prompt = {"7": {"class_type": "SaveImage", "inputs": {"images": ["5", 2], "filename_prefix": "x"}},
              "8": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
              "9": {"class_type": "PreviewAny", "inputs": {"source": ["50", 2]}}}
    assert comfy_bridge.linked_consumers(prompt, 5, 2) == [("7", "SaveImage", "images")]
    assert comfy_bridge.linked_consumers(None, "5", 2) == []


@pytest.mark.slow
def test_projector_sampler_and_switch_outputs(comfy, tiny_models) -> None:  # noqa: F811
    install_models(comfy, tiny_models)
    planned, routed = run_plan("A watercolor painting of a harbor.")
    projector = UnisonProjectorLoader().load(PROJECTOR_NAME, "auto")[0]
    projected = UnisonProjector().project(projector, planned[2], 0)["result"]
    assert wire_all("UnisonProjector", projected) == {"tokens": "PreviewAny", "positive": "blocked",
                                                       "negative": "blocked"}
    sampled = UnisonVaceSampler().sample(load_vace(), routed[8], 0, 1, 1.0, 5.0, "blurry")["result"]
    assert wire_all("UnisonVaceSampler", sampled) == {"frames": "SaveImage", "fps": "PreviewAny"}
    switched = UnisonOutputSwitch().switch(routed[0], sampled[0])
    assert wire_all("UnisonOutputSwitch", switched) == {"image": "SaveImage", "video": "blocked"}


def test_speed_settings_output(comfy) -> None:  # noqa: F811
    from nodes.speed import UnisonSpeed

    assert wire_all("UnisonSpeed", UnisonSpeed().settings("magcache")) == {"speed": "PreviewAny"}


def test_every_pack_node_with_outputs_is_covered() -> None:
    covered = {"UnisonPlanner", "UnisonTaskRouter", "UnisonVaceInputs", "UnisonProjector", "UnisonVaceSampler",
               "UnisonOutputSwitch", "UnisonSpeed"}
    loaders = {n for n in PACK if n.endswith(("Loader", "Loader)")) or "Loader" in n}
    outputless = {n for n, cls in PACK.items() if not cls.RETURN_TYPES}
    # loaders' outputs are models, consumed only by the pack's own nodes (tested with those nodes)
    assert set(PACK) == covered | loaders | outputless
