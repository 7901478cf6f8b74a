"""Every output of every Unison node, wired into what a user would put behind it in ComfyUI.

IMAGE outputs go into core Save Image (the test double reads ``images[0]`` first, as ComfyUI's does,
so ``None`` or an empty batch would fail it), MASK outputs through Mask To Image's conversion into
Save Image, everything else into Preview Any. Outputs the tooltips call blocked must carry ComfyUI's
``ExecutionBlocker`` (their consumers then do not run). The one exception is VACE Inputs'
``reference_image`` for a task without a reference: it is ``None``, what WanVaceToVideo's optional
input reads as "no reference" (a blocker would stop WanVaceToVideo itself; core Save Image rejects
both ``None`` and an empty batch), and its tooltip says to wire it to WanVaceToVideo only.
"""

from __future__ import annotations

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


def test_vace_inputs_outputs(comfy) -> None:  # noqa: F811
    _, routed = run_plan("Generate a photo of the person in ###image1### as reference, in a cafe.",
                         image1=torch.rand(1, 24, 32, 3))
    result = UnisonVaceInputs().prepare(routed[0])["result"]
    assert wire_all("UnisonVaceInputs", result) == {
        **dict.fromkeys(("control_video", "control_masks", "reference_image"), "SaveImage"),
        **dict.fromkeys(("width", "height", "length"), "PreviewAny"),  # the size used, for WanVaceToVideo
    }
    _, routed = run_plan("A watercolor painting of a harbor.")
    control_video, control_masks, reference, *_size = UnisonVaceInputs().prepare(routed[0])["result"]
    assert consume("IMAGE", control_video) == consume("MASK", control_masks) == "SaveImage"
    assert reference is None  # WanVaceToVideo's "no reference"; see the module docstring
    assert "None" in UnisonVaceInputs.OUTPUT_TOOLTIPS[2] and "WanVaceToVideo" in UnisonVaceInputs.OUTPUT_TOOLTIPS[2]
    with pytest.raises(TypeError):  # why it is not wired into Save Image
        consume("IMAGE", reference)
    with pytest.raises(IndexError):  # nor could an empty batch be
        consume("IMAGE", torch.zeros(0, 32, 32, 3))


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
