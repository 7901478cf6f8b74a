"""Every value ComfyUI's editor offers in a widget of this pack passes the node's submit-time checks.

The reachable values come from the frontend's own rounding rules (``harness.editor_rules``); the
checks are ComfyUI's (``execution.validate_inputs``: min/max and combo lists, unless the input is
named by ``VALIDATE_INPUTS``, which then decides). The Router's frames and the Sampler's numbers
are also run, not only validated.
"""

from __future__ import annotations

from typing import Any

import pytest
from harness.editor_rules import float_widget_value, int_widget_value, reachable_floats, reachable_ints
from harness.fixtures import comfy  # noqa: F401 - fixture
from harness.workflow import _validate_args, is_widget, ordered_inputs

import nodes
from nodes.planning import FRAME_CHOICES, UnisonTaskRouter
from unison_runtime.plan import MAX_FRAMES

PACK = nodes.NODE_CLASS_MAPPINGS


def _default(type_: Any, options: dict[str, Any]) -> Any:
    if "default" in options:
        return options["default"]
    return type_[0] if isinstance(type_, list) and type_ else None


def submit_check(cls: type, name: str, value: Any) -> str | None:
    """ComfyUI's check of one widget value (the others at their defaults); the error or ``None``."""
    spec = {n: (t, o) for n, t, o, _ in ordered_inputs(cls)}
    type_, options = spec[name]
    custom = _validate_args(cls) or []
    if name not in custom:
        if isinstance(type_, list):
            return None if value in type_ else f"{value!r} not in the list"
        if type_ in ("INT", "FLOAT"):
            if value < options.get("min", -float("inf")):
                return f"{value} smaller than min"
            if value > options.get("max", float("inf")):
                return f"{value} bigger than max"
        return None
    values = {n: (value if n == name else _default(*spec[n])) for n in custom if n in spec}
    result = cls.VALIDATE_INPUTS(**values)
    return None if result is True else str(result)


def widget_cases() -> list[tuple[str, str, str, Any]]:
    cases = []
    for node_name, cls in sorted(PACK.items()):
        for name, type_, options, _optional in ordered_inputs(cls):
            if is_widget(type_, options) and (isinstance(type_, list) or type_ in ("INT", "FLOAT")):
                cases.append((node_name, name, "COMBO" if isinstance(type_, list) else type_, options))
    return cases


CASES = widget_cases()


def test_the_audit_sees_every_numeric_widget() -> None:
    seen = {(node, name) for node, name, _, _ in CASES}
    assert {("UnisonTaskRouter", "width"), ("UnisonTaskRouter", "frames"), ("UnisonTaskRouter", "fps"),
            ("UnisonVaceSampler", "seed"), ("UnisonVaceSampler", "steps"), ("UnisonVaceSampler", "guidance"),
            ("UnisonVaceSampler", "shift"), ("UnisonProjector", "context_length")} <= seen


@pytest.mark.parametrize(("node", "name", "kind", "options"), CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES])
def test_every_value_the_editor_offers_passes_validation(comfy, node: str, name: str, kind: str,  # noqa: F811
                                                         options: dict[str, Any]) -> None:
    cls = PACK[node]
    if kind == "COMBO":
        values = {n: t for n, t, _, _ in ordered_inputs(cls)}[name]
    elif kind == "INT":
        values = reachable_ints(options)
    else:
        values = reachable_floats(options)
    assert values
    rejected = {v: err for v in values if (err := submit_check(cls, name, v)) is not None}
    assert not rejected, f"{node}.{name}: the editor offers values the node rejects: {dict(list(rejected.items())[:5])}"


def test_the_rules_reproduce_the_reported_frames_bug() -> None:
    """The old INT frames (min 0, step 4) could only hold multiples of 4: 5 typed became 4, never 4k+1."""
    old = {"min": 0, "max": MAX_FRAMES, "step": 4}
    assert int_widget_value(5, old) == 4 and int_widget_value(81, old) == 80
    assert all(v % 4 == 0 for v in reachable_ints(old))
    rejected = [v for v in reachable_ints(old) if v and UnisonTaskRouter.VALIDATE_INPUTS(frames=v) is not True]
    assert len(rejected) == len(reachable_ints(old)) - 1  # everything but 0
    # and the rules match the frontend's float rounding for the Sampler's guidance (step 0.1, round 0.01)
    assert float_widget_value(5.05, {"min": 0, "max": 30, "step": 0.1, "round": 0.01}) in (5.0, 5.1)
    assert float_widget_value(31, {"min": 0, "max": 30, "step": 0.1, "round": 0.01}) == 30


@pytest.fixture
def video_packet(comfy):  # noqa: F811
    from nodes.planning import UnisonPlanner

    return UnisonPlanner().run("A lion walking through tall grass at sunset, 2 seconds.")["result"][0]


def test_router_frames_offers_auto_and_every_wan_length(video_packet) -> None:
    assert FRAME_CHOICES[0] == "auto" and FRAME_CHOICES[1:4] == ("5", "9", "13") and "81" in FRAME_CHOICES
    assert FRAME_CHOICES[-1] == str(MAX_FRAMES)
    router = UnisonTaskRouter()
    for choice in FRAME_CHOICES:  # each one also runs
        length = router.route(video_packet, frames=choice)["result"][4]
        assert length == (video_packet.plan.num_frames if choice == "auto" else int(choice))


def test_sampler_numbers_the_editor_offers_make_valid_sampling_options() -> None:
    from unison_runtime.vace.sampler import SamplingOptions

    spec = {n: o for n, _, o, _ in ordered_inputs(PACK["UnisonVaceSampler"])}
    for steps in reachable_ints(spec["steps"])[::25]:
        SamplingOptions(steps=steps)
    for guidance in reachable_floats(spec["guidance"]):
        SamplingOptions(guidance=guidance)
    for shift in reachable_floats(spec["shift"]):
        SamplingOptions(shift=shift)
