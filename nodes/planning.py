"""Stage one in the graph: the Planner node (instruction + media → plan) and the Task Router.

The Router is what lets one workflow serve all 12 tasks: it exposes the plan's numbers as plain
sockets for ComfyUI's own nodes and opens exactly one of its text / image / video branches;
the other two carry ComfyUI's ``ExecutionBlocker``, so their save/preview nodes never run.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from . import comfy_bridge as comfy
from ._runtime import errors, runtime_module
from ._runtime import instruction as instruction_mod
from ._runtime import plan as plan_mod
from .model_cache import signature
from .packets import HIDDEN, PLAN, PLANNER, PlanPacket, describe_plan, generation_packet

log = logging.getLogger("unison")

Task = plan_mod.Task

IMAGE_SLOTS = ("image1", "image2", "image3", "image4")
VIDEO_SLOTS = ("video1", "video2")
MASK_SLOTS = ("mask1", "mask2")
SLOT_PATTERN = re.compile(r"^(image|video|mask)\d+$")

FALLBACK_TO_RULES = "use the rule planner's plan"
FALLBACK_ERROR = "stop with an error"

NO_ANSWER = (
    "No answer: the embedded rule planner decides the task but cannot answer questions. "
    "Connect a Unison Planner Loader (Qwen2.5-VL) to the Planner's `planner` input."
)

EXAMPLE_INSTRUCTION = "A red fox trotting through fresh snow at dawn, cinematic, 3 seconds."


# --------------------------------------------------------------------------- media from the graph


INPUT_FOLDER_ROLE = "ComfyUI's input folder"


def _input_folder() -> Any:
    """ComfyUI's input folder (``None`` outside ComfyUI), named by its role in error messages.

    Messages reach a possibly remote user: "ComfyUI's input folder/cat.png", not the server's path.
    """
    folder = comfy.input_directory()
    if folder is not None:
        runtime_module("paths").name_folder(folder, INPUT_FOLDER_ROLE)
    return folder


def _graph_media(inputs: dict[str, Any]) -> dict[str, Any]:
    """Decode the connected image/video/mask inputs into runtime media, named after their slot."""
    sources = runtime_module("vace.sources")
    found = {}
    for slot in IMAGE_SLOTS:
        if inputs.get(slot) is not None:
            found[slot] = sources.medium_from_comfy_image(slot, "image", inputs[slot])
    for slot in VIDEO_SLOTS:
        if inputs.get(slot) is not None:
            found[slot] = sources.medium_from_comfy_image(slot, "video", inputs[slot])
    for slot in MASK_SLOTS:
        if inputs.get(slot) is not None:
            found[slot] = sources.medium_from_comfy_mask(slot, inputs[slot])
    return found


def _named_references(text: str) -> tuple[list[str], list[str]]:
    """The ``###names###`` an instruction uses, in order: graph slots (``image1``...) and file names."""
    names = [m.strip() for m in instruction_mod.REFERENCE_PATTERN.findall(text)]
    return [n for n in names if SLOT_PATTERN.match(n)], [n for n in names if not SLOT_PATTERN.match(n)]


def _check_graph_references(text: str, connected: set[str]) -> list[str]:
    """Notes about connected slots the instruction does not name.

    A name that looks like a slot (``image3``) but is not connected is an error: read as a file
    it would only produce a confusing "unsupported extension" message.
    """
    slots, files = _named_references(text)
    named = {*slots, *files}
    unconnected = sorted(n for n in set(slots) if n not in connected)
    if unconnected:
        raise errors.PathError(
            f"the instruction names {', '.join(f'###{n}###' for n in unconnected)} but no media is connected to "
            f"that input of the Unison Planner; connect it, or name a file from ComfyUI's input folder instead"
        )
    unused = sorted(connected - named)
    return [f"{slot} is connected but the instruction never names ###{slot}###; it was not used" for slot in unused]


def validate_instruction_text(text: Any) -> str | bool:
    """Submit-time check of the instruction widget (ComfyUI ``VALIDATE_INPUTS``): ``True`` or the reason."""
    if text is None:  # linked from another node: checked when it runs
        return True
    if not isinstance(text, str) or not text.strip():
        return "instruction is empty; write what you want (reference media as ###image1### or ###file.png###)"
    try:
        parsed = instruction_mod.parse_instruction(text, kinds=dict.fromkeys(_named_references(text)[0], "image"))
        input_dir = _input_folder()
        if input_dir is not None:
            for ref in parsed.media:
                if not SLOT_PATTERN.match(ref.path):
                    runtime_module("paths").resolve_reference(ref.path, [input_dir], must_exist=True)
    except errors.UnisonError as exc:
        return str(exc)
    return True


# --------------------------------------------------------------------------- the Planner node


class UnisonPlanner:
    """Instruction (+ media) → plan, answer, hidden states."""

    DESCRIPTION = (
        "Stage one: reads the instruction (and the media it names) and decides which of the 12 Unison tasks it "
        "is, with size, length, frame index and media roles. Without a planner connected, the embedded rule "
        "planner decides. Understanding tasks are answered here when a Qwen2.5-VL planner is connected."
    )
    CATEGORY = "Unison"
    FUNCTION = "run"
    RETURN_TYPES = (PLAN, "STRING", HIDDEN)
    RETURN_NAMES = ("plan", "answer", "hidden")
    OUTPUT_TOOLTIPS = (
        "The decided plan (task + parameters + the decoded media). Feed it to the Unison Task Router.",
        "Stage one's answer for understanding tasks (empty for generation tasks or with the rule planner).",
        "Stage one's last hidden states for the Unison Projector (empty with the rule planner).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        optional: dict[str, Any] = {
            "planner": (PLANNER, {"tooltip": "A Qwen2.5-VL planner from Unison Planner Loader. Not connected: "
                                  "the embedded rule planner decides (no answers, no hidden states)."}),
        }
        for slot in IMAGE_SLOTS:
            optional[slot] = ("IMAGE", {"tooltip": f"An image the instruction names as ###{slot}###."})
        for slot in VIDEO_SLOTS:
            optional[slot] = ("IMAGE", {"tooltip": f"A video (its frames as an IMAGE batch) the instruction names "
                                        f"as ###{slot}###."})
        for slot in MASK_SLOTS:
            optional[slot] = ("MASK", {"tooltip": f"A mask (1 = regenerate) the instruction names as ###{slot}###."})
        return {
            "required": {
                "instruction": ("STRING", {
                    "multiline": True,
                    "default": EXAMPLE_INSTRUCTION,
                    "tooltip": "What you want, in your own words. Name connected media as ###image1###, ###video1###, "
                               "###mask1###, or files in ComfyUI's input folder as ###photo.png###.",
                }),
                "on_unreadable_plan": ([FALLBACK_TO_RULES, FALLBACK_ERROR], {
                    "default": FALLBACK_TO_RULES,
                    "tooltip": "When the Qwen planner's output cannot be read as a plan: use the rule planner's plan "
                               "(shown as a note on the node), or stop with an error quoting the output.",
                }),
            },
            "optional": optional,
        }

    @classmethod
    def VALIDATE_INPUTS(cls, instruction: Any = None) -> str | bool:
        return validate_instruction_text(instruction)

    @classmethod
    def IS_CHANGED(cls, instruction: Any = None, **_: Any) -> str:
        """The named input files' sizes and times: a file replaced under the same name is read again.

        (ComfyUI caches a node by its inputs; without this a new ``cat.png`` would keep the old plan.)
        """
        input_dir = _input_folder()
        if not isinstance(instruction, str) or input_dir is None:
            return ""
        paths = []
        for name in _named_references(instruction)[1]:
            try:
                paths.append(runtime_module("paths").resolve_reference(name, [input_dir], must_exist=True))
            except errors.UnisonError:
                paths.append(None)  # reported by VALIDATE_INPUTS / the run itself
        return signature(paths)

    def run(self, instruction: str, on_unreadable_plan: str = FALLBACK_TO_RULES, planner: Any = None,
            **media_inputs: Any) -> dict[str, Any]:
        graph_media = _graph_media(media_inputs)
        notes = _check_graph_references(instruction, set(graph_media))
        input_dir = _input_folder()
        roots = [input_dir] if input_dir is not None else []  # outside ComfyUI no file may be named
        kinds = {name: medium.kind for name, medium in graph_media.items()}
        parsed = instruction_mod.parse_instruction(instruction, roots, must_exist=True, kinds=kinds)

        decoded = dict(graph_media)
        media_mod = runtime_module("media")
        file_refs = [ref for ref in parsed.media if ref.path not in kinds]
        for ref in file_refs:  # read through read_reference: no gap between the path check and the open
            if ref.path not in decoded:
                decoded[ref.path] = media_mod.read_reference(ref.path, roots)
        ordered = [decoded[ref.path] for ref in parsed.media]
        parsed = runtime_module("media_probe").with_media_info(parsed, ordered)  # wired media inform the plan too

        model = planner.ready() if planner is not None else runtime_module("planner.rules").RulePlanner()
        if planner is not None:
            comfy.load_for_use([planner.patcher])
        plan = self._plan(model, parsed, on_unreadable_plan, notes)

        answer = ""
        hidden = None
        if plan.output == "text":
            answer = model.answer(parsed, ordered) or ""
            if answer:
                plan = plan.with_changes(answer=answer)
        else:
            hidden = model.hidden_states(parsed)
        if planner is not None and planner.on_cpu:
            _give_back_planner(planner)
        if notes:
            plan = plan.with_changes(notes=(*plan.notes, *notes))
        packet = PlanPacket(plan=plan, media=tuple(decoded[name] for name in dict.fromkeys(r.path for r in plan.media)))
        return {"ui": {"text": [describe_plan(plan)]}, "result": (packet, answer, hidden)}

    @staticmethod
    def _plan(model: Any, parsed: Any, on_unreadable_plan: str, notes: list[str]) -> plan_mod.Plan:
        try:
            return model.plan(parsed)
        except errors.PlannerOutputError as exc:
            if on_unreadable_plan == FALLBACK_ERROR:
                raise
            fallback = exc.fallback or runtime_module("planner.rules").RulePlanner().plan(parsed)
            notes.append(f"the planner's output {exc.text!r} could not be read ({exc.reason}); "
                         "the rule planner's plan is used")
            log.warning("Unison Planner: %s; using the rule planner's plan", exc)
            return fallback


def _give_back_planner(planner: Any) -> None:
    """On the CPU the planner's RAM goes back once its plan, answer and hidden states are out.

    ComfyUI's offload device is the CPU, so its model management never frees RAM a model holds there:
    the planner (7.6 GiB at 3B with Unison's LoRA merged) would stay beside umT5 and the transformer for
    the whole run, as the CLI's staging avoids. It is loaded again (:meth:`LoadedPlanner.ready`) only
    when this node plans again: ComfyUI re-runs it for a changed instruction, not for a new seed.
    """
    planner.release()
    log.info("Unison Planner: the planner's memory was given back after planning on the CPU (it loads again "
             "when the instruction changes)")


# --------------------------------------------------------------------------- overrides


AUTO = "auto"


def _edit_indices(task: Task, plan: plan_mod.Plan) -> tuple[int | None, int | None]:
    """Mask and source for an editing task chosen by override: keep the plan's, else pick by kind and name."""
    if plan.task in plan_mod.EDITING_TASKS and plan.task.output == task.output:
        return plan.mask_index, plan.source_index
    kind = "image" if task is Task.IMAGE_EDITING else "video"
    source = next((i for i, m in enumerate(plan.media) if m.kind == kind and "mask" not in m.path.lower()), None)
    if source is None:
        raise errors.PlanError("task", f"{task.value} needs a {kind} to edit, and the instruction names none")
    mask = next((i for i, m in enumerate(plan.media) if i != source and "mask" in m.path.lower()), None)
    return mask, source


def override_plan(
    plan: plan_mod.Plan,
    *,
    task: str | None = None,
    width: int | None = None,
    height: int | None = None,
    num_frames: int | None = None,
    frame_index: str | None = None,
    fps: int | None = None,
) -> tuple[plan_mod.Plan, list[str]]:
    """Apply the Router's overrides (``None`` = keep); returns the new plan and notes on ignored values.

    Values that do not apply to the resulting task (frames on an image, a frame index on anything
    but image_to_video) are ignored with a note rather than failing, so one Router setting can stay
    in place while the plan's task varies. Values that apply are validated by the plan itself.
    """
    notes: list[str] = []
    changes: dict[str, Any] = {}
    new_task = Task.parse(task) if task is not None else plan.task
    if new_task is not plan.task:
        mask_index = source_index = None
        if new_task in plan_mod.EDITING_TASKS:
            mask_index, source_index = _edit_indices(new_task, plan)
        same_kind = new_task.output == plan.output
        changes.update(
            task=new_task,
            media=plan_mod.assign_roles(new_task, plan.media, mask_index=mask_index, source_index=source_index),
            mask_index=mask_index,
            source_index=source_index,
            frame_index=(plan.frame_index or "first") if new_task is Task.IMAGE_TO_VIDEO else None,
            num_frames=plan.num_frames if same_kind else
            (plan_mod.DEFAULT_VIDEO_FRAMES if new_task.output == "video" else 1),
            answer=plan.answer if new_task.output == "text" else None,
        )
    output = new_task.output

    def apply(name: str, value: Any, applies: bool, why: str) -> None:
        if value is None:
            return
        if not applies:
            notes.append(f"override {name}={value} ignored: {why}")
        elif value != getattr(plan, name):
            changes[name] = value

    generated = output != "text"
    apply("width", width, generated, f"{new_task.value} generates no image")
    apply("height", height, generated, f"{new_task.value} generates no image")
    apply("num_frames", num_frames, output == "video", f"{new_task.value} is not a video task")
    apply("fps", fps, output == "video", f"{new_task.value} is not a video task")
    apply("frame_index", frame_index, new_task is Task.IMAGE_TO_VIDEO, "only image_to_video has a frame index")
    if not changes:
        return plan, notes
    if "width" in changes or "height" in changes:
        changes["fixed_size"] = True  # a size the user set wins over a source's aspect ratio
    new = plan.with_changes(**changes, source="override")
    return new.with_changes(planner_text=plan_mod.format_planner_text(new)), notes


MIN_VIDEO_FRAMES = 5  # the plan's shortest video (4k+1, k >= 1)
FRAME_CHOICES = (AUTO, *(str(n) for n in range(MIN_VIDEO_FRAMES, plan_mod.MAX_FRAMES + 1, 4)))


def parse_frames(value: Any) -> int | None:
    """The Router's ``frames`` choice as a length (``None`` = auto).

    The widget is a list of the valid lengths (``"auto"``, ``"5"``, ``"9"``, ... ``"1025"``): an
    INT widget with ``step 4`` would offer multiples of 4 from its minimum (the editor rounds typed
    values to ``min + k*step``), none of which Wan accepts. Integers are read too (older saved
    workflows and API prompts wrote ``0`` for auto or the length itself).
    """
    if value is None or value == AUTO or value == 0:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise errors.PlanError("frames", f"{value!r} is not 'auto' or a number of frames")


def validate_overrides(width: Any = None, height: Any = None, frames: Any = None, fps: Any = None) -> str | bool:
    """Submit-time checks of the Router's number widgets (0 / auto = keep); ``None`` means linked, checked at run."""
    problems = []
    for name, value in (("width", width), ("height", height)):
        if value is None or value == 0:
            continue
        if not isinstance(value, int) or not plan_mod.MIN_SIDE <= value <= plan_mod.MAX_SIDE \
                or value % plan_mod.SIZE_STEP:
            problems.append(f"{name} {value!r} must be 0 (auto) or a multiple of {plan_mod.SIZE_STEP} "
                            f"within [{plan_mod.MIN_SIDE}, {plan_mod.MAX_SIDE}]")
    try:
        length = parse_frames(frames)
    except errors.PlanError:
        length = -1
    if length is not None and (not MIN_VIDEO_FRAMES <= length <= plan_mod.MAX_FRAMES or (length - 1) % 4):
        problems.append(f"frames {frames!r} must be auto or of the form 4k+1 (5, 9, ..., 81, ..., "
                        f"{plan_mod.MAX_FRAMES})")
    if fps is not None and fps != 0 and (not isinstance(fps, int) or not 1 <= fps <= plan_mod.MAX_FPS):
        problems.append(f"fps {fps!r} must be 0 (auto) or within [1, {plan_mod.MAX_FPS}]")
    return "; ".join(problems) if problems else True


# --------------------------------------------------------------------------- the Task Router node


class UnisonTaskRouter:
    """Plan → overridden plan, its numbers, and one open branch per output kind."""

    DESCRIPTION = (
        "Shows and optionally overrides the plan ('auto' / 0 keeps the planner's value), exposes its size and "
        "length for ComfyUI's Wan nodes, and opens exactly one of the text / image / video branches: nodes "
        "on the other two do not run."
    )
    CATEGORY = "Unison"
    FUNCTION = "route"
    RETURN_TYPES = (PLAN, "STRING", "INT", "INT", "INT", "FLOAT", "STRING", "STRING", PLAN, PLAN)
    RETURN_NAMES = ("plan", "task", "width", "height", "length", "fps", "prompt", "text", "image", "video")
    OUTPUT_TOOLTIPS = (
        "The plan after overrides (marked source='override' when any value changed).",
        "The task id, e.g. text_to_video.",
        "Width in pixels (multiple of 16); wire into WanVaceToVideo.",
        "Height in pixels (multiple of 16); wire into WanVaceToVideo.",
        "Number of frames (1 for images, 4k+1 for videos); wire into WanVaceToVideo's length.",
        "Frames per second for saving the video (e.g. Create Video).",
        "The text stage two's umT5 encodes, as Unison does: the instruction with each media reference replaced "
        "by <IMGPAD> / <VIDPAD> (e.g. for CLIP Text Encode with umT5 on the native Wan path).",
        "Text branch: the answer of an understanding task. Blocked for image and video tasks.",
        "Image branch: the plan, only for image tasks (feed a Unison VACE Sampler → Save Image).",
        "Video branch: the plan, only for video tasks (feed a Unison VACE Sampler → Create Video → Save Video).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "plan": (PLAN, {"tooltip": "The plan from the Unison Planner."}),
                "task": ([AUTO, *(t.value for t in Task)], {
                    "default": AUTO, "tooltip": "Force a task; 'auto' keeps the planner's choice."}),
                "width": ("INT", {"default": 0, "min": 0, "max": plan_mod.MAX_SIDE, "step": plan_mod.SIZE_STEP,
                                  "tooltip": "Override the width (multiple of 16); 0 = auto."}),
                "height": ("INT", {"default": 0, "min": 0, "max": plan_mod.MAX_SIDE, "step": plan_mod.SIZE_STEP,
                                   "tooltip": "Override the height (multiple of 16); 0 = auto."}),
                "frames": (list(FRAME_CHOICES), {
                    "default": AUTO,
                    "tooltip": "Override the video length in frames (Wan takes 4k+1: 5, 9, ..., 81); 'auto' keeps "
                               "the planner's length. Ignored for image tasks."}),
                "frame_index": ([AUTO, *plan_mod.FRAME_INDICES], {
                    "default": AUTO,
                    "tooltip": "image_to_video: use the image as the first or the last frame; 'auto' keeps the "
                               "planner's choice. Ignored for other tasks."}),
                "fps": ("INT", {"default": 0, "min": 0, "max": plan_mod.MAX_FPS,
                                "tooltip": "Override frames per second; 0 = auto (24). Ignored for image tasks."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width: Any = None, height: Any = None, frames: Any = None, fps: Any = None) -> str | bool:
        return validate_overrides(width, height, frames, fps)

    def route(self, plan: PlanPacket, task: str = AUTO, width: int = 0, height: int = 0, frames: str | int = AUTO,
              frame_index: str = AUTO, fps: int = 0) -> dict[str, Any]:
        new_plan, notes = override_plan(
            plan.plan,
            task=None if task == AUTO else task,
            width=width or None,
            height=height or None,
            num_frames=parse_frames(frames),
            frame_index=None if frame_index == AUTO else frame_index,
            fps=fps or None,
        )
        if notes:
            new_plan = new_plan.with_changes(notes=(*new_plan.notes, *notes))
        packet = plan.with_plan(new_plan)
        kind = new_plan.output
        blocked = comfy.execution_blocker(None)
        text = (new_plan.answer or NO_ANSWER) if kind == "text" else blocked
        result = (
            packet,
            new_plan.task.value,
            new_plan.width,
            new_plan.height,
            new_plan.num_frames,
            float(new_plan.fps),
            new_plan.prompt,
            text,
            packet if kind == "image" else blocked,
            packet if kind == "video" else blocked,
        )
        return {"ui": {"text": [describe_plan(new_plan)]}, "result": result}


# --------------------------------------------------------------------------- output switch


class UnisonOutputSwitch:
    """Frames → the image or the video output, by the plan's output kind (the other is blocked)."""

    DESCRIPTION = ("Sends frames decoded by any sampler (e.g. ComfyUI's KSampler + VAEDecode) to the image or the "
                   "video output, whichever the plan asks for; nodes on the other output do not run.")
    CATEGORY = "Unison"
    FUNCTION = "switch"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("image", "video")
    OUTPUT_TOOLTIPS = (
        "The frames when the plan is an image task (Save Image); blocked otherwise.",
        "The frames when the plan is a video task (Create Video → Save Video); blocked otherwise.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "plan": (PLAN, {"tooltip": "The plan that decided what these frames are (Task Router's plan)."}),
            "frames": ("IMAGE", {"tooltip": "Decoded frames [T, H, W, 3]."}),
        }}

    def switch(self, plan: PlanPacket, frames: Any) -> tuple[Any, Any]:
        kind = generation_packet(plan, "Unison Output Switch",
                                 on_text="there are no frames to route (use the Task Router's text output)").plan.output
        if kind == "image" and frames.shape[0] != 1:
            log.info("Unison Output Switch: image plan with %d frames; the first is the image", frames.shape[0])
            frames = frames[:1]
        blocked = comfy.execution_blocker(None)
        return (frames, blocked) if kind == "image" else (blocked, frames)
