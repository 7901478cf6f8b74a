"""``python -m unison_runtime selftest``: all 12 tasks end to end on tiny random models, on the CPU.

It builds, in a temporary folder, a tiny model of every kind in its real on-disk format (a
Qwen2.5-VL directory with a Unison LoRA saved by peft, a projector ``.pth``, a
``Wan2.1-VACE-1.3B-diffusers`` directory) and small media files, then runs one instruction per
task through :class:`~unison_runtime.pipeline.UnisonPipeline`: the rule planner plans, the tiny
stage one answers and gives its hidden states to the tiny projector, the tiny VACE generates.
Each task writes its output (.txt / .png / .mp4); ``report.json`` says what ran, how long it
took and what failed; the input media are kept beside the outputs (``inputs/``) to compare. The
weights are random, so the outputs are noise: the point is that every path through the real code
runs on this machine.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .media import write_image, write_video
from .progress import Progress

SIZE = 32
FRAMES = 5
STEPS = 2
SEED = 0
ANSWER_TOKENS = 24  # random weights answer noise; a short answer still runs the whole path


@dataclass(frozen=True)
class SelftestCase:
    task: str
    instruction: str


#: One instruction per task; the rule planner must read each as its task, at 32x32 and 5 frames.
CASES = (
    SelftestCase("text_understanding", "What is the capital of France?"),
    SelftestCase("image_understanding", "What is in ###photo.png###?"),
    SelftestCase("video_understanding", "Describe what happens in ###clip.mp4###."),
    SelftestCase("text_to_image", "Create an image of a red fox in the snow, 32x32."),
    SelftestCase("image_editing", "Replace the sky in ###photo.png### with a sunset, using the mask ###mask.png###, "
                                  "32x32."),
    SelftestCase("image_controllable", "Generate a 32x32 image of a dancer following the pose in ###pose.png###."),
    SelftestCase("image_reference", "Create a 32x32 image of this person ###face.png### as a chef."),
    SelftestCase("text_to_video", "Create a 32x32 video of a lion walking in its habitat, 4 frames."),
    SelftestCase("image_to_video", "Animate ###photo.png### into a 32x32 video of 4 frames, ending on this frame."),
    SelftestCase("video_reference", "Create a 32x32 video of this character ###face.png### dancing, 4 frames."),
    SelftestCase("video_editing", "Replace the car in ###clip.mp4### with a bus using the mask ###mask_clip.mp4###, "
                                  "32x32, 4 frames."),
    SelftestCase("video_controllable", "Generate a 32x32 video of a robot following the depth map ###depth.mp4###, "
                                       "4 frames."),
)


def write_media(folder: Path) -> None:
    """Small images and videos, of other sizes than the target so resizing and cropping run too."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[0:40, 0:48]
    gradient = np.stack([x * 5, y * 6, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    write_image(gradient, folder / "photo.png")
    write_image(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), folder / "face.png")
    pose = np.zeros((40, 48, 3), np.uint8)
    pose[8:32, 22:26] = 255  # a white stick figure's body on black
    write_image(pose, folder / "pose.png")
    mask = np.zeros((40, 48, 3), np.uint8)
    mask[:20] = 255  # regenerate the top half
    write_image(mask, folder / "mask.png")
    frames = np.stack([np.roll(gradient, 4 * t, axis=1) for t in range(8)])
    write_video(frames, folder / "clip.mp4", fps=24)
    write_video(np.repeat(mask[None], 8, axis=0), folder / "mask_clip.mp4", fps=24)
    depth = np.stack([np.repeat((x * 5).astype(np.uint8)[..., None], 3, axis=-1)] * 8)
    write_video(depth, folder / "depth.mp4", fps=24)


def build_models(folder: Path) -> dict[str, Path]:
    """Tiny random models of every kind, in their real formats; returns their paths."""
    from .testing.tiny_projector import build_tiny_projector
    from .testing.tiny_qwen import TEXT_HIDDEN, build_tiny_qwen, build_tiny_unison_lora
    from .testing.tiny_wan import TINY_VACE, build_tiny_vace_diffusers

    qwen = build_tiny_qwen(folder / "unison" / "Qwen2.5-VL-3B-Instruct", seed=SEED)
    lora = build_tiny_unison_lora(qwen, folder / "unison" / "unison-lora", seed=SEED)
    projector = build_tiny_projector(
        folder / "unison" / "projector.pth", input_dim=TEXT_HIDDEN, t5_dim=TINY_VACE.text_dim, seed=SEED
    )
    vace = build_tiny_vace_diffusers(folder / "vace", seed=SEED)
    return {"qwen": qwen, "lora": lora, "projector": projector, "vace": vace}


def _run_case(pipeline: Any, case: SelftestCase, out_dir: Path, options: Any) -> dict[str, Any]:
    from .pipeline import write_result

    start = time.perf_counter()
    entry: dict[str, Any] = {"task": case.task, "instruction": case.instruction, "ok": False}
    try:
        instruction, media = pipeline.read(case.instruction)
        plan = pipeline.make_plan(instruction)
        entry["plan"] = plan.to_dict()
        if plan.task.value != case.task:
            raise AssertionError(f"the rule planner chose {plan.task.value}, expected {case.task}")
        if plan.output != "text" and (plan.width, plan.height, plan.num_frames) not in (
            (SIZE, SIZE, 1), (SIZE, SIZE, FRAMES)
        ):
            raise AssertionError(f"planned {plan.width}x{plan.height}x{plan.num_frames}, expected a tiny size")
        steps: list[int] = []
        result = pipeline.run_read(instruction, media, plan=plan, options=options,
                                   progress=lambda step, total: steps.append(step))
        _check_result(result, plan, steps, options.steps)
        path = write_result(result, out_dir / case.task)
        entry.update(ok=True, output=result.output, path=str(path), notes=result.notes)
        entry["plan"] = result.plan.to_dict()
        if result.answer is not None:
            entry["answer"] = result.answer
        else:
            entry["frames"] = list(result.frames.shape)
            entry["fps"] = result.fps
    except Exception as exc:  # one failing task must not hide the others: it is reported, not raised
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc(limit=8)
    entry["seconds"] = round(time.perf_counter() - start, 3)
    return entry


def _check_result(result: Any, plan: Any, steps: list[int], total_steps: int) -> None:
    if plan.output == "text":
        if not isinstance(result.answer, str):
            raise AssertionError("stage one gave no answer")
        return
    expected = (plan.num_frames, plan.height, plan.width, 3)
    if tuple(result.frames.shape) != expected:
        raise AssertionError(f"frames are {tuple(result.frames.shape)}, expected {expected}")
    if not bool(((result.frames >= 0) & (result.frames <= 1)).all()):
        raise AssertionError("frames fall outside 0..1")
    if steps != list(range(1, total_steps + 1)):
        raise AssertionError(f"progress reported steps {steps}, expected 1..{total_steps}")


def run_selftest(out_dir: str | Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Build tiny models, run all 12 tasks on the CPU, write outputs and ``report.json``; returns the report.

    ``out_dir`` receives one output per task, the input media (``inputs/``) and the report
    (default: a new temporary folder, kept so the outputs can be looked at). The tiny models are
    deleted afterwards. ``progress`` gets one line per task (time, output or error).
    """
    progress = progress or Progress()
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="unison-selftest-"))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"ok": False, "out_dir": str(out), "device": "cpu", "steps": STEPS,
                              "python": platform.python_version(), "tasks": []}
    work = Path(tempfile.mkdtemp(prefix="unison-selftest-models-"))
    try:
        import torch

        from .pipeline import UnisonPipeline
        from .planner.qwen import load_planner
        from .planner.rules import RulePlanner
        from .projector import load_projector
        from .vace.loading import load_vace_diffusers
        from .vace.sampler import SamplingOptions

        report["versions"] = _versions()
        build_start = time.perf_counter()
        progress.stage(f"building tiny random models in {work}")
        paths = build_models(work / "models")
        write_media(out / "inputs")
        report["inputs"] = str(out / "inputs")
        report["build_seconds"] = round(time.perf_counter() - build_start, 3)
        with torch.inference_mode(False):
            pipeline = UnisonPipeline(
                planner=RulePlanner(),
                stage_one=lambda: load_planner(paths["qwen"], paths["lora"], device="cpu", dtype="fp32",
                                               answer_max_new_tokens=ANSWER_TOKENS),
                projector=lambda: load_projector(paths["projector"], device="cpu"),
                vace=lambda: load_vace_diffusers(paths["vace"], device="cpu"),
                roots=[out / "inputs"],
            )
            options = SamplingOptions(steps=STEPS, seed=SEED)
            for number, case in enumerate(CASES, start=1):
                entry = _run_case(pipeline, case, out, options)
                report["tasks"].append(entry)
                result = entry.get("path") if entry["ok"] else f"FAILED: {entry.get('error', '')[:200]}"
                progress.info(f"[{number:2d}/{len(CASES)}] {case.task:<20} {entry['seconds']:6.2f} s  {result}")
            pipeline.release()
        report["ok"] = len(report["tasks"]) == len(CASES) and all(t["ok"] for t in report["tasks"])
    except Exception as exc:  # building the models or media failed: report it like a task failure
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc(limit=8)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report["failed"] = [t["task"] for t in report["tasks"] if not t["ok"]]
        report["seconds"] = round(time.perf_counter() - started, 3)
        (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
