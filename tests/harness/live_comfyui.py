"""Check the pack inside a real ComfyUI (run by hand; not part of the pytest suite).

    python tests/harness/live_comfyui.py --comfyui /path/to/ComfyUI --python /path/to/venv/bin/python

What it does, in an isolated base folder (``--base-directory``; nothing is written into ComfyUI's own
models/input/output): builds the tiny models under the names the shipped workflows use, links
this pack into ``custom_nodes/``, starts ComfyUI on loopback (``--cpu``), then

1. reads the start-up log for ``IMPORT FAILED`` / ``Cannot import`` lines naming the pack;
2. checks every ``NODE_CLASS_MAPPINGS`` entry is in ``/object_info`` with the declared inputs, and
   that the core-node test doubles declare the same widget order as the real nodes;
3. converts ``workflows/unison_auto.json`` to the API format from ``/object_info`` (the same
   converter as the tests), and queues it through ``POST /prompt`` for a question, an image and a
   video (rule planner: Planner Loader bypassed), and once with the (scripted tiny) Qwen planner;
   polls ``/history`` and checks what each output node produced and which did not run;
4. stops the server it started (its own pid only).

It prints what it saw and exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parents[1]))

from harness import build_workflows  # noqa: E402
from harness.comfy_server import ServerError, serving  # noqa: E402
from harness.workflow import BYPASSED, ordered_inputs, ui_to_api  # noqa: E402


class Check(AssertionError):
    pass


def say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- HTTP


def request(url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def queue(server: str, prompt: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    prompt_id = str(uuid.uuid4())
    status, answer = request(f"{server}/prompt", {"prompt": prompt, "prompt_id": prompt_id, "client_id": "unison"})
    if status != 200 or answer.get("node_errors"):
        raise Check(f"POST /prompt refused ({status}): {json.dumps(answer)[:2000]}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, history = request(f"{server}/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.5)
    raise Check(f"prompt {prompt_id} did not finish in {timeout} s")


# --------------------------------------------------------------------------- layout


def build_layout(base: Path) -> None:
    from harness.example_media import write_example_media
    from unison_runtime.testing.tiny_projector import build_tiny_projector
    from unison_runtime.testing.tiny_qwen import build_tiny_merged_planner, build_tiny_qwen, build_tiny_unison_lora
    from unison_runtime.testing.tiny_wan_files import build_tiny_comfy_models_dir

    models = base / "models"
    build_tiny_comfy_models_dir(models)  # diffusion_models/, vae/, text_encoders/ under the workflow names
    unison = models / "unison"
    scratch = base / "scratch"
    qwen = build_tiny_qwen(unison / build_workflows.QWEN)
    lora = build_tiny_unison_lora(qwen, unison / build_workflows.LORA)
    build_tiny_merged_planner(qwen, lora, scratch / "merged", fix_tie=True)
    build_tiny_projector(unison / build_workflows.PROJECTOR, input_dim=64, t5_dim=32)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    os.symlink(REPO, base / "custom_nodes" / "ComfyUI-Unison")
    for sub in ("input", "output", "user", "temp"):
        (base / sub).mkdir(exist_ok=True)
    write_example_media(base / "input")


def use_scripted_planner(base: Path, script: str) -> None:
    """Replace the Qwen folder by a merged tiny planner whose greedy output is ``script``."""
    import shutil

    from unison_runtime.testing.tiny_qwen import script_tiny_planner

    target = base / "models" / "unison" / build_workflows.QWEN
    shutil.rmtree(target)
    script_tiny_planner(base / "scratch" / "merged", script, target)


# --------------------------------------------------------------------------- object_info as node classes


def classes_from_object_info(info: dict[str, Any]) -> dict[str, type]:
    """Stand-ins with INPUT_TYPES/RETURN_TYPES from /object_info, for the converter."""
    classes = {}
    for name, node in info.items():
        spec: dict[str, dict[str, Any]] = {"required": {}, "optional": {}}
        for section in ("required", "optional"):
            for key in node["input_order"].get(section, []):
                value = node["input"][section][key]
                spec[section][key] = tuple(value) if isinstance(value, list) else (value,)
        classes[name] = type(name, (), {
            "INPUT_TYPES": classmethod(lambda cls, spec=spec: spec),
            "RETURN_TYPES": tuple(node["output"]),
            "RETURN_NAMES": tuple(node["output_name"]),
            "OUTPUT_NODE": node["output_node"],
        })
        # V3 combos arrive as ["COMBO", {"options": [...]}]; the converter needs the list form.
        for section in spec.values():
            for key, value in section.items():
                if value[0] == "COMBO":
                    section[key] = (list(value[1].get("options", [])), value[1])
    return classes


def check_object_info(info: dict[str, Any]) -> None:
    build_workflows._classes()  # the pack and the doubles over fake ComfyUI modules (doubles list input files)
    import nodes
    from harness import core_nodes

    missing = sorted(set(nodes.NODE_CLASS_MAPPINGS) - set(info))
    if missing:
        raise Check(f"not in /object_info: {missing}")
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        served = info[name]
        declared = [n for n, *_ in ordered_inputs(cls)]
        listed = served["input_order"].get("required", []) + served["input_order"].get("optional", [])
        if declared != listed:
            raise Check(f"{name}: /object_info lists inputs {listed}, the class declares {declared}")
        if served["category"] != cls.CATEGORY or served["display_name"] != nodes.NODE_DISPLAY_NAME_MAPPINGS[name]:
            raise Check(f"{name}: category/display name differ in /object_info")
    say(f"  all {len(nodes.NODE_CLASS_MAPPINGS)} Unison nodes listed, inputs in declared order")
    for name, cls in core_nodes.CORE_NODES.items():
        served = info[name]["input_order"]
        listed = served.get("required", []) + served.get("optional", [])
        declared = [n for n, *_ in ordered_inputs(cls)]
        if listed != declared:
            raise Check(f"core double {name}: declares {declared}, ComfyUI has {listed}")
    say(f"  the {len(core_nodes.CORE_NODES)} core-node test doubles declare ComfyUI's input order")


# --------------------------------------------------------------------------- the runs


def prompt_for(workflow: dict[str, Any], classes: dict[str, type], *, rule_planner: bool,
               instruction: str | None = None, router: dict[str, Any] | None = None,
               loader: dict[str, Any] | None = None) -> dict[str, Any]:
    workflow = json.loads(json.dumps(workflow))
    if rule_planner:
        for node in workflow["nodes"]:
            if node["type"] == "UnisonPlannerLoader":
                node["mode"] = BYPASSED
    prompt = ui_to_api(workflow, classes)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "UnisonVaceSampler":
            inputs.update(steps=2, guidance=1.0)
        elif node["class_type"] == "UnisonPlanner" and instruction is not None:
            inputs["instruction"] = instruction
        elif node["class_type"] == "UnisonTaskRouter" and router:
            inputs.update(router)
        elif node["class_type"] == "UnisonPlannerLoader" and loader:
            inputs.update(loader)
    return prompt


def outputs_by_type(prompt: dict[str, Any], history: dict[str, Any]) -> dict[str, Any]:
    return {prompt[i]["class_type"] + ("" if prompt[i]["_meta"]["title"] == prompt[i]["class_type"]
                                       else f" ({prompt[i]['_meta']['title']})"): out
            for i, out in history["outputs"].items()}


def expect(history: dict[str, Any], prompt: dict[str, Any], label: str, *, produced: set[str],
           absent: set[str]) -> dict[str, Any]:
    status = history["status"]
    if status.get("status_str") != "success":
        errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
        raise Check(f"{label}: status {status.get('status_str')}: {json.dumps(errors)[:3000]}")
    outputs = history["outputs"]
    kinds = {prompt[i]["class_type"] for i in outputs}
    if not produced <= kinds or kinds & absent:
        raise Check(f"{label}: outputs from {sorted(kinds)}; expected {sorted(produced)}, none of {sorted(absent)}")
    say(f"  {label}: success; outputs from {sorted(kinds)}")
    for node_id, out in outputs.items():
        say(f"    {prompt[node_id]['class_type']} #{node_id}: {json.dumps(out, ensure_ascii=False)[:300]}")
    return outputs


def check_start_log(log: Path) -> str:
    """The server's start-up log, after checking it has no import failure naming the pack."""
    text = log.read_text(errors="replace")
    failed = [line for line in text.splitlines()
              if ("IMPORT FAILED" in line or "Cannot import" in line) and "Unison" in line]
    if failed:
        raise Check("import failures:\n" + "\n".join(failed))
    return text


def run_checks(server: str, base: Path, log: Path) -> None:
    text = check_start_log(log)
    loaded = [line.strip() for line in text.splitlines() if "ComfyUI-Unison" in line]
    say("1. start-up log: no IMPORT FAILED for the pack; " + (loaded[0] if loaded else "(no import-time line)"))

    _, info = request(f"{server}/object_info", timeout=60)
    say(f"2. /object_info: {len(info)} nodes")
    check_object_info(info)
    _, extensions = request(f"{server}/extensions")
    js = [e for e in extensions if "ComfyUI-Unison" in e]
    if js != ["/extensions/ComfyUI-Unison/unison.js"]:
        raise Check(f"web extension listed as {js}")
    say(f"  /extensions lists {js} once")
    _, templates = request(f"{server}/api/workflow_templates")
    say(f"  /api/workflow_templates: {templates.get('ComfyUI-Unison')}")

    classes = classes_from_object_info(info)
    workflow = json.loads((REPO / "workflows" / "unison_auto.json").read_text(encoding="utf-8"))
    say("3. unison_auto.json converted from /object_info and queued:")
    small = {"width": 32, "height": 32, "frames": "5"}
    branch = {"SaveImage", "SaveVideo", "PreviewAny"}

    prompt = prompt_for(workflow, classes, rule_planner=True, instruction="What is the capital of France?")
    outputs = expect(queue(server, prompt), prompt, "question (rule planner)", produced={"PreviewAny"},
                     absent=branch - {"PreviewAny"} | {"UnisonVaceSampler"})
    preview = next(out for i, out in outputs.items() if prompt[i]["class_type"] == "PreviewAny")
    if "rule planner" not in preview["text"][0]:
        raise Check(f"answer preview shows {preview}")

    prompt = prompt_for(workflow, classes, rule_planner=True, instruction="A watercolor painting of a harbor.",
                        router=small)
    outputs = expect(queue(server, prompt), prompt, "image (rule planner)", produced={"SaveImage"},
                     absent=branch - {"SaveImage"})
    image = next(out for i, out in outputs.items() if prompt[i]["class_type"] == "SaveImage")["images"][0]
    path = base / "output" / image["subfolder"] / image["filename"]
    from PIL import Image

    with Image.open(path) as im:
        say(f"    wrote {path.relative_to(base)} {im.size}")
        if im.size != (32, 32):
            raise Check(f"image is {im.size}")

    prompt = prompt_for(workflow, classes, rule_planner=True,
                        instruction="Create a video of waves rolling onto a beach, 2 seconds.", router=small)
    outputs = expect(queue(server, prompt), prompt, "video (rule planner)", produced={"SaveVideo"},
                     absent=branch - {"SaveVideo"})
    video = next(out for i, out in outputs.items() if prompt[i]["class_type"] == "SaveVideo")["images"][0]
    from unison_runtime.media import read_video

    medium = read_video(base / "output" / video["subfolder"] / video["filename"])
    say(f"    wrote {video['subfolder']}/{video['filename']}: {medium.frames.shape} @ {medium.fps} fps")
    if medium.frames.shape[:3] != (5, 32, 32):
        raise Check(f"video frames {medium.frames.shape}")

    use_scripted_planner(base, "<BORES>32,16<EORES><BONF>4<EONF><CFV>")
    request(f"{server}/free", {"unload_models": True, "free_memory": True})
    prompt = prompt_for(workflow, classes, rule_planner=False, instruction="A kite over the sea.",
                        loader={"lora": "none"})
    outputs = expect(queue(server, prompt), prompt, "video (tiny scripted Qwen planner + projector tokens)",
                     produced={"SaveVideo"}, absent=branch - {"SaveVideo"})
    planner_text = next(out for i, out in outputs.items() if prompt[i]["class_type"] == "UnisonPlanner")["text"][0]
    if "decided by: lora" not in planner_text or "32x16, 5 frames" not in planner_text:
        raise Check(f"planner shows {planner_text!r}")
    say("    Planner node text: " + planner_text.replace("\n", " | "))
    check_vace_inputs_wiring(server, classes)


def queue_watching(server: str, prompt: dict[str, Any], timeout: float = 600) -> tuple[dict[str, Any], list[Any]]:
    """Queue ``prompt`` with a websocket open; its history entry and the messages the run sent."""
    import asyncio

    import aiohttp

    client = f"unison-{uuid.uuid4()}"

    async def run() -> list[Any]:
        messages: list[Any] = []
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{server.replace('http', 'ws', 1)}/ws?clientId={client}") as ws:
            prompt_id = str(uuid.uuid4())
            async with session.post(f"{server}/prompt", json={"prompt": prompt, "prompt_id": prompt_id,
                                                                "client_id": client}) as response:
                answer = await response.json()
                if response.status != 200 or answer.get("node_errors"):
                    raise Check(f"POST /prompt refused ({response.status}): {json.dumps(answer)[:2000]}")
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(message.data)
                    messages.append(data)
                    if data["type"] == "executing" and data["data"].get("node") is None \
                            and data["data"].get("prompt_id") == prompt_id:
                        return [prompt_id, messages]
        return [prompt_id, messages]

    prompt_id, messages = asyncio.run(asyncio.wait_for(run(), timeout=timeout))
    return request(f"{server}/history/{prompt_id}")[1][prompt_id], messages


def check_vace_inputs_wiring(server: str, classes: dict[str, type]) -> None:
    """VACE Inputs' outputs into core nodes for a task without a reference (reference_image used to be None).

    Every output goes into a core Preview Image (a MASK through Mask To Image), Save Image or Preview Any.
    (WanVaceToVideo's side, None as "no reference", is in tests/test_output_wiring.py: ComfyUI's own VAE
    loader cannot load the tiny test VAE, so the native workflow does not run here.)
    """
    workflow = json.loads((REPO / "workflows" / "unison_auto.json").read_text(encoding="utf-8"))
    prompt = prompt_for(workflow, classes, rule_planner=True, instruction="A watercolor painting of a harbor.",
                        router={"width": 32, "height": 32})
    router = next(i for i, n in prompt.items() if n["class_type"] == "UnisonTaskRouter")
    prompt = {i: n for i, n in prompt.items() if n["class_type"] in ("UnisonPlanner", "UnisonTaskRouter")}
    prompt["100"] = {"class_type": "UnisonVaceInputs", "inputs": {"plan": [router, 0]}, "_meta": {"title": "in"}}
    prompt["101"] = {"class_type": "PreviewImage", "inputs": {"images": ["100", 0]}, "_meta": {"title": "video"}}
    prompt["102"] = {"class_type": "MaskToImage", "inputs": {"mask": ["100", 1]}, "_meta": {"title": "mask"}}
    prompt["103"] = {"class_type": "PreviewImage", "inputs": {"images": ["102", 0]}, "_meta": {"title": "masks"}}
    prompt["104"] = {"class_type": "SaveImage", "inputs": {"images": ["100", 2], "filename_prefix": "ref"},
                     "_meta": {"title": "reference"}}
    for slot, name in ((3, "width"), (4, "height"), (5, "length")):
        prompt[str(105 + slot)] = {"class_type": "PreviewAny", "inputs": {"source": ["100", slot]},
                                   "_meta": {"title": name}}
    history, messages = queue_watching(server, prompt)
    outputs = history["outputs"]
    errors = [m["data"] for m in messages if m["type"] == "execution_error"]
    blocked = [e for e in errors if e["node_id"] == "104" and e["exception_type"] == "ExecutionBlocked"]
    if history["status"].get("status_str") != "success" or "104" in outputs or not len(blocked) == len(errors) == 1 \
            or not all(outputs.get(i) for i in ("101", "103", "108", "109", "110")):
        raise Check(f"VACE Inputs wired into core nodes: status {history['status'].get('status_str')}, outputs "
                    f"{sorted(outputs)}, errors {json.dumps(errors)[:1500]}")
    say("  VACE Inputs (text_to_image) wired into core nodes: control_video/control_masks previewed, "
        f"width/height/length {[outputs[i]['text'][0] for i in ('108', '109', '110')]}; Save Image on "
        f"reference_image blocked: {blocked[0]['exception_message'][:200]!r}")


# The pack's script or extension by name or URL, or the internal APIs the old unison.js used.
PACK_WARNINGS = ("unison.js", "unison.planDisplay", "extensions/ComfyUI-Unison", "scripts/widgets.js", "inputEl")


def from_the_pack(line: str) -> bool:
    """A console line the pack's web extension caused (its script named, or an API it used to misuse).

    Lines the frontend itself logs about a graph that merely contains Unison nodes (e.g. 1.58's
    "[ExecutableNodeDTO.resolveOutput] No input types match type [UNISON_PLANNER]" when the Planner
    Loader is bypassed) are not the extension's; the harness prints them.
    """
    return any(marker.lower() in line.lower() for marker in PACK_WARNINGS)


def check_frontend(server: str, info: dict[str, Any], playwright_dir: Path) -> None:
    """Convert every shipped workflow with the real frontend and compare with our converter."""
    files = sorted((REPO / "workflows").glob("*.json"))
    env = {**os.environ, "NODE_PATH": str(playwright_dir / "node_modules")}
    done = subprocess.run(["node", str(HERE.parent / "frontend_convert.mjs"), server, *map(str, files)],
                          capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise Check(f"frontend conversion failed: {done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if "unison.planDisplay" not in report["extensions"]:
        raise Check(f"the pack's JS extension is not registered: {report['extensions']}")
    ours = [e for e in report["consoleErrors"] + report["consoleWarnings"] if from_the_pack(e)]
    if ours:
        raise Check(f"browser console errors/warnings from the pack: {ours}")
    for line in report["consoleWarnings"][:10]:
        say(f"    console warning (not the pack's): {line[:200]}")
    say(f"4. real frontend (headless Chromium): extension 'unison.planDisplay' registered; "
        f"{len(report['consoleErrors'])} console errors, none from the pack")
    for line in report["consoleErrors"][:20]:
        say(f"    console: {line[:200]}")
    display = report["display"]
    shipped_planner = next(n for n in json.loads(files[0].read_text(encoding="utf-8"))["nodes"]
                           if n["type"] == "UnisonPlanner")
    if display["value"] != "task: text_to_video → video\ndecided by: rules" or display["inPrompt"] \
            or display["saved"] != shipped_planner["widgets_values"] or display["after"] != display["before"] \
            or not display["readOnly"] or display["label"] != "Unison decided":
        raise Check(f"plan display on the Planner node misbehaves: {display}")
    say("  Planner node shows the executed plan text in a read-only box that is neither saved nor queued")
    classes = classes_from_object_info(info)
    for file in files:
        result = report["results"][str(file)]
        expected = ui_to_api(json.loads(file.read_text(encoding="utf-8")), classes)
        frontend = result["output"]
        if set(frontend) != set(expected):
            raise Check(f"{file.name}: frontend prompt has nodes {sorted(frontend)}, ours {sorted(expected)}")
        for node_id, node in expected.items():
            theirs = frontend[node_id]
            declared = {k: v for k, v in theirs["inputs"].items() if k in node["inputs"] or k in
                        info[node["class_type"]]["input"].get("required", {}) or k in
                        info[node["class_type"]]["input"].get("optional", {})}
            if theirs["class_type"] != node["class_type"] or declared != node["inputs"]:
                raise Check(f"{file.name} node {node_id} ({node['class_type']}): frontend {theirs['inputs']} "
                            f"vs ours {node['inputs']}")
        saved = {n["id"]: n for n in result["workflow"]["nodes"]}
        shipped = json.loads(file.read_text(encoding="utf-8"))
        for node in shipped["nodes"]:
            if (saved[node["id"]].get("widgets_values") or []) != node["widgets_values"]:  # 1.58 drops an empty list
                raise Check(f"{file.name} node {node['id']} ({node['type']}): re-saved widgets_values "
                            f"{saved[node['id']].get('widgets_values')} vs shipped {node['widgets_values']}")
        if sorted(map(tuple, result["workflow"]["links"])) != sorted(map(tuple, shipped["links"])):
            raise Check(f"{file.name}: links change when the frontend re-saves the workflow")
        say(f"  {file.name}: frontend prompt == our conversion ({len(expected)} nodes); re-saved widgets and "
            "links unchanged")


# --------------------------------------------------------------------------- previews and the editor


def check_previews(server: str, workflow: dict[str, Any], classes: dict[str, type], steps: int = 3) -> None:
    """Queue an image run and count the sampler's preview frames on the websocket (one per step).

    ComfyUI sends previews as binary frames: a 4-byte event type (1 = PREVIEW_IMAGE, 4 = with
    metadata), then the image (JPEG for Latent2RGB). Needs ``--preview-method latent2rgb``.
    """
    import asyncio

    import aiohttp

    prompt = prompt_for(workflow, classes, rule_planner=True, instruction="A watercolor painting of a harbor.",
                        router={"width": 32, "height": 32})
    for node in prompt.values():
        if node["class_type"] == "UnisonVaceSampler":
            node["inputs"]["steps"] = steps
    client = f"unison-previews-{uuid.uuid4()}"

    async def run() -> list[bytes]:
        frames: list[bytes] = []
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{server.replace('http', 'ws', 1)}/ws?clientId={client}") as ws:
            prompt_id = str(uuid.uuid4())
            async with session.post(f"{server}/prompt", json={"prompt": prompt, "prompt_id": prompt_id,
                                                                "client_id": client}) as response:
                if response.status != 200:
                    raise Check(f"POST /prompt refused: {await response.text()}")
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    kind = int.from_bytes(message.data[:4], "big")
                    if kind in (1, 4):
                        frames.append(message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(message.data)
                    if data["type"] == "executing" and data["data"].get("node") is None \
                            and data["data"].get("prompt_id") == prompt_id:
                        return frames
                    if data["type"] == "execution_error":
                        raise Check(f"preview run failed: {json.dumps(data)[:2000]}")
        return frames

    frames = asyncio.run(asyncio.wait_for(run(), timeout=600))
    jpegs = [f for f in frames if b"\xff\xd8\xff" in f[:64]]
    if len(jpegs) < steps:
        raise Check(f"expected a JPEG preview per step ({steps}), got {len(jpegs)} of {len(frames)} preview frames")
    say(f"5. live previews (--preview-method latent2rgb): {len(jpegs)} JPEG previews for {steps} sampler steps")


def boxes_overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] - 1 and b[0] < a[2] - 1 and a[1] < b[3] - 1 and b[1] < a[3] - 1


def check_editor(server: str, base: Path, playwright_dir: Path, shots: Path) -> None:
    """Drive the editor (frontend_drive.mjs): type widget values, queue, look at the display boxes."""
    shots.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NODE_PATH": str(playwright_dir / "node_modules")}
    files = [REPO / "workflows" / "unison_auto.json",
             *sorted(f for f in (REPO / "workflows").glob("*.json") if f.name != "unison_auto.json")]
    done = subprocess.run(["node", str(HERE.parent / "frontend_drive.mjs"), server, str(shots), *map(str, files)],
                          capture_output=True, text=True, env=env, timeout=1200)
    if done.returncode != 0:
        raise Check(f"driving the editor failed: {done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    version = report.get("frontendVersion")
    say(f"6. the editor (frontend {version}) driven as a user:")
    for step in report["steps"]:
        say(f"    {step}")
    if report.get("error"):
        raise Check(f"editor: {report['error']}")
    check_template_cards(report.get("templates") or {})
    values = report["values"]
    router, sampler = values["Unison Task Router"], values["Unison VACE Sampler (video)"]
    wanted = {"width": 32, "height": 32, "frames": "9"}
    if {k: router[k] for k in wanted} != wanted or (sampler["steps"], sampler["guidance"]) != (2, 1) \
            or values["Unison Planner Loader"]["mode"] != BYPASSED:
        raise Check(f"widgets after typing: router {router}, sampler steps/guidance "
                    f"{sampler['steps']}/{sampler['guidance']}, loader mode {values['Unison Planner Loader']['mode']}")
    history = report["history"]
    if not history or history["status"].get("status_str") != "success":
        raise Check(f"the queued run: {json.dumps(history)[:2000]}")
    videos = [o["images"][0] for o in history["outputs"].values() if o.get("animated")]
    from unison_runtime.media import read_video

    medium = read_video(base / "output" / videos[0]["subfolder"] / videos[0]["filename"])
    if medium.frames.shape[:3] != (9, 32, 32):
        raise Check(f"the editor's run wrote {medium.frames.shape}, expected 9 frames of 32x32")
    say(f"    the run: success; {videos[0]['filename']} has {medium.frames.shape[0]} frames of 32x32")
    problems = check_plan_boxes(report)
    views = {"classic": report["classic"], "Nodes 2.0": report.get("vue")}
    for view, displays in views.items():
        if displays is None:
            say(f"    {view} view: not in this frontend")
            continue
        shown = [d for d in displays if d["visible"]]
        bad = [d for d in shown if not (d["inside"] and d["readOnly"] and d["shownLabel"]) or d["clipped"]]
        if bad:
            problems.append(f"{view} view: plan display boxes misplaced, editable or unlabelled: {bad}")
        say(f"    {view} view: {len(shown)} of {len(displays)} plan display boxes on screen, all read-only, "
            f"labelled '{LABEL}' and inside their nodes" + ("" if shown else " (this view does not draw DOM widgets)"))
    problems += check_layouts(report["layouts"])
    ours = [line for line in report["console"]["errors"] + report["console"]["warnings"] if from_the_pack(line)]
    if ours:
        raise Check(f"console errors/warnings from the pack while editing: {ours}")
    say(f"    console: {len(report['console']['errors'])} errors, {len(report['console']['warnings'])} warnings, "
        "none from the pack's extension")
    for line in report["console"]["warnings"]:
        if "unison" in line.lower():
            say(f"    frontend warning naming a Unison type: {line[:200]}")
    say("    screenshots: " + ", ".join(report["screenshots"]))
    if problems:
        raise Check("; ".join(problems))


LABEL = "Unison decided"


def check_template_cards(seen: dict[str, Any]) -> None:
    """Every shipped workflow's thumbnail is served, and the template browser shows them on its cards."""
    names = sorted(f.stem for f in (REPO / "workflows").glob("*.json"))
    served = seen.get("served") or {}
    missing = [n for n in names if served.get(n) != 200]
    if seen.get("error") or missing or seen.get("shown", 0) < len(names):
        raise Check(f"template browser: thumbnails not served {missing}, {seen.get('shown')} card pictures shown "
                    f"for {len(names)} templates {seen.get('error') or ''}")
    say(f"    template browser: {len(names)} thumbnails served (HTTP 200) and {seen['shown']} card pictures shown")


def check_missing_models_dialog(server: str, base: Path, playwright_dir: Path, shots: Path) -> None:
    """A fresh install: the model files moved away, what the frontend's missing-models warning offers."""
    models = base / "models"
    away = base / "models-away"
    models.rename(away)
    try:
        for sub in ("diffusion_models", "vae", "text_encoders", "unison"):
            (models / sub).mkdir(parents=True)
        files = sorted((REPO / "workflows").glob("*.json"))
        env = {**os.environ, "NODE_PATH": str(playwright_dir / "node_modules")}
        done = subprocess.run(["node", str(HERE.parent / "frontend_models.mjs"), server, str(shots), *map(str, files)],
                              capture_output=True, text=True, env=env, timeout=900)
    finally:
        import shutil

        shutil.rmtree(models)
        away.rename(models)
    if done.returncode != 0:
        raise Check(f"missing-models check failed: {done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    say(f"7. missing-models warning on a fresh install (frontend {report['frontendVersion']}):")
    for name, seen in report["workflows"].items():
        say(f"    {name}: shows {len(seen['shown'])} of {len(seen['declared'])} declared files "
            f"{seen['shown']}; {seen['downloadButtons']} 'Download' labels on the page")
        if not seen["shown"]:
            raise Check(f"{name}: the missing-models warning shows none of {seen['declared']}")


def check_plan_boxes(report: dict[str, Any]) -> list[str]:
    """The plan boxes show what the editor's run decided, also after a run in which every node was cached."""
    problems = []
    wanted = "size: 32x32, 9 frames"
    for label, key in (("after the run", "displaysAfterRun"),
                       ("after the all-cached re-run", "displaysAfterCachedRun")):
        router = (report.get(key) or {}).get("Unison Task Router") or ""
        if wanted not in router:
            problems.append(f"the Router's plan box {label} shows {router!r}, expected {wanted!r}")
        else:
            say(f"    the Router's plan box {label}: " + router.replace("\n", " | ")[:160])
    cached = report.get("cachedHistory") or {}
    kinds = [m[0] for m in cached.get("status", {}).get("messages", [])]
    say(f"    the re-run: {cached.get('status', {}).get('status_str')}; messages {kinds}; boxes before it "
        f"{sorted(set((report.get('displaysBeforeCachedRun') or {}).values()))}")
    return problems


def check_layouts(layouts: dict[str, list[dict[str, Any]]]) -> list[str]:
    """No two nodes overlap in any shipped workflow, in either view, as the page draws them."""
    problems = []
    for name, nodes in layouts.items():
        undrawn = [n["id"] for n in nodes if not n["drawn"]]
        overlaps = [(f"{a['type']} #{a['id']}", f"{b['type']} #{b['id']}") for i, a in enumerate(nodes)
                    for b in nodes[i + 1:] if boxes_overlap(a["box"], b["box"])]
        if undrawn or overlaps:
            problems.append(f"{name}: overlaps {overlaps}, not drawn {undrawn}")
    say(f"    layouts: {len(layouts)} workflow views measured on the page ("
        + ", ".join(sorted({k.rsplit(' ', 1)[0] for k in layouts})) + "); overlapping pairs: "
        + ("none" if not problems else "; ".join(problems)))
    return problems


def server_arguments(description: str, port: int) -> argparse.ArgumentParser:
    """The options both live checks take: where ComfyUI and its Python are, the port, the base folder."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI checkout (holds main.py)")
    parser.add_argument("--python", default=sys.executable, help="the Python of ComfyUI's environment")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--base", type=Path, default=None, help="base folder (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="leave the server running (prints its pid)")
    return parser


def main() -> int:
    parser = server_arguments(__doc__, port=8190)
    parser.add_argument("--frontend", type=Path, default=None,
                        help="folder whose node_modules holds playwright-core: also convert with the real frontend "
                             "in headless Chromium (/usr/bin/chromium) and drive the editor")
    parser.add_argument("--front-end-root", type=Path, default=None,
                        help="serve this frontend build (e.g. comfyui-frontend-package's static folder)")
    parser.add_argument("--screenshots", type=Path, default=None, help="where the editor screenshots go")
    args = parser.parse_args()
    base = args.base or Path(tempfile.mkdtemp(prefix="unison-live-"))
    say(f"base folder {base}")
    build_layout(base)
    extra = ["--preview-method", "latent2rgb"]
    if args.front_end_root is not None:
        extra += ["--front-end-root", str(args.front_end_root)]
    try:
        with serving(args.comfyui, args.python, base, args.port, keep=args.keep, say=say, extra_args=extra) as server:
            run_checks(server.url, base, server.log)
            info = request(f"{server.url}/object_info", timeout=60)[1]
            workflow = json.loads((REPO / "workflows" / "unison_auto.json").read_text(encoding="utf-8"))
            check_previews(server.url, workflow, classes_from_object_info(info))
            if args.frontend is not None:
                check_frontend(server.url, info, args.frontend)
                check_editor(server.url, base, args.frontend, args.screenshots or base / "screenshots")
                check_missing_models_dialog(server.url, base, args.frontend, args.screenshots or base / "screenshots")
        say("all checks passed")
        return 0
    except (Check, ServerError) as exc:
        say(f"CHECK FAILED: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
