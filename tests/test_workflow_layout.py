"""The shipped workflows as a user sees them: layout, the saved view, model links, registry ids, thumbnails.

Bounding boxes are litegraph's: a node's title bar (30 units) sits above ``pos``; a group's title
band (``font_size`` 24 → about 34 units, node badges need the room below it) is at its top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tomllib
from harness import build_workflows
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
TITLE = 30
GROUP_BAND = 40  # the group title (24 px font) plus a margin the node badges stay below
WINDOW = (1280, 720)
LOADERS = {"UnisonVaceLoader", "UnisonProjectorLoader", "UNETLoader", "VAELoader", "CLIPLoader"}
MODEL_FOLDERS = {"diffusion_models", "vae", "text_encoders", "unison"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def box(node: dict[str, Any]) -> tuple[float, float, float, float]:
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE, x + w, y + h


def overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(inner: tuple[float, ...], outer: tuple[float, ...]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


@pytest.fixture(params=WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def workflow(request) -> dict[str, Any]:
    return {**load(request.param), "_name": request.param.stem}


def test_every_node_and_its_title_bar_sits_in_one_group_below_the_group_title(workflow) -> None:
    groups = []
    for g in workflow["groups"]:
        x, y, w, h = g["bounding"]
        groups.append((g["title"], (x, y + GROUP_BAND, x + w, y + h)))
    for node in workflow["nodes"]:
        if node["type"] == "MarkdownNote":
            continue
        homes = [title for title, body in groups if inside(box(node), body)]
        assert len(homes) == 1, f"{node['type']} #{node['id']} is inside {homes or 'no group'}"


def test_no_nodes_or_groups_overlap(workflow) -> None:
    nodes = workflow["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            assert not overlaps(box(a), box(b)), f"{a['type']} #{a['id']} overlaps {b['type']} #{b['id']}"
    bounds = [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in workflow["groups"])]
    for i, a in enumerate(bounds):
        for b in bounds[i + 1:]:
            assert not overlaps(a, b)
    (note,) = [n for n in nodes if n["type"] == "MarkdownNote"]
    assert not any(overlaps(box(note), g) for g in bounds)


def test_the_note_is_a_banner_with_nothing_beside_it(workflow) -> None:
    """1.27.10's "Nodes 2.0" view draws a note as wide as its text (about the window): nothing may sit to
    its right, so every other node and group starts below it."""
    (note,) = [n for n in workflow["nodes"] if n["type"] == "MarkdownNote"]
    bottom = box(note)[3]
    assert all(box(n)[1] > bottom for n in workflow["nodes"] if n is not note)
    assert all(g["bounding"][1] > bottom for g in workflow["groups"])


def test_nodes_are_saved_as_large_as_the_nodes_2_view_draws_them(workflow) -> None:
    """Saved sizes reserve what both views draw (the live harness measures the real boxes in both)."""
    graph = build_workflows.BUILDERS[workflow["_name"]](build_workflows._classes())
    for saved, built in zip(workflow["nodes"], graph.nodes, strict=True):
        if saved["type"] == "MarkdownNote":
            continue
        width, height = saved["size"]
        assert width == build_workflows.NODE_WIDTH, saved["type"]
        assert height >= graph._nodes2_height(built), saved["type"]


def test_the_note_is_fully_visible_at_the_saved_view(workflow) -> None:
    ds = workflow["extra"]["ds"]
    (note,) = [n for n in workflow["nodes"] if n["type"] == "MarkdownNote"]
    x0, y0, x1, y1 = box(note)
    scale, (ox, oy) = ds["scale"], ds["offset"]
    screen = ((x0 + ox) * scale, (y0 + oy) * scale, (x1 + ox) * scale, (y1 + oy) * scale)
    assert screen[2] <= WINDOW[0] and screen[3] <= WINDOW[1], screen
    # clear of the sidebar and the "Graph" menu that 1.58.1 floats over the canvas's top-left
    assert screen[0] >= build_workflows.CHROME[0] and screen[1] >= build_workflows.CHROME[1], screen
    # and so is every group (its title band) at its left
    for group in workflow["groups"]:
        assert (group["bounding"][0] + ox) * scale >= build_workflows.CHROME[0] - 0.5, group["title"]


def test_loaders_carry_the_official_download_locations(workflow) -> None:
    loaders = [n for n in workflow["nodes"] if n["type"] in LOADERS]
    assert loaders
    for node in loaders:
        files = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith((".safetensors", ".pth"))]
        models = node["properties"].get("models", [])
        assert sorted(m["name"] for m in models) == sorted(files), node["type"]
        for model in models:
            assert set(model) == {"name", "url", "directory"} and model["directory"] in MODEL_FOLDERS
            if model["name"].endswith(".safetensors"):  # what the frontend downloads itself
                assert model["url"] == (f"https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/"
                                        f"split_files/{model['directory']}/{model['name']}")
            else:
                assert model["url"] == "https://huggingface.co/ali-vilab/Unison"
    # the folders (Qwen base, LoRA) are not files a widget names: the note says where they are
    (note,) = [n for n in workflow["nodes"] if n["type"] == "MarkdownNote"]
    assert "https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct" in note["widgets_values"][0]


def test_the_qwen_folder_is_offered_file_by_file_in_the_workflow_models(workflow) -> None:
    """1.27's missing-models dialog checks the workflow's top-level ``models`` against ``models/<directory>``'s
    recursive file list and downloads .safetensors from huggingface.co: the Qwen base's weight shards,
    under the folder the Planner Loader chooses."""
    (loader,) = [n for n in workflow["nodes"] if n["type"] == "UnisonPlannerLoader"]
    folder = loader["widgets_values"][0]
    assert folder == "Qwen2.5-VL-3B-Instruct"
    assert workflow["models"] == [
        {"name": f"{folder}/model-0000{i}-of-00002.safetensors", "directory": "unison",
         "url": f"https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/resolve/main/model-0000{i}-of-00002.safetensors"}
        for i in (1, 2)]
    urls = [m["url"] for n in workflow["nodes"] for m in n["properties"].get("models", [])] + \
        [m["url"] for m in workflow["models"]]
    assert all(url.startswith("https://huggingface.co/") for url in urls)


def test_nodes_carry_their_registry_ids(workflow) -> None:
    pack = {"cnr_id": PROJECT["project"]["name"], "ver": PROJECT["project"]["version"]}
    for node in workflow["nodes"]:
        if node["type"] == "MarkdownNote":
            continue
        expected = pack if node["type"].startswith("Unison") else build_workflows.CORE
        assert {k: node["properties"].get(k) for k in ("cnr_id", "ver")} == expected, node["type"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_template_has_its_thumbnail(path: Path) -> None:
    """The template browser requests ``/api/workflow_templates/<pack>/<name>.jpg`` next to the JSON."""
    assert build_workflows.CAPTIONS[path.stem]
    path = path.with_suffix(".jpg")
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == build_workflows.THUMBNAIL_SIZE
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # a drawing, not a blank card


def test_the_icon_named_in_pyproject_exists() -> None:
    icon = PROJECT["tool"]["comfy"]["Icon"]
    assert icon.endswith("/main/web/icon.png")
    with Image.open(ROOT / "web" / "icon.png") as image:
        assert image.format == "PNG" and image.size[0] == image.size[1] >= 128
