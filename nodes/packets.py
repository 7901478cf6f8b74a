"""The values Unison's custom socket types carry between nodes, and how a plan reads on a node.

Socket types (ComfyUI passes the Python object as is; nothing is serialised):

- ``UNISON_PLAN``: a :class:`PlanPacket`, the validated plan plus the decoded media it refers to,
  so nodes downstream (router, VACE inputs, sampler) need no second wiring of the same images.
- ``UNISON_HIDDEN``: stage one's last hidden states (``torch.Tensor [1, L, hidden]``), or ``None``
  when the rule planner decided (it has no hidden states).
- ``UNISON_TOKENS``: the projector's extra text tokens (``torch.Tensor [1, 4, D]``), or ``None``.
- ``UNISON_PLANNER``, ``UNISON_PROJECTOR``, ``UNISON_VACE``: loaded models (see ``loaders``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import comfy_bridge as comfy
from ._runtime import errors
from ._runtime import media as media_mod
from ._runtime import plan as plan_mod

PLAN = "UNISON_PLAN"
HIDDEN = "UNISON_HIDDEN"
TOKENS = "UNISON_TOKENS"
PLANNER = "UNISON_PLANNER"
PROJECTOR = "UNISON_PROJECTOR"
VACE = "UNISON_VACE"


@dataclass(frozen=True, repr=False)
class PlanPacket:
    """A plan and its media, decoded once by the Planner node.

    ``media`` holds one :class:`~unison_runtime.media.Medium` per distinct reference name in
    ``plan.media`` (graph inputs such as ``image1`` and files such as ``cat.png`` alike).
    """

    plan: plan_mod.Plan
    media: tuple[media_mod.Medium, ...] = ()

    def with_plan(self, plan: plan_mod.Plan) -> PlanPacket:
        return PlanPacket(plan=plan, media=self.media)

    def ordered_media(self) -> list[media_mod.Medium]:
        """The decoded media in the plan's reference order (what the engine indexes into)."""
        by_name = {m.name: m for m in self.media}
        missing = [ref.path for ref in self.plan.media if ref.path not in by_name]
        if missing:
            raise errors.PlanError("media", f"no decoded medium for reference(s) {missing}; re-run the Planner")
        return [by_name[ref.path] for ref in self.plan.media]

    def __repr__(self) -> str:
        return f"PlanPacket({self.plan.task.value}, {len(self.media)} media)"

    def __str__(self) -> str:
        # Core "Preview Any" falls back to str() for objects: show the plan's JSON there.
        return self.plan.to_json(indent=2)


def generation_packet(value: Any, node: str, *, on_text: str) -> PlanPacket:
    """``value`` as the plan of an image or video task, for a node that works on frames.

    Anything else is refused naming ``node``; a text (understanding) plan with ``on_text``,
    which says what to wire instead.
    """
    if comfy.is_blocked(value) or not isinstance(value, PlanPacket):
        raise errors.UnisonError(f"{node}: expected a Unison plan (from the Planner or the Router), got "
                                 f"{type(value).__name__}")
    if value.plan.output == "text":
        raise errors.PlanError("task", f"{node}: {value.plan.task.value} is answered by stage one; {on_text}")
    return value


def describe_plan(plan: plan_mod.Plan, extra: Iterable[str] = ()) -> str:
    """A few lines for the node face: the decided task and its parameters."""
    lines = [f"task: {plan.task.value} → {plan.output}"]
    if plan.output != "text":
        size = f"size: {plan.width}x{plan.height}"
        if plan.output == "video":
            seconds = plan.num_frames / plan.fps
            size += f", {plan.num_frames} frames @ {plan.fps} fps ({seconds:.1f} s)"
        lines.append(size)
    if plan.frame_index in ("first_last", "last_first"):
        order = "first, then last" if plan.frame_index == "first_last" else "last, then first"
        lines.append(f"images as the first and last frames ({order} in media order)")
    elif plan.frame_index:
        lines.append(f"image as the {plan.frame_index} frame")
    if plan.source_index is not None:
        mask = "none (whole frame editable)" if plan.mask_index is None else f"#{plan.mask_index}"
        lines.append(f"edit: source #{plan.source_index}, mask {mask}")
    for i, ref in enumerate(plan.media):
        lines.append(f"media #{i}: {ref.path} ({ref.kind}, {ref.role})")
    if plan.planner_text:
        lines.append(f"planner: {plan.planner_text}")
    lines.append(f"decided by: {plan.source}")
    if plan.answer:
        lines.append(f"answer: {plan.answer}")
    lines.extend(f"note: {n}" for n in (*plan.notes, *extra))
    return "\n".join(lines)
