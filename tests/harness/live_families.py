"""Queue the family workflows in a real ComfyUI (run by hand; not part of the pytest suite).

    python tests/harness/live_families.py --comfyui /path/to/ComfyUI --python /path/to/venv/bin/python

The companion of ``live_comfyui.py`` (which checks start-up, ``/object_info`` and
``unison_auto.json``): same isolated base folder (``--base-directory``; nothing is written into
ComfyUI's own folders), same tiny models under the workflow file names, loopback only. It puts
real input files into the server's ``input/`` folder (the example media the shipped workflows
name, plus a photo, a photo with a painted mask in its alpha channel as ComfyUI's mask editor
saves it, an unpainted photo, a pose video and a video with its mask video, written with
``unison_runtime.media``), points the workflows' Load Image / Load Video widgets at them, and
queues

* ``unison_edit.json``, ``unison_reference.json``, ``unison_frame_to_video.json`` and
  ``unison_control.json``: for the instruction each ships with and for others that route to the
  family's other task or to another branch (rule planner: Planner Loader bypassed; once the tiny
  Qwen planner, scripted, plans the image-to-video), checking the
  history status, the task on the Planner and Router node text, which output nodes ran (the
  blocked branches must not), and the PNG size or the mp4's frames/size/fps read back from disk;
* ``unison_native_wan.json`` as shipped: it cannot run with tiny files, because ComfyUI's own
  UNETLoader / CLIPLoader build fixed-size Wan and umT5-XXL models (see ``NATIVE_WHY``); the
  check asserts it fails there, in a core loader, with a size mismatch, and not in a pack node.

Then it stops the server it started (its own pid only). Exits non-zero on the first failed check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parents[1]))

from harness import build_workflows  # noqa: E402
from harness.comfy_server import ServerError, serving  # noqa: E402
from harness.live_comfyui import (  # noqa: E402
    REPO,
    Check,
    build_layout,
    check_start_log,
    classes_from_object_info,
    prompt_for,
    queue,
    request,
    say,
    server_arguments,
    use_scripted_planner,
)

SMALL = {"width": 32, "height": 32, "frames": "5"}
NATIVE_LOADERS = ("VAELoader", "UNETLoader", "CLIPLoader")
OUTPUT_TYPES = {"PreviewAny", "SaveImage", "SaveVideo"}
IMAGE_SAMPLER = "Unison VACE Sampler (image)"
VIDEO_SAMPLER = "Unison VACE Sampler (video)"

# Our own input files (besides the example media build_workflows names).
PHOTO = "families_photo.png"
PAINTED = "families_painted.png"
UNPAINTED = "families_unpainted.png"
POSE = "families_pose.mp4"
CLIP = "families_clip.mp4"
CLIP_MASK = "families_clip_mask.mp4"

NATIVE_WHY = (
    "ComfyUI's loaders build fixed-size models and then copy the file in (load_state_dict raises on any shape "
    "mismatch). CLIPLoader(type=wan) builds UMT5XXlModel from comfy/text_encoders/umt5_config_xxl.json (d_model "
    "4096, 24 layers, d_ff 10240, vocab 256384: ~5.7B parameters) once comfy/sd.py:detect_te_model sees "
    "encoder.block.23.layer.1.DenseReluDense.wi_1.weight with last dim 4096; the only config override is "
    "model_options['umt5xxl_model_config'] (comfy/sd1_clip.py:104), which CLIPLoader never sets "
    "(nodes.py:944-953). Any smaller umT5 file is detected as T5_BASE and, having spiece_model, built as ACE's "
    "umt5_config_base T5 (d_model 768). UNETLoader detects Wan's dim/layers from the file but fixes text_dim 4096 "
    "and freq_dim 256 (comfy/model_detection.py:377-420; the tiny VACE file has 32/32 to match the tiny umT5). "
    "VAELoader builds the Wan 2.1 VAE with a fixed dim 96 (comfy/sd.py:489-497; the tiny VAE has 8). A "
    "ComfyUI-shaped tiny transformer and a full-size random VAE would be small enough, but no umT5 file both "
    "passes detection and stays small, so the native path cannot run without ~5.7B parameters."
)


# --------------------------------------------------------------------------- input files


def write_family_media(input_dir: Path) -> None:
    """Real files in the server's input folder: PNGs (one with a painted alpha mask) and mp4s."""
    import numpy as np
    from PIL import Image

    from unison_runtime.media import write_video

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:48, 0:48]
    photo = np.stack([xx * 5, yy * 5, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(photo).save(input_dir / PHOTO)
    Image.fromarray(photo[::-1].copy()).save(input_dir / UNPAINTED)  # RGB: LoadImage gives an empty 64x64 MASK
    # The mask editor stores its painting as transparency: alpha 0 where painted (LoadImage MASK = 1 - alpha).
    rgba = np.concatenate([photo, np.full((48, 48, 1), 255, np.uint8)], axis=-1)
    rgba[((yy - 24) ** 2 + (xx - 24) ** 2) < 12**2, 3] = 0
    Image.fromarray(rgba, "RGBA").save(input_dir / PAINTED)

    def moving_box(frames: int, side: int, value: float) -> np.ndarray:
        video = np.zeros((frames, 32, 32, 3), np.float32)
        for t in range(frames):
            video[t, 8:8 + side, 2 + 2 * t:2 + 2 * t + side] = value
        return video

    write_video(moving_box(9, 10, 1.0), input_dir / POSE, fps=8)
    write_video(rng.random((9, 32, 32, 3)), input_dir / CLIP, fps=8)
    write_video(moving_box(9, 12, 1.0), input_dir / CLIP_MASK, fps=8)


# --------------------------------------------------------------------------- one run


@dataclass
class Case:
    workflow: str
    label: str
    task: str  # the task the Planner must decide
    output: str  # "text" / "image" / "video": the branch that must run
    instruction: str | None = None  # None: the instruction the workflow ships with
    widgets: dict[str, dict[str, Any]] = field(default_factory=dict)  # class_type -> inputs to set
    router: dict[str, Any] = field(default_factory=lambda: dict(SMALL))
    planner_has: tuple[str, ...] = ()  # lines the Planner node must show
    router_has: tuple[str, ...] = ()
    sampler_has: tuple[str, ...] = ()  # lines in the sampler's node text (notes from the VACE inputs)
    sampler_lacks: tuple[str, ...] = ()
    frames: int = 5
    size: tuple[int, int] = (32, 32)  # width, height of the output
    fps: int = 24  # the saved video's rate: the plan's (a video named by file: its own when nothing is said)
    qwen_script: str | None = None  # run with the tiny Qwen planner scripted to emit this plan text


def _titles(prompt: dict[str, Any]) -> dict[str, str]:
    return {i: n["_meta"]["title"] for i, n in prompt.items()}


def _text(out: dict[str, Any]) -> str:
    return "\n".join(out.get("text", []))


def _need(text: str, lines: tuple[str, ...], where: str, label: str) -> None:
    missing = [line for line in lines if line not in text]
    if missing:
        raise Check(f"{label}: {where} lacks {missing}; it shows:\n{text}")


def run_case(server: str, base: Path, classes: dict[str, type], case: Case) -> None:
    workflow = json.loads((REPO / "workflows" / f"{case.workflow}.json").read_text(encoding="utf-8"))
    if case.qwen_script is not None:
        use_scripted_planner(base, case.qwen_script)
        request(f"{server}/free", {"unload_models": True, "free_memory": True})
    prompt = prompt_for(workflow, classes, rule_planner=case.qwen_script is None, instruction=case.instruction,
                        router=case.router, loader={"lora": "none"})
    for node in prompt.values():
        node["inputs"].update(case.widgets.get(node["class_type"], {}))
    label = f"{case.workflow}: {case.label}"
    history = queue(server, prompt)
    status = history["status"]
    if status.get("status_str") != "success":
        errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
        raise Check(f"{label}: status {status.get('status_str')}: "
                    + json.dumps([{k: e.get(k) for k in ("node_type", "exception_type", "exception_message")}
                                  for e in errors])[:3000])
    outputs = history["outputs"]
    titles = _titles(prompt)
    by_title = {titles[i]: out for i, out in outputs.items()}
    kinds = {prompt[i]["class_type"] for i in outputs}

    planner = _text(by_title["UnisonPlanner"])
    router = _text(by_title["UnisonTaskRouter"])
    _need(planner, (f"task: {case.task} → {case.output}", *case.planner_has), "Planner node text", label)
    _need(router, (f"task: {case.task} → {case.output}", *case.router_has), "Router node text", label)

    wanted = {"text": "PreviewAny", "image": "SaveImage", "video": "SaveVideo"}[case.output]
    ran_samplers = {t for t in (IMAGE_SAMPLER, VIDEO_SAMPLER) if t in by_title}
    want_samplers = {"text": set(), "image": {IMAGE_SAMPLER}, "video": {VIDEO_SAMPLER}}[case.output]
    if kinds & OUTPUT_TYPES != {wanted} or ran_samplers != want_samplers:
        raise Check(f"{label}: outputs from {sorted(kinds & OUTPUT_TYPES)} and samplers {sorted(ran_samplers)}; "
                    f"expected only {wanted} and {sorted(want_samplers)}")
    say(f"  {label}: success; Planner: {planner.splitlines()[0]!r}; outputs {sorted(kinds & OUTPUT_TYPES)}, "
        f"samplers run {sorted(ran_samplers) or 'none'}")
    say("    Planner node: " + planner.replace("\n", " | "))
    if case.router:
        say("    Router node:  " + router.replace("\n", " | "))

    if case.output == "text":
        shown = _text(by_title["Answer (understanding tasks)"])
        if "rule planner" not in shown:
            raise Check(f"{label}: the answer preview shows {shown!r}")
        say(f"    PreviewAny: {shown[:110]!r}...")
        return
    sampler = _text(by_title[IMAGE_SAMPLER if case.output == "image" else VIDEO_SAMPLER])
    _need(sampler, case.sampler_has, "sampler node text", label)
    present = [line for line in case.sampler_lacks if line in sampler]
    if present:
        raise Check(f"{label}: sampler node text should not contain {present}:\n{sampler}")
    say("    sampler node: " + sampler.replace("\n", " | "))
    size = case.size
    if case.output == "image":
        from PIL import Image

        saved = next(out for i, out in outputs.items() if prompt[i]["class_type"] == "SaveImage")["images"][0]
        path = base / "output" / saved["subfolder"] / saved["filename"]
        with Image.open(path) as im:
            im.load()
            say(f"    SaveImage wrote {path.relative_to(base)}: PNG {im.size} {im.mode}")
            if im.format != "PNG" or im.size != size or im.mode != "RGB":
                raise Check(f"{label}: image is {im.format} {im.size} {im.mode}, expected PNG {size} RGB")
    else:
        from unison_runtime.media import read_video

        saved = next(out for i, out in outputs.items() if prompt[i]["class_type"] == "SaveVideo")["images"][0]
        path = base / "output" / saved["subfolder"] / saved["filename"]
        medium = read_video(path)
        say(f"    SaveVideo wrote {path.relative_to(base)}: {medium.frames.shape} @ {medium.fps} fps")
        if path.suffix != ".mp4" or medium.frames.shape != (case.frames, size[1], size[0], 3) \
                or medium.fps != case.fps:
            raise Check(f"{label}: video {path.name} is {medium.frames.shape} @ {medium.fps} fps, expected "
                        f"({case.frames}, {size[1]}, {size[0]}, 3) @ {case.fps} fps")


# --------------------------------------------------------------------------- the cases


def family_cases() -> list[Case]:
    masked, photo = build_workflows.EXAMPLE_MASKED, build_workflows.EXAMPLE_IMAGE
    return [
        # --- unison_edit: LoadImage → image1 (IMAGE) and mask1 (MASK, from the painted alpha)
        Case("unison_edit", f"as shipped ({masked}, transparent square = painted mask)", "image_editing", "image",
             planner_has=("edit: source #0, mask #1", "media #0: image1 (image, source)",
                          "media #1: mask1 (image, mask)", "decided by: rules"),
             router_has=("size: 32x32", "decided by: override"),
             sampler_lacks=("marks no pixel",)),
        Case("unison_edit", f"own painted PNG {PAINTED} (48x48, painted disc)", "image_editing", "image",
             widgets={"LoadImage": {"image": PAINTED}},
             planner_has=("edit: source #0, mask #1", "media #1: mask1 (image, mask)"),
             sampler_lacks=("marks no pixel",)),
        Case("unison_edit", f"unpainted PNG {UNPAINTED}: LoadImage's MASK is an empty 64x64", "image_editing", "image",
             widgets={"LoadImage": {"image": UNPAINTED}},
             sampler_has=("marks no pixel to regenerate (all black): the source frames are kept",)),
        Case("unison_edit", "video edit by file names (the workflow note's example)", "video_editing", "video",
             instruction=f"Replace the car in ###{CLIP}### with a bus, mask ###{CLIP_MASK}###.",
             planner_has=("edit: source #0, mask #1", f"media #0: {CLIP} (video, source)",
                          f"media #1: {CLIP_MASK} (video, mask)",
                          "note: image1 is connected but the instruction never names ###image1###",
                          "note: mask1 is connected but the instruction never names ###mask1###"),
             router_has=("5 frames @ 8 fps",), fps=8,  # the clip's own rate (PLANNER.md: Length and frame rate)
             sampler_has=("its 9 frames are resampled to 5, evenly over the whole clip",)),
        Case("unison_edit", "a question about the image routes to the answer branch", "image_understanding", "text",
             instruction="Describe ###image1###.", router={},
             planner_has=("media #0: image1 (image, context)", "note: mask1 is connected but the instruction")),
        # --- unison_reference: LoadImage → image1
        Case("unison_reference", f"as shipped ({photo})", "image_reference", "image",
             planner_has=("media #0: image1 (image, reference)",)),
        Case("unison_reference", f"a clip of the same person ({PHOTO}) routes to the video branch",
             "video_reference", "video", widgets={"LoadImage": {"image": PHOTO}},
             instruction="Generate a 2 second clip of the person in ###image1### as reference, reading a book in "
                         "a sunny cafe.",
             planner_has=("media #0: image1 (image, reference)", "49 frames @ 24 fps")),
        # --- unison_frame_to_video: LoadImage → image1
        Case("unison_frame_to_video", f"as shipped ({photo}, starting from this frame)", "image_to_video", "video",
             planner_has=("image as the first frame", "media #0: image1 (image, frame)", "73 frames @ 24 fps"),
             router_has=("image as the first frame", "5 frames @ 24 fps")),
        Case("unison_frame_to_video", f"{PHOTO}, Router frame_index=last overrides the plan", "image_to_video",
             "video", widgets={"LoadImage": {"image": PHOTO}}, router={**SMALL, "frame_index": "last"},
             planner_has=("image as the first frame",), router_has=("image as the last frame",)),
        Case("unison_frame_to_video", "tiny Qwen planner (scripted) plans image1 as the last frame, 64x32, "
             "9 frames; no Router override", "image_to_video", "video", router={}, frames=9, size=(64, 32),
             qwen_script="<BORES>64,32<EORES><BONF>8<EONF><BOFIDX>1<EOFIDX><CFV>",
             planner_has=("size: 64x32, 9 frames @ 24 fps", "image as the last frame", "decided by: lora"),
             sampler_has=("is 64x48: scaled to 64x48 and centre-cropped to the 64x32 output",)),
        Case("unison_frame_to_video", "a question about the frame routes to the answer branch",
             "image_understanding", "text", instruction="What is in ###image1###?", router={}),
        # --- unison_control: LoadVideo → GetVideoComponents → video1
        Case("unison_control", f"as shipped ({build_workflows.EXAMPLE_VIDEO}, 7 frames)", "video_controllable",
             "video", planner_has=("media #0: video1 (video, control)", "5 frames @ 24 fps",
                                   "follows the shape of 'video1' (32x32)"),  # the wired clip informs the plan
             sampler_has=("its 7 frames are resampled to 5, evenly over the whole clip",)),
        Case("unison_control", f"own pose video {POSE} (9 frames), Router frames=9", "video_controllable", "video",
             widgets={"LoadVideo": {"file": POSE}}, router={**SMALL, "frames": "9"}, frames=9,
             planner_has=("media #0: video1 (video, control)",), router_has=("9 frames @ 24 fps",),
             sampler_lacks=("resampled",)),
        Case("unison_control", "replacing the dancer routes to video editing", "video_editing", "video",
             widgets={"LoadVideo": {"file": POSE}}, instruction="Replace the dancer in ###video1### with a robot.",
             planner_has=("edit: source #0, mask none (whole frame editable)",),
             sampler_has=("no mask given and VACE's salient annotator", "the whole frame is editable")),
        Case("unison_control", "a question about the video routes to the answer branch", "video_understanding",
             "text", instruction="Describe ###video1###.", router={},
             planner_has=("media #0: video1 (video, context)",)),
    ]


def check_native_wan(server: str, classes: dict[str, type]) -> None:
    """Queue unison_native_wan.json as shipped; with tiny files it must stop in a core loader."""
    workflow = json.loads((REPO / "workflows" / "unison_native_wan.json").read_text(encoding="utf-8"))
    prompt = prompt_for(workflow, classes, rule_planner=True, router=SMALL)
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"].update(steps=2, cfg=1.0)
    history = queue(server, prompt)
    status = history["status"]
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    if status.get("status_str") == "success" or not errors:
        raise Check(f"unison_native_wan ran with tiny files: {json.dumps(history['outputs'])[:1000]}; update "
                    "this check and the live-check notes")
    error = errors[0]
    message = error["exception_message"]
    if error["node_type"] not in NATIVE_LOADERS or "size mismatch" not in message:
        raise Check(f"unison_native_wan failed elsewhere: {error['node_type']}: {error['exception_type']}: "
                    f"{message[:1500]}")
    executed = sorted({prompt[i]["class_type"] for i in error.get("executed", [])})
    mismatches = [line.strip() for line in message.splitlines() if "size mismatch" in line]
    say(f"  unison_native_wan as shipped: stops in {error['node_type']} ({error['exception_type']}), as expected "
        f"with tiny files; ran before it: {executed}")
    for line in mismatches[:3]:
        say(f"    {line[:200]}")
    say(f"    ({len(mismatches)} size mismatches in all)")
    say("    why: " + NATIVE_WHY)


# Loads the three tiny files with the functions ComfyUI's VAELoader / UNETLoader / CLIPLoader call
# (nodes.py), in ComfyUI's own Python, and prints what each did as JSON on the last line.
LOADER_PROBE = r"""
import json, sys
te, vae, unet = sys.argv[1:4]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd, comfy.utils
result = {"detect_te_model": str(comfy.sd.detect_te_model(comfy.utils.load_torch_file(te, safe_load=True)))}
loaders = {
    "VAELoader": lambda: comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae)),
    "UNETLoader": lambda: comfy.sd.load_diffusion_model(unet),
    "CLIPLoader": lambda: comfy.sd.load_clip([te], clip_type=comfy.sd.CLIPType.WAN),
}
for name, load in loaders.items():
    try:
        load()
        result[name] = "loaded"
    except Exception as exc:
        lines = [l.strip() for l in str(exc).splitlines() if "size mismatch" in l]
        result[name] = f"{type(exc).__name__}: {len(lines)} size mismatches, first: {lines[0] if lines else exc}"
print(json.dumps(result))
"""


def probe_native_loaders(comfyui: Path, python: str, base: Path) -> None:
    """Each core loader of unison_native_wan on the tiny files (the live run stops at the first failure)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(comfyui)}
    models = base / "models"
    files = [models / "text_encoders" / build_workflows.TEXT_ENCODER, models / "vae" / build_workflows.VAE,
             models / "diffusion_models" / build_workflows.TRANSFORMER]
    done = subprocess.run([python, "-c", LOADER_PROBE, *map(str, files)], cwd=comfyui, env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise Check(f"loader probe failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    say(f"  core loaders on the tiny files (ComfyUI's comfy.sd, outside the server): detect_te_model -> "
        f"{result.pop('detect_te_model')}")
    for name, outcome in result.items():
        say(f"    {name}: {outcome[:260]}")
    if any(outcome == "loaded" for outcome in result.values()):
        raise Check(f"a core loader now reads a tiny file: {result}; update NATIVE_WHY")


def main() -> int:
    parser = server_arguments(__doc__, port=8191)
    parser.add_argument("--only", default=None, help="run only the workflows whose name contains this")
    args = parser.parse_args()
    base = args.base or Path(tempfile.mkdtemp(prefix="unison-families-"))
    say(f"base folder {base}")
    build_layout(base)
    write_family_media(base / "input")
    say("input files: " + ", ".join(sorted(p.name for p in (base / "input").iterdir())))
    try:
        with serving(args.comfyui, args.python, base, args.port, keep=args.keep, say=say) as server:
            check_start_log(server.log)
            _, info = request(f"{server.url}/object_info", timeout=60)
            images = info["LoadImage"]["input"]["required"]["image"][0]  # V1 list combo
            videos = info["LoadVideo"]["input"]["required"]["file"][1]["options"]  # V3 ["COMBO", {options}]
            say(f"/object_info: LoadImage lists {images}; LoadVideo lists {videos}")
            classes = classes_from_object_info(info)
            started = time.time()
            for case in family_cases():
                if args.only is None or args.only in case.workflow:
                    run_case(server.url, base, classes, case)
            if args.only is None or args.only in "unison_native_wan":
                check_native_wan(server.url, classes)
                probe_native_loaders(args.comfyui, args.python, base)
        say(f"all checks passed ({time.time() - started:.0f} s of queued work)")
        return 0
    except (Check, ServerError) as exc:
        say(f"CHECK FAILED: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
