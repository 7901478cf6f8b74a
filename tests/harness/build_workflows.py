"""Writes the shipped workflows (``workflows/*.json``) in the UI format ComfyUI's editor saves.

The graphs are described here in a few lines each; :class:`Graph` lays them out as the frontend
(1.27) serialises them: socket inputs in definition order (``shape: 7`` when optional), then
linked widget inputs with ``widget: {name}``; ``widgets_values`` positional in widget order,
with the control value after seed widgets and the upload button value after upload combos.
``tests/test_workflows.py`` checks the files match this script, so edit here and run
``python tests/harness/build_workflows.py``.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
WORKFLOWS = REPO / "workflows"
FRONTEND_VERSION = "1.27.10"

# Model file names the loaders choose (README "Where model files go").
QWEN = "Qwen2.5-VL-3B-Instruct"
LORA = "unison-lora"
PROJECTOR = "projector.pth"
TRANSFORMER = "wan2.1_vace_1.3B_fp16.safetensors"
VAE = "wan_2.1_vae.safetensors"
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
# Example media the family workflows load (users pick their own files).
EXAMPLE_IMAGE = "unison_example.png"
EXAMPLE_MASKED = "unison_example_masked.png"
EXAMPLE_VIDEO = "unison_pose.mp4"

CORE = {"cnr_id": "comfy-core", "ver": "0.3.64"}

# Where the default files are published (README "Where model files go"; unison_runtime/download.py).
# The frontend reads node.properties.models = [{name, url, directory}] and offers an entry when a
# widget of the node holds ``name`` and the file is missing from ``directory`` (1.27:
# getSelectedModelsMetadata + MissingModelsWarning; 1.58: missingModelScan). It only knows files:
# a folder (the Qwen base, the LoRA adapter) is never in a folder's file list, so an entry for it
# would be shown as missing even when installed; those two are named in the notes instead.
WAN_URL = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
UNISON_URL = "https://huggingface.co/ali-vilab/Unison"
MODEL_FILES = {
    TRANSFORMER: {"url": f"{WAN_URL}/diffusion_models/{TRANSFORMER}", "directory": "diffusion_models"},
    VAE: {"url": f"{WAN_URL}/vae/{VAE}", "directory": "vae"},
    TEXT_ENCODER: {"url": f"{WAN_URL}/text_encoders/{TEXT_ENCODER}", "directory": "text_encoders"},
    PROJECTOR: {"url": UNISON_URL, "directory": "unison"},
}
FOLDER_MODELS = {QWEN: "https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct", LORA: UNISON_URL}
# A folder can still be offered file by file in the workflow's top-level ``models`` list, which 1.27's
# missing-models dialog checks against the folder's recursive file list (``directory/name`` relative
# paths) without needing a widget to hold the name; it downloads only .safetensors/.sft from known hosts,
# so the Qwen base's weight shards are offered (its small json/txt files come with
# ``python -m unison_runtime download``, as the README and the notes say). 1.58's dialog only reports
# files a widget names, so there the folders stay in the note and the README. The LoRA folder's file
# names in the Unison release are not confirmed, so it is not listed.
QWEN_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
WORKFLOW_MODELS = [{"name": f"{QWEN}/{shard}", "url": f"{FOLDER_MODELS[QWEN]}/resolve/main/{shard}",
                    "directory": "unison"} for shard in QWEN_SHARDS]

# Layout (litegraph units): a node's title bar sits above its pos; a group's title band at its top.
NODE_TITLE_HEIGHT = 30
GROUP_TITLE_HEIGHT = 50  # font_size 24 plus the band's padding, with room for the node badges below it
GROUP_PADDING = 20
GAP = 80  # between stacked nodes
COLUMN = 60  # between columns
# 1.27.10's "Nodes 2.0" view draws a node up to 430 units wide whatever its saved width: every node is
# saved that wide, so both views agree.
NODE_WIDTH = 430
PITCH = NODE_WIDTH + COLUMN  # from one column to the next
# The note is a banner above the graph: in 1.27.10's Nodes 2.0 view a note is as wide as its text
# (about the window's width), so nothing may sit to its right.
NOTE_SIZE = (1500, 420)
TOP = NOTE_SIZE[1] + GAP + 50 + 30  # the first node's pos y: below the note, a group title and a node title
VIEW = {"scale": 0.6, "width": 1280, "height": 720}  # the saved view shows the note at this window size
# Screen pixels at the canvas's top-left that the frontend's own controls cover. 1.58.1 draws the canvas
# under its sidebar (56 px wide) and floats its "Graph" menu over the canvas down to y 82 (1.27.10's
# canvas starts beside and below them): the saved view keeps the graph's top-left corner clear of both.
CHROME = (72, 96)
# Nodes whose plan text the web extension shows in a box of this height (web/unison.js DISPLAY_HEIGHT).
DISPLAY_HEIGHT = 140
SHOWS_TEXT = {"UnisonPlanner", "UnisonTaskRouter", "UnisonProjector", "UnisonVaceInputs", "UnisonVaceSampler"}


def pack_version() -> dict[str, str]:
    """``cnr_id`` / ``ver`` for the pack's own nodes: the registry id and version from pyproject.toml."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {"cnr_id": project["name"], "ver": project["version"]}


def _classes() -> dict[str, type]:
    """The node classes, with the fake ComfyUI modules installed over an empty temp layout (script use)."""
    import tempfile

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE.parents[1]))
    import nodes
    from harness import comfy_env, core_nodes

    class _Patch:  # what comfy_env.install needs of pytest.MonkeyPatch, applied for good
        @staticmethod
        def setitem(mapping: dict[str, Any], key: str, value: Any) -> None:
            mapping[key] = value

        @staticmethod
        def setattr(target: Any, name: str, value: Any) -> None:
            setattr(target, name, value)

    comfy_env.install(_Patch(), Path(tempfile.mkdtemp(prefix="unison-workflows-")) / "ComfyUI")
    return {**core_nodes.CORE_NODES, **nodes.NODE_CLASS_MAPPINGS}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict[str, Any]
    title: str | None = None
    mode: int = 0
    size: tuple[int, int] | None = None
    inputs: dict[str, int] = field(default_factory=dict)  # input name -> link id
    outputs: dict[int, list[int]] = field(default_factory=dict)  # output slot -> link ids
    color: str | None = None


class Graph:
    def __init__(self, name: str, classes: dict[str, type]) -> None:
        self.name = name
        self.classes = classes
        self.nodes: list[Node] = []
        self.links: list[list[Any]] = []
        self.groups: list[tuple[str, list[Node], str]] = []

    # ------------------------------------------------------------------ building

    def add(self, type_: str, pos: tuple[int, int], title: str | None = None, mode: int = 0,
            size: tuple[int, int] | None = None, **widgets: Any) -> Node:
        node = Node(id=len(self.nodes) + 1, type=type_, pos=pos, widgets=widgets, title=title, mode=mode, size=size)
        self.nodes.append(node)
        return node

    def note(self, text: str, pos: tuple[int, int] = (0, 0), size: tuple[int, int] = NOTE_SIZE) -> Node:
        node = self.add("MarkdownNote", pos, size=size)
        node.widgets = {"text": text}
        node.color, node.title = "#432", None
        return node

    def connect(self, source: Node, output: str, target: Node, input_name: str) -> None:
        cls = self.classes[source.type]
        names = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
        slot = names.index(output)
        link_id = len(self.links) + 1
        # the target slot is the input's index in the saved inputs list, known once all links exist
        self.links.append([link_id, source.id, slot, target.id, input_name, str(cls.RETURN_TYPES[slot])])
        target.inputs[input_name] = link_id
        source.outputs.setdefault(slot, []).append(link_id)

    def group(self, title: str, members: list[Node], color: str = "#3f789e") -> None:
        """A group around ``members`` (bounds computed from their sizes and title bars when serialising)."""
        self.groups.append((title, members, color))

    def box(self, node: Node) -> tuple[int, int, int, int]:
        """The node's outline with its title bar: x, y, width, height."""
        width, height = self._size(node)
        return node.pos[0], node.pos[1] - NODE_TITLE_HEIGHT, width, height + NODE_TITLE_HEIGHT

    def _group_json(self, index: int, title: str, members: list[Node], color: str) -> dict[str, Any]:
        boxes = [self.box(n) for n in members]
        left = min(b[0] for b in boxes) - GROUP_PADDING
        top = min(b[1] for b in boxes) - GROUP_TITLE_HEIGHT
        right = max(b[0] + b[2] for b in boxes) + GROUP_PADDING
        bottom = max(b[1] + b[3] for b in boxes) + GROUP_PADDING
        return {"id": index, "title": title, "bounding": [left, top, right - left, bottom - top], "color": color,
                "font_size": 24, "flags": {}}

    def _view(self) -> dict[str, Any]:
        """The saved view: the graph's top-left corner (a group's edge, the note's title bar) at the window's
        top-left, just clear of the frontend's controls (``CHROME``)."""
        groups = [self._group_json(i, *group)["bounding"] for i, group in enumerate(self.groups)]
        left = min([b[0] for b in map(self.box, self.nodes)] + [b[0] for b in groups])
        top = min([b[1] for b in map(self.box, self.nodes)] + [b[1] for b in groups])
        scale = VIEW["scale"]
        return {"scale": scale, "offset": [round(CHROME[0] / scale - left), round(CHROME[1] / scale - top)]}

    # ------------------------------------------------------------------ serialising

    def _spec(self, node: Node) -> list[tuple[str, Any, dict[str, Any], bool]]:
        from harness.workflow import ordered_inputs

        return ordered_inputs(self.classes[node.type])

    def _input_entries(self, node: Node) -> list[dict[str, Any]]:
        from harness.workflow import is_widget

        if node.type == "MarkdownNote":
            return []
        sockets, widgets = [], []
        for name, type_, options, optional in self._spec(node):
            entry: dict[str, Any] = {"localized_name": name, "name": name}
            if is_widget(type_, options):
                if name not in node.inputs:
                    continue
                entry.update(type="COMBO" if isinstance(type_, list) else type_, widget={"name": name},
                             link=node.inputs[name])
                widgets.append(entry)
            else:
                if optional:
                    entry["shape"] = 7
                entry.update(type=str(type_), link=node.inputs.get(name))
                sockets.append(entry)
        return sockets + widgets

    def _widgets_values(self, node: Node) -> list[Any]:
        from harness.workflow import extra_widget_values, is_widget

        if node.type == "MarkdownNote":
            return [node.widgets["text"]]
        values = []
        unknown = set(node.widgets) - {name for name, *_ in self._spec(node)} - {"control_after_generate"}
        if unknown:
            raise ValueError(f"{self.name}: {node.type} has no widget(s) {sorted(unknown)}")
        for name, type_, options, _optional in self._spec(node):
            if not is_widget(type_, options):
                continue
            if name in node.widgets:
                value = node.widgets[name]
            elif "default" in options:
                value = options["default"]
            elif isinstance(type_, list):
                value = type_[0]
            else:
                raise ValueError(f"{self.name}: {node.type}.{name} needs a value")
            values.append(value)
            extra = extra_widget_values(name, type_, options)
            if extra and type_ == "INT":
                values.append(node.widgets.get("control_after_generate", "randomize"))
                extra -= 1
            values.extend(["image"] * extra)  # the upload button's value, as the frontend saves it
        return values

    def _outputs(self, node: Node) -> list[dict[str, Any]]:
        if node.type == "MarkdownNote":
            return []
        cls = self.classes[node.type]
        names = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
        return [{"localized_name": name, "name": name, "type": str(type_), "links": node.outputs.get(slot, [])}
                for slot, (name, type_) in enumerate(zip(names, cls.RETURN_TYPES, strict=True))]

    def _size(self, node: Node) -> list[int]:
        """The saved size: what the classic view needs, and at least what the "Nodes 2.0" view draws.

        1.27.10's Nodes 2.0 view sizes a node by its content (up to NODE_WIDTH wide, rows taller than
        the canvas's), whatever the saved size; 1.58's keeps the saved size. Reserving the larger of the
        two keeps the layout free of overlaps in every view (the live harness measures them).
        """
        if node.type == "MarkdownNote":
            return list(node.size or NOTE_SIZE)
        if node.size:
            return [max(node.size[0], NODE_WIDTH), max(node.size[1], self._nodes2_height(node))]
        rows = max(len(self._input_entries(node)), len(self._outputs(node)))
        height = 40 + 22 * rows
        for name, type_, options, _optional in self._spec(node):
            from harness.workflow import is_widget

            if is_widget(type_, options) and name not in node.inputs:
                height += 110 if options.get("multiline") else 26
                if options.get("image_upload") or options.get("video_upload"):
                    height += 260
        if node.type in SHOWS_TEXT:
            height += DISPLAY_HEIGHT + 10
        return [NODE_WIDTH, max(height, self._nodes2_height(node))]

    def _nodes2_height(self, node: Node) -> int:
        """The body height 1.27.10's Nodes 2.0 view gives ``node`` (fitted to its measured nodes, rounded up)."""
        from harness.workflow import extra_widget_values, is_widget

        sockets = [e for e in self._input_entries(node) if "widget" not in e]
        height = 80 + 24 * max(len(sockets), len(self._outputs(node)))
        for name, type_, options, _optional in self._spec(node):
            if is_widget(type_, options):  # a linked widget keeps its row there
                height += 110 if options.get("multiline") else 40 * (1 + extra_widget_values(name, type_, options))
                if options.get("image_upload") or options.get("video_upload"):
                    height += 470  # the upload button and the picture / video preview
        if node.type in SHOWS_TEXT:
            height += 40  # the plan box's row (that view of 1.27.10 does not draw the box itself)
        return height

    def _order(self) -> dict[int, int]:
        incoming: dict[int, set[int]] = {n.id: set() for n in self.nodes}
        for _id, source, _slot, target, _tslot, _type in self.links:
            incoming[target].add(source)
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = sorted(i for i, deps in incoming.items() if i not in done and deps <= done)
            for i in ready:
                order[i] = len(order)
                done.add(i)
        return order

    def to_json(self) -> dict[str, Any]:
        order = self._order()
        nodes = []
        for node in self.nodes:
            data: dict[str, Any] = {
                "id": node.id, "type": node.type, "pos": list(node.pos), "size": self._size(node), "flags": {},
                "order": order[node.id], "mode": node.mode, "inputs": self._input_entries(node),
                "outputs": self._outputs(node),
            }
            if node.title:
                data["title"] = node.title
            properties: dict[str, Any] = {} if node.type == "MarkdownNote" else {"Node name for S&R": node.type}
            if node.type in _core_types():
                properties.update(CORE)
            elif node.type != "MarkdownNote":
                properties.update(pack_version())
            models = [{"name": value, **MODEL_FILES[value]} for value in node.widgets.values()
                      if isinstance(value, str) and value in MODEL_FILES]
            if models:
                properties["models"] = models
            data["properties"] = properties
            data["widgets_values"] = self._widgets_values(node)
            if node.color:
                data["color"], data["bgcolor"] = node.color, "#653"
            nodes.append(data)
        by_id = {n.id: n for n in self.nodes}
        links = []
        for link_id, source, slot, target, input_name, type_ in self.links:
            names = [e["name"] for e in self._input_entries(by_id[target])]
            links.append([link_id, source, slot, target, names.index(input_name), type_])
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/comfyui-unison/ComfyUI-Unison/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": links,
            "groups": [self._group_json(i, *group) for i, group in enumerate(self.groups, start=1)],
            "config": {},
            **({"models": WORKFLOW_MODELS} if any(n.type == "UnisonPlannerLoader" for n in self.nodes) else {}),
            "extra": {"ds": self._view(), "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }


def _core_types() -> set[str]:
    from harness import core_nodes

    return set(core_nodes.CORE_NODES)


# --------------------------------------------------------------------------- the graphs


def stack(g: Graph, nodes: list[Node], x: int, y: int) -> int:
    """Place ``nodes`` one under the other from (x, y), title bars included; returns the next free y."""
    for node in nodes:
        node.pos = (x, y)
        y += g.box(node)[3] + GAP
    return y


@dataclass
class StageOne:
    planner: Node
    router: Node
    projector: Node
    right: int  # the x where the next group may start


def stage_one(g: Graph, instruction: str, *, x: int, y: int = TOP, projector_here: bool = True) -> StageOne:
    """Loaders + Planner + Router (+ Projector): the part every Unison workflow shares."""
    planner_loader = g.add("UnisonPlannerLoader", (0, 0), model=QWEN, lora=LORA)
    projector_loader = g.add("UnisonProjectorLoader", (0, 0), projector=PROJECTOR)
    planner = g.add("UnisonPlanner", (0, 0), size=(NODE_WIDTH, 740), instruction=instruction)
    router = g.add("UnisonTaskRouter", (0, 0), size=(NODE_WIDTH, 600))
    projector = g.add("UnisonProjector", (0, 0))
    stack(g, [planner_loader, projector_loader], x, y)
    stack(g, [planner], x + PITCH, y)
    stack(g, [router, projector] if projector_here else [router], x + 2 * PITCH, y)
    g.connect(planner_loader, "planner", planner, "planner")
    g.connect(planner, "plan", router, "plan")
    g.connect(projector_loader, "projector", projector, "projector")
    g.connect(planner, "hidden", projector, "hidden")
    members = [planner_loader, projector_loader, planner, router] + ([projector] if projector_here else [])
    g.group("Stage one: plan (Ctrl+B on the Planner Loader: rule planner)", members)
    return StageOne(planner, router, projector, right=x + 3 * PITCH - COLUMN + GROUP_PADDING * 2 + GAP)


def unison_outputs(g: Graph, one: StageOne, *, y: int = TOP) -> None:
    """Router branches → answer preview / image sampler + save / video sampler + save."""
    x = one.right + GROUP_PADDING
    vace = g.add("UnisonVaceLoader", (0, 0), transformer=TRANSFORMER, vae=VAE, text_encoder=TEXT_ENCODER)
    preview = g.add("PreviewAny", (0, 0), title="Answer (understanding tasks)", size=(NODE_WIDTH, 200))
    image_sampler = g.add("UnisonVaceSampler", (0, 0), title="Unison VACE Sampler (image)")
    save_image = g.add("SaveImage", (0, 0), size=(NODE_WIDTH, 420), filename_prefix="unison/image")
    video_sampler = g.add("UnisonVaceSampler", (0, 0), title="Unison VACE Sampler (video)")
    create_video = g.add("CreateVideo", (0, 0), fps=24.0)
    save_video = g.add("SaveVideo", (0, 0), size=(NODE_WIDTH, 420), filename_prefix="unison/video")
    stack(g, [preview, vace], x, y)
    stack(g, [image_sampler, video_sampler], x + PITCH, y)
    stack(g, [save_image, create_video, save_video], x + 2 * PITCH, y)
    g.connect(one.router, "text", preview, "source")
    g.connect(one.router, "image", image_sampler, "plan")
    g.connect(one.router, "video", video_sampler, "plan")
    for sampler in (image_sampler, video_sampler):
        g.connect(vace, "vace", sampler, "vace")
        g.connect(one.projector, "tokens", sampler, "tokens")
    g.connect(image_sampler, "frames", save_image, "images")
    g.connect(video_sampler, "frames", create_video, "images")
    g.connect(video_sampler, "fps", create_video, "fps")
    g.connect(create_video, "VIDEO", save_video, "video")
    g.group("Stage two: only the branch the plan picks runs",
            [vace, preview, image_sampler, save_image, video_sampler, create_video, save_video], color="#8A8")


MODELS_NOTE = f"""
* Models: `models/unison/` ([Qwen2.5-VL-3B-Instruct]({FOLDER_MODELS[QWEN]}) folder, the Unison LoRA
  folder and projector.pth from [the Unison release]({UNISON_URL})), and Comfy-Org's Wan 2.1 files in
  `models/diffusion_models/`, `models/vae/`, `models/text_encoders/` (the missing-models dialog offers
  those; `python -m unison_runtime download` fetches everything, see the README)."""


AUTO_NOTE = """## Unison: one instruction, the right output
Write what you want in the **Unison Planner**. Stage one decides the task (12 kinds: answer, image or
video generation, editing, reference, control, image-to-video) and its size and length; the **Task
Router** opens only the matching branch: the answer preview, the image sampler, or the video sampler.

* No Qwen? Select **Unison Planner Loader** and press Ctrl+B: the embedded rule planner decides
  (it cannot answer questions).
* Reference files from ComfyUI's `input/` folder as `###photo.png###`, or wire images into the
  Planner and write `###image1###`.
* Override any decision on the Router (0 / auto = keep).""" + MODELS_NOTE



def unison_auto(classes: dict[str, type]) -> Graph:
    g = Graph("unison_auto", classes)
    g.note(AUTO_NOTE)
    one = stage_one(g, "A red fox trotting through fresh snow at dawn, cinematic, 3 seconds.", x=0)
    unison_outputs(g, one)
    return g


def _family(name: str, note: str, instruction: str, classes: dict[str, type],
            media: list[tuple[str, dict[str, Any]]]) -> tuple[Graph, StageOne, list[Node]]:
    """Note, a group with the media loaders, then stage one and stage two."""
    g = Graph(name, classes)
    g.note(note + MODELS_NOTE)
    loaders = [g.add(type_, (0, 0), **widgets) for type_, widgets in media]
    stack(g, loaders, 0, TOP)
    g.group("Your media", loaders, color="#a1309b")
    one = stage_one(g, instruction, x=PITCH + GROUP_PADDING * 2 + GAP)
    unison_outputs(g, one)
    return g, one, loaders


def unison_edit(classes: dict[str, type]) -> Graph:
    g, one, (image,) = _family("unison_edit", """## Unison: edit an image with a mask
Load your photo and paint the area to change with ComfyUI's mask editor (right click the Load
Image node → Open in MaskEditor). Its IMAGE is `###image1###` and its MASK `###mask1###`: white
(painted) = regenerate, the rest is kept.

For a video edit, name files instead: `Replace the car in ###clip.mp4### with a bus, mask
###clip_mask.mp4###`.""", "Replace the masked area of ###image1### with a bouquet of sunflowers, using ###mask1### "
                               "as the mask.", classes, [("LoadImage", {"image": EXAMPLE_MASKED})])
    image.size = (NODE_WIDTH, 420)
    g.connect(image, "IMAGE", one.planner, "image1")
    g.connect(image, "MASK", one.planner, "mask1")
    return g


def unison_reference(classes: dict[str, type]) -> Graph:
    g, one, (image,) = _family("unison_reference", """## Unison: generate from a reference image
The person, character or product in `###image1###` is kept; the instruction says what to make of
it. Ask for a video ("a 3 second clip of ...") and the same graph makes a video.""",
                               "Generate a photo of the person in ###image1### as reference, reading a book in a sunny "
                               "cafe.", classes, [("LoadImage", {"image": EXAMPLE_IMAGE})])
    image.size = (NODE_WIDTH, 420)
    g.connect(image, "IMAGE", one.planner, "image1")
    return g


def unison_frame_to_video(classes: dict[str, type]) -> Graph:
    g, one, (image,) = _family("unison_frame_to_video", """## Unison: image to video, first or last frame
`###image1###` becomes the first frame ("starting from this frame") or the last ("ending on this
frame"); the Router's frame_index overrides it.""",
                               "Turn ###image1### into a 3 second video of the scene slowly coming to life, starting "
                               "from this frame.", classes, [("LoadImage", {"image": EXAMPLE_IMAGE})])
    image.size = (NODE_WIDTH, 420)
    g.connect(image, "IMAGE", one.planner, "image1")
    return g


def unison_control(classes: dict[str, type]) -> Graph:
    g, one, (video, components) = _family(
        "unison_control", """## Unison: follow a control video
A pose, depth or edge video (`###video1###`, from Load Video → Get Video Components) guides the
motion. For one image, wire a depth/edge/pose map into image1 and ask for an image.""",
        "Generate a video of a robot dancing, following the pose in ###video1###.", classes,
        [("LoadVideo", {"file": EXAMPLE_VIDEO}), ("GetVideoComponents", {})])
    g.connect(video, "VIDEO", components, "video")
    g.connect(components, "images", one.planner, "video1")
    return g


NATIVE_NOTE = """## Unison plan + ComfyUI's own Wan VACE nodes
The Planner decides the task; **Unison VACE Inputs** builds the task's control video, masks and
reference image and gives WanVaceToVideo the width, height and length actually used (a source
sets the aspect ratio and length, as in Unison); the
**Unison Projector** appends stage one's tokens to the umT5 conditioning. KSampler + VAE Decode
sample, and **Unison Output Switch** sends the frames to Save Image or to the video saver.
Generation tasks only (a question stops at VACE Inputs with a message)."""


def unison_native_wan(classes: dict[str, type]) -> Graph:
    g = Graph("unison_native_wan", classes)
    g.note(NATIVE_NOTE + MODELS_NOTE)
    one = stage_one(g, "A paper boat drifting down a rainy street, 480P, 2 seconds.", x=0, projector_here=False)
    x = one.right + GROUP_PADDING
    vace_inputs = g.add("UnisonVaceInputs", (0, 0))
    clip = g.add("CLIPLoader", (0, 0), clip_name=TEXT_ENCODER, type="wan")
    vae = g.add("VAELoader", (0, 0), vae_name=VAE)
    unet = g.add("UNETLoader", (0, 0), unet_name=TRANSFORMER)
    positive = g.add("CLIPTextEncode", (0, 0), title="umT5: the plan's prompt", size=(NODE_WIDTH, 160), text="")
    negative = g.add("CLIPTextEncode", (0, 0), title="umT5: negative prompt", size=(NODE_WIDTH, 200),
                     text=_wan_negative_prompt())
    projector = one.projector
    sampling = g.add("ModelSamplingSD3", (0, 0), shift=5.0)
    wan = g.add("WanVaceToVideo", (0, 0))
    ksampler = g.add("KSampler", (0, 0), steps=30, cfg=5.0, sampler_name="uni_pc", scheduler="simple")
    trim = g.add("TrimVideoLatent", (0, 0))
    decode = g.add("VAEDecode", (0, 0))
    switch = g.add("UnisonOutputSwitch", (0, 0))
    save_image = g.add("SaveImage", (0, 0), size=(NODE_WIDTH, 420), filename_prefix="unison/native_image")
    create_video = g.add("CreateVideo", (0, 0), fps=24.0)
    save_video = g.add("SaveVideo", (0, 0), size=(NODE_WIDTH, 420), filename_prefix="unison/native_video")
    stack(g, [vace_inputs, clip, vae, unet], x, TOP)
    stack(g, [positive, negative, sampling], x + PITCH, TOP)
    stack(g, [projector, wan], x + 2 * PITCH, TOP)
    stack(g, [ksampler, trim, decode, switch], x + 3 * PITCH, TOP)
    stack(g, [save_image, create_video, save_video], x + 4 * PITCH, TOP)

    g.connect(one.router, "plan", vace_inputs, "plan")
    g.connect(one.router, "prompt", positive, "text")
    g.connect(clip, "CLIP", positive, "clip")
    g.connect(clip, "CLIP", negative, "clip")
    g.connect(positive, "CONDITIONING", projector, "positive")
    g.connect(negative, "CONDITIONING", projector, "negative")
    g.connect(projector, "positive", wan, "positive")
    g.connect(projector, "negative", wan, "negative")
    g.connect(vae, "VAE", wan, "vae")
    g.connect(vace_inputs, "control_video", wan, "control_video")
    g.connect(vace_inputs, "control_masks", wan, "control_masks")
    g.connect(vace_inputs, "reference_image", wan, "reference_image")
    for name in ("width", "height", "length"):  # the size actually used (a source's aspect ratio and length)
        g.connect(vace_inputs, name, wan, name)
    g.connect(unet, "MODEL", sampling, "model")
    g.connect(sampling, "MODEL", ksampler, "model")
    g.connect(wan, "positive", ksampler, "positive")
    g.connect(wan, "negative", ksampler, "negative")
    g.connect(wan, "latent", ksampler, "latent_image")
    g.connect(ksampler, "LATENT", trim, "samples")
    g.connect(wan, "trim_latent", trim, "trim_amount")
    g.connect(trim, "LATENT", decode, "samples")
    g.connect(vae, "VAE", decode, "vae")
    g.connect(one.router, "plan", switch, "plan")
    g.connect(decode, "IMAGE", switch, "frames")
    g.connect(switch, "image", save_image, "images")
    g.connect(switch, "video", create_video, "images")
    g.connect(one.router, "fps", create_video, "fps")
    g.connect(create_video, "VIDEO", save_video, "video")
    g.group("ComfyUI's Wan VACE path, fed by the plan",
            [vace_inputs, clip, vae, unet, positive, negative, sampling, projector, wan, ksampler, trim, decode,
             switch, save_image, create_video, save_video], color="#8A8")
    return g


def _wan_negative_prompt() -> str:
    from unison_runtime.vace.text import WAN_NEGATIVE_PROMPT

    return WAN_NEGATIVE_PROMPT


BUILDERS = {
    "unison_auto": unison_auto,
    "unison_edit": unison_edit,
    "unison_reference": unison_reference,
    "unison_frame_to_video": unison_frame_to_video,
    "unison_control": unison_control,
    "unison_native_wan": unison_native_wan,
}


def build_all(classes: dict[str, type] | None = None) -> dict[str, dict[str, Any]]:
    classes = classes or _classes()
    return {name: build(classes).to_json() for name, build in BUILDERS.items()}


def dumps(workflow: dict[str, Any]) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


CAPTIONS = {
    "unison_auto": "Unison: one instruction -> answer, image or video",
    "unison_edit": "Unison: edit a masked image",
    "unison_reference": "Unison: generate from a reference image",
    "unison_frame_to_video": "Unison: image to video (first or last frame)",
    "unison_control": "Unison: follow a pose / depth / edge video",
    "unison_native_wan": "Unison plan + ComfyUI's own Wan VACE nodes",
}
THUMBNAIL_SIZE = (640, 360)


def thumbnail(name: str, workflow: dict[str, Any]) -> Any:
    """The template card picture: the graph itself, drawn (tests/harness/thumbnails.py)."""
    import nodes
    from harness import thumbnails

    names = {**nodes.NODE_DISPLAY_NAME_MAPPINGS}
    return thumbnails.render(workflow, names, CAPTIONS[name])


def main() -> None:
    WORKFLOWS.mkdir(exist_ok=True)
    for name, workflow in build_all().items():
        (WORKFLOWS / f"{name}.json").write_text(dumps(workflow), encoding="utf-8")
        thumbnail(name, workflow).save(WORKFLOWS / f"{name}.jpg", quality=90)
        print(f"wrote workflows/{name}.json ({len(workflow['nodes'])} nodes, {len(workflow['links'])} links) + .jpg")


if __name__ == "__main__":
    main()
