"""Rule planner speed and the ``plan`` command's cold start (issue 9, item 1).

* Throughput: ``RulePlanner().plan`` over a varied prompt set (every task, sizes, lengths, frame
  indices, masks), single-threaded and pinned to one core; also with ``parse_instruction`` included,
  which is what a node or the CLI pays per instruction. Target: over 5,000 plans/s.
* Cold start: wall time of a fresh ``python -m unison_runtime plan "..."`` (target under 0.5 s),
  next to a bare ``python -c pass`` for scale.
* Imports: the same command run in-process in a fresh interpreter must not import torch; the
  heavy modules it did import (if any) are listed, and ``-X importtime`` gives the slowest imports.

``--profile`` prints the planner's hot spots (cProfile, cumulative time) to find what to speed up.

    python -m bench.bench_planner            # full run (about 20 s)
    python -m bench.bench_planner --quick    # smoke run
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Sequence

from bench.common import (
    ROOT,
    Row,
    base_parser,
    command_line,
    machine_summary,
    median,
    print_table,
    run_child,
)

#: Instructions a user might type, covering the 12 tasks and every meta-information convention.
PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain how a rainbow forms.",
    "Translate 'good morning' into Japanese and Spanish.",
    "Which planet is the largest? A) Mars B) Jupiter C) Venus",
    "What is happening in ###photos/street.jpg###?",
    "Describe ###cat.png### in one sentence.",
    "How many people are in ###clips/party.mp4### and what are they doing?",
    "Summarize the video ###lecture.mov###.",
    "Generate an image of a red fox in the snow, 1024x576.",
    "A watercolor painting of a lighthouse at dusk, square.",
    "Draw a vertical portrait of an astronaut, 720P.",
    "Create a picture of a futuristic city with a 16:9 aspect ratio.",
    "Render an illustration of a dragon that is 640 pixels wide and 960 pixels tall.",
    "Replace the sky in ###beach.png### with a sunset, using ###beach_mask.png### as the mask.",
    "Using the mask ###m.png###, change the car in ###street.jpg### to blue.",
    "Remove the person from ###room.jpg###.",
    "Generate an image following the pose in ###pose.png###: a dancer on a stage.",
    "Make a photo following the depth map ###depth.png### of a cozy living room.",
    "Turn this sketch ###sketch.png### into a realistic painting.",
    "Create a portrait of this person ###face.jpg### as an astronaut.",
    "Use ###product.png### as reference and make an advertisement photo on a marble table.",
    "Please create a video with a width of 768 pixels and a height of 480 pixels, that is 2 seconds long, "
    "of a lion walking around in its habitat.",
    "A 5 second clip of waves crashing on rocks, 480P.",
    "Generate a vertical video of falling leaves, 33 frames.",
    "An animation of a paper boat sailing down a river, 2.5 seconds, 1280x720.",
    "A timelapse of clouds over mountains.",
    "Animate ###portrait.png###: she smiles and turns her head.",
    "Make a video that ends with ###final.jpg###, a flower blooming.",
    "Create a 3 seconds video starting from ###start.png### where the camera slowly zooms out.",
    "Turn ###dog.png### into a video of the dog running on the beach, last frame.",
    "Make a video of this character ###hero.png### walking through a forest.",
    "Using ###face.jpg### as reference, generate a clip of her reading a book, 49 frames.",
    "Edit ###clip.mp4###: change the red car to a yellow taxi, with mask ###clip_mask.mp4###.",
    "Replace the background of ###interview.mp4### with a beach.",
    "Generate a video following the pose skeleton in ###dance_pose.mp4### of a robot dancing.",
    "Follow the depth information in ###depth.mp4### and render a snowy village, 81 frames.",
    "Make a clip following the canny edges of ###edges.mp4###, a neon city at night.",
    "Create a 832*480 video of a cat playing with a red ball in the garden.",
    "Produce a 4:3 video of a train crossing a bridge lasting four seconds.",
    # issue 14: bare descriptions, numbers in words and named sizes, Chinese, first + last frame
    "a red barn in a snowy field",
    "an astronaut riding a horse on mars, widescreen, Full HD",
    "a hummingbird drinking nectar, half a second at 30 fps",
    "a video that starts with ###day.jpg### and ends with ###night.jpg###",
    "###room.png### ###sel.png### put a christmas tree in the white area",
    "生成一段五秒的竖屏视频，海浪拍打礁石，每秒16帧",
    "一只橘猫趴在窗台上晒太阳",
    "这张照片是在哪里拍的？###trip.jpg###",
    "把###photo.png###中的天空替换成星空",
    "以###a.png###开头，以###b.png###结尾，生成一段视频",
    "Paint a picture of a quiet harbour in the morning fog.",
)

CLI_INSTRUCTION = PROMPTS[21]
TARGET_PLANS_PER_S = 5000.0
TARGET_COLD_START_S = 0.5
HEAVY_MODULES = ("torch", "numpy", "transformers", "diffusers", "PIL", "av", "safetensors", "peft")


def _pin_to_one_core() -> str:
    """Pin this process to one CPU, so 'plans per second on one core' means that."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    core = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {core})
    return f"pinned to cpu {core}"


def _plans_per_second(fn, items: Sequence, min_seconds: float, repeats: int) -> list[float]:
    """Rates (items/s) of ``repeats`` rounds, each looping over ``items`` for at least ``min_seconds``."""
    rates = []
    for _ in range(repeats):
        count = 0
        start = time.perf_counter()
        while True:
            for item in items:
                fn(item)
            count += len(items)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        rates.append(count / elapsed)
    return rates


def throughput_rows(repeats: int, min_seconds: float) -> list[Row]:
    from unison_runtime.instruction import parse_instruction
    from unison_runtime.planner.rules import RulePlanner

    pinned = _pin_to_one_core()
    planner = RulePlanner()
    instructions = [parse_instruction(text) for text in PROMPTS]
    for instruction in instructions:  # warm up (regex compilation, caches)
        planner.plan(instruction)
    note = f"{len(PROMPTS)} varied prompts, 1 thread, {pinned}"
    plan_only = _plans_per_second(planner.plan, instructions, min_seconds, repeats)
    with_parse = _plans_per_second(lambda text: planner.plan(parse_instruction(text)), PROMPTS, min_seconds,
                                   repeats)
    rows = []
    for case, rates in (("rule planner: plan(instruction)", plan_only),
                        ("rule planner: parse_instruction + plan", with_parse)):
        value = median(rates)
        rows.append(Row(case, value, "plans/s", len(rates), f"> {TARGET_PLANS_PER_S:,.0f}",
                        value > TARGET_PLANS_PER_S, note))
    return rows


def _wall(args: Sequence[str]) -> float:
    # As installed: bytecode cached (this sandbox sets PYTHONDONTWRITEBYTECODE, which no user has).
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, check=True)
    return time.perf_counter() - start


def cold_start_rows(repeats: int) -> list[Row]:
    """Fresh interpreters, timed from spawn to exit (bytecode already cached after the warm-up run)."""
    cli = ["-m", "unison_runtime", "plan", CLI_INSTRUCTION]
    _wall(cli)
    _wall(["-c", "pass"])
    cli_times, bare_times = [], []
    for _ in range(repeats):
        cli_times.append(_wall(cli))
        bare_times.append(_wall(["-c", "pass"]))
    cli_median = median(cli_times)
    return [
        Row("CLI cold start: python -m unison_runtime plan \"...\"", cli_median, "s", repeats,
            f"< {TARGET_COLD_START_S}", cli_median < TARGET_COLD_START_S, "fresh process, spawn to exit"),
        Row("for scale: python -c pass", median(bare_times), "s", repeats, "", None, "interpreter start alone"),
    ]


_IMPORT_PROBE = f"""
import io, json, sys
from unison_runtime.__main__ import main
code = main(["plan", {CLI_INSTRUCTION!r}], out=io.StringIO())
heavy = [name for name in {HEAVY_MODULES!r} if name in sys.modules]
print(json.dumps({{"code": code, "heavy": heavy, "modules": len(sys.modules)}}))
"""


def _slowest_imports(count: int = 5) -> list[tuple[str, int]]:
    """The modules with the largest cumulative import time under ``-X importtime`` (microseconds)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "unison_runtime", "plan", CLI_INSTRUCTION],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    entries = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cumulative, name = line.split(":", 1)[1].split("|")
        entries.append((name[1:].rstrip(), int(cumulative)))  # one space, then 2 per nesting level
    top_level = [(name, us) for name, us in entries if not name.startswith(" ")]
    return sorted(top_level, key=lambda item: -item[1])[:count]


def import_rows() -> list[Row]:
    probe = run_child(["-c", _IMPORT_PROBE])
    slowest = ", ".join(f"{name} {us / 1000:.0f} ms" for name, us in _slowest_imports())
    heavy = probe["heavy"]
    note = (f"exit {probe['code']}, {probe['modules']} modules; heavy imported: {', '.join(heavy) or 'none'}; "
            f"slowest imports (-X importtime): {slowest}")
    return [Row("plan imports torch (modules from " + "/".join(HEAVY_MODULES) + ")", float(len(heavy)), "",
                1, "torch never", "torch" not in heavy, note)]


def profile_report(seconds: float = 2.0, top: int = 20) -> str:
    """cProfile of the planner over the prompt set: the functions that take the time."""
    from unison_runtime.instruction import parse_instruction
    from unison_runtime.planner.rules import RulePlanner

    planner = RulePlanner()
    profiler = cProfile.Profile()
    deadline = time.perf_counter() + seconds
    profiler.enable()
    while time.perf_counter() < deadline:
        for text in PROMPTS:
            planner.plan(parse_instruction(text))
    profiler.disable()
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("cumulative").print_stats(top)
    buffer.write("\n-- by own time --\n")
    pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(top)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true", help="also print the planner's hot spots")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    min_seconds = 0.05 if args.quick else 1.0
    # The child processes and the throughput run must not share the pinned core with each other.
    rows = import_rows()
    rows += cold_start_rows(2 if args.quick else max(repeats, 10))
    rows += throughput_rows(repeats, min_seconds)
    print_table("Planner", rows, machine=machine_summary(), command=command_line("bench.bench_planner", argv))
    if args.profile:
        print(profile_report(0.2 if args.quick else 2.0))
    return rows


if __name__ == "__main__":
    main()
