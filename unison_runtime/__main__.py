"""Command line: ``python -m unison_runtime {plan,ask,run,selftest,convert-projector,download}``.

Each command imports only what it needs, so ``plan`` with the rule planner never loads torch, and
checks its arguments (files, folders, devices, where outputs go) before any model loads.
stdout carries the command's result (JSON for ``plan``, ``run`` and ``selftest``); progress goes
to stderr (``--quiet`` silences it). Nothing ends in a traceback: every failure is one line on
stderr and one of the :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .errors import OutOfMemory, UnisonError

if TYPE_CHECKING:
    from .progress import Progress

#: What the exit status means (README, "Exit codes").
EXIT_OK, EXIT_PARTIAL, EXIT_REFUSED, EXIT_MEMORY, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 70, 130
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_PARTIAL: "some batch lines or selftest tasks failed (each is reported; the others are done)",
    EXIT_REFUSED: "bad arguments or input, a missing or unusable file, folder or device; nothing was written",
    EXIT_MEMORY: "the job would not fit in memory (refused before loading) or ran out of memory",
    EXIT_BUG: "an internal error (a bug: please report the line; UNISON_DEBUG=1 shows the traceback)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); no partial output file is left",
}


#: Characters JSON leaves raw (ensure_ascii=False) that line readers such as ``str.splitlines`` break on.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_line(record: object) -> str:
    """One JSON Lines record: readable non-ASCII text, but never a character any reader takes for a line end."""
    text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    for raw, escaped in _LINE_BREAKS.items():
        text = text.replace(raw, escaped)
    return text


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (the usage text is one --help away)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)  # keep it one line
        self.exit(EXIT_REFUSED, f"error: {shown} (see: {self.prog} --help)\n")


def _finite(text: str) -> float:
    """A float argument that is a real number (nan, inf are refused by argparse with one line)."""
    import math

    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _steps(text: str) -> int:
    from .vace.sampler import MAX_STEPS

    value = int(text)
    if not 1 <= value <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_STEPS} steps, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**64), got {value}")
    return value


_finite.__name__ = "number"
_steps.__name__ = "step count"
_seed.__name__ = "seed"

EXAMPLE = (
    "Please create a video with a width of 768 pixels and a height of 480 pixels, "
    "that is 2 seconds long, of a lion walking around in its habitat."
)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="Qwen2.5-VL directory (base, or a merged Unison planner)")
    parser.add_argument("--lora", type=Path, help="Unison planning LoRA adapter directory (with --model)")
    parser.add_argument("--device", default=None, help="stage-one torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp16", "fp32"], help="stage-one dtype")
    parser.add_argument(
        "--attention", default=None, choices=["sdpa", "flash_attention_2", "eager"], help="attention backend"
    )


def _quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (errors are still shown)")


def _input_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-dir",
        type=Path,
        default=Path.cwd(),
        help="folder that ###name### references resolve in; nothing outside it is read (default: current folder)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m unison_runtime",
        description="Unison: plan a free-form instruction, answer it, or generate the image or video it asks for.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    plan = sub.add_parser(
        "plan",
        help="print the plan JSON for an instruction",
        description="Print the plan (task + meta-information) as JSON. Without --model the embedded rule planner "
        "decides; with --model [--lora] the Qwen2.5-VL planner does.",
        epilog=f'example: python -m unison_runtime plan "{EXAMPLE}"',
    )
    plan.add_argument("instruction", nargs="?", help="the instruction; reference media as ###name.png###")
    plan.add_argument("--batch", type=Path, help='JSON-lines file of {"id": ..., "prompt": ...}; one plan per line out')
    plan.add_argument(
        "--fallback-to-rules",
        action="store_true",
        help="when the model's planner output cannot be read, print the rule planner's plan instead of failing",
    )
    _input_dir_arg(plan)
    _add_model_args(plan)
    _quiet_arg(plan)

    ask = sub.add_parser("ask", help="answer an understanding instruction with stage one")
    ask.add_argument("instruction")
    _input_dir_arg(ask)
    _add_model_args(ask)
    _quiet_arg(ask)

    run = sub.add_parser("run", help="run the whole job: plan, then answer (.txt) or generate (.png / .mp4)")
    run.add_argument("instruction", nargs="?", help="the instruction (or --batch FILE)")
    run.add_argument("--models", type=Path, required=True, help="models folder (sub-folders as in ComfyUI's models/)")
    run.add_argument("--out", type=Path, required=True,
                     help="output file (the extension is set from the task), or a folder to write <task>.<ext> in")
    run.add_argument("--steps", type=_steps, default=None, help="denoising steps, 1-1000 (default 50)")
    run.add_argument("--guidance", type=_finite, default=None, help="guidance scale (default 5; 1 = off)")
    run.add_argument("--shift", type=_finite, default=None, help="flow shift (default 5)")
    run.add_argument("--seed", type=_seed, default=None)
    run.add_argument("--negative-prompt", default=None)
    run.add_argument("--noise-device", default=None, choices=["cpu", "device"],
                     help="where the starting noise is drawn: cpu (default; the same noise for a seed on every "
                          "machine) or device (a generator on the sampling device, as the reference does)")
    run.add_argument("--vace-dtype", default=None, choices=["auto", "bf16", "fp16", "fp32"],
                     help="stage-two transformer dtype (default: bf16 on a GPU, fp32 on the CPU)")
    run.add_argument("--text-device", default=None,
                     help="device for the umT5 encoder (default: --device; 'cpu' keeps umT5-XXL off the GPU)")
    run.add_argument("--text-dtype", default=None, choices=["auto", "bf16", "fp16", "fp32"],
                     help="umT5 compute dtype (default: bf16 on a GPU or a CPU with native bf16, else fp32); "
                     "fp8/fp16 files stay stored at their size and are cast layer by layer")
    run.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                     help="stage the job: one large model at a time (Qwen, then umT5, then transformer + VAE); "
                     "default: chosen from the free memory, and said on stderr")
    run.add_argument("--batch-cfg", action=argparse.BooleanOptionalAction, default=None,
                     help="both guidance branches in one forward (faster, twice the activations); "
                     "default: chosen from the free memory")
    run.add_argument("--vae-tiling", action="store_true",
                     help="decode in tiles (less memory for large frames; switched on by itself when only the "
                          "decode would not fit)")
    run.add_argument("--no-memory-check", action="store_true",
                     help="skip the memory estimate before loading (the job may then be killed by the OS)")
    from .vace.speed_args import add_speed_arguments  # speed flags (issue 19): --cache, --compile, ...

    add_speed_arguments(run)
    _input_dir_arg(run)
    _add_model_args(run)
    _quiet_arg(run)
    # scale-out: --batch/--ray/--workers, --ulysses/--ring under torchrun (unison_runtime/parallel/cli.py)
    from .parallel.cli import add_scaleout_args

    add_scaleout_args(run)

    selftest = sub.add_parser(
        "selftest", help="build tiny random models and run all 12 tasks end to end on this machine"
    )
    selftest.add_argument("--out", type=Path, default=None,
                          help="folder for the outputs, their input media and report.json")
    _quiet_arg(selftest)

    convert = sub.add_parser("convert-projector", help="convert a projector .pth to .safetensors (no pickle run)")
    convert.add_argument("source", type=Path)
    convert.add_argument("target", type=Path)
    convert.add_argument("--force", action="store_true", help="overwrite TARGET if it exists")

    download = sub.add_parser("download", help="download the released models into a models folder (needs internet)")
    download.add_argument("--to", type=Path, required=True)
    download.add_argument("--dry-run", action="store_true", help="print what would go where, download nothing")
    return parser


# --------------------------------------------------------------------------- plan


def _check_model_args(args: argparse.Namespace) -> None:
    """Folders and device names of --model/--lora/--device, said before any heavy import."""
    from .preflight import check_device_name, input_folder

    if args.model is not None:
        input_folder(args.model, "--model folder", "a Qwen2.5-VL model folder")
    if args.lora is not None:
        input_folder(args.lora, "--lora folder", "a LoRA adapter directory")
    check_device_name(args.device, "--device")
    if getattr(args, "input_dir", None) is not None:
        input_folder(args.input_dir, "--input-dir")


def _make_planner(args: argparse.Namespace, progress: Progress) -> Any:
    if args.model is None:
        if args.lora is not None:
            raise UnisonError("--lora needs --model (the Qwen2.5-VL base directory)")
        from .planner.rules import RulePlanner

        return RulePlanner()
    import time

    from .preflight import check_device_available
    from .progress import files_size

    check_device_available(args.device, "--device")
    from .planner.qwen import load_planner

    where = str(args.model) + (f" + LoRA {args.lora}" if args.lora else "")
    progress.loading("the Qwen2.5-VL planner", where, files_size([args.model, args.lora]))
    start = time.perf_counter()
    planner = load_planner(args.model, lora=args.lora, device=args.device, dtype=args.dtype,
                           attention=args.attention)
    progress.loaded("the Qwen2.5-VL planner", time.perf_counter() - start)
    return planner


def _plan_one(planner: Any, text: str, input_dir: Path, fallback_to_rules: bool = False) -> dict[str, Any]:
    from .errors import PlannerOutputError
    from .instruction import parse_instruction

    instruction = parse_instruction(text, roots=[input_dir])
    try:
        return planner.plan(instruction).to_dict()
    except PlannerOutputError as exc:
        if fallback_to_rules and exc.fallback is not None:
            data = exc.fallback.to_dict()
            data.setdefault("notes", []).append(f"planner output unreadable, rule plan used: {exc.reason}")
            return data
        raise


def cmd_plan(args: argparse.Namespace, out: TextIO, progress: Progress) -> int:
    from .preflight import input_file

    if (args.instruction is None) == (args.batch is None):
        raise UnisonError("give either an INSTRUCTION or --batch FILE (not both)")
    if args.batch is not None:
        input_file(args.batch, "--batch file")
    _check_model_args(args)
    planner = _make_planner(args, progress)
    if args.batch is None:
        progress.stage(f"planning with {getattr(planner, 'name', 'the planner')}")
        plan = _plan_one(planner, args.instruction, args.input_dir, args.fallback_to_rules)
        out.write(json.dumps(plan, ensure_ascii=False, indent=2) + "\n")
        return EXIT_OK
    from .preflight import batch_lines

    failures = 0
    for number, line, problem in batch_lines(args.batch):
        where = f"{args.batch}:{number}"
        record = {"id": None, "error": f"{where}: {problem}"} if problem else \
            _plan_batch_line(planner, args, where, line or "")
        failures += "error" in record
        out.write(json_line(record) + "\n")
        out.flush()
    return EXIT_OK if failures == 0 else EXIT_PARTIAL


def _plan_batch_line(planner: Any, args: argparse.Namespace, where: str, line: str) -> dict[str, Any]:
    """One batch record: the plan with its id, or the id with the error; the batch goes on either way."""
    from .preflight import parse_json_line

    try:
        item = parse_json_line(line)
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc) or "too deeply nested"
        return {"id": None, "error": f"{where}: not valid JSON ({reason})"}
    item_id = item.get("id") if isinstance(item, dict) else None
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        return {"id": item_id, "error": f'{where}: expected {{"id": ..., "prompt": "..."}}'}
    try:
        return {"id": item_id, **_plan_one(planner, item["prompt"], args.input_dir, args.fallback_to_rules)}
    except UnisonError as exc:
        return {"id": item_id, "error": f"{where}: {_one_line(exc)}"}


def cmd_ask(args: argparse.Namespace, out: TextIO, progress: Progress) -> int:
    from .instruction import parse_instruction

    if args.model is None:
        raise UnisonError("ask needs --model (a Qwen2.5-VL directory); the rule planner cannot answer")
    _check_model_args(args)
    # The named media are found (and their kinds checked) before the model loads.
    instruction = parse_instruction(args.instruction, roots=[args.input_dir], must_exist=True)
    from .media import read_reference

    media = [read_reference(ref.path, [args.input_dir]) for ref in instruction.media]
    planner = _make_planner(args, progress)
    progress.stage(f"answering with {getattr(planner, 'name', 'the planner')}")
    out.write((planner.answer(instruction, media) or "") + "\n")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, out: TextIO, progress: Progress) -> int:
    from .parallel.cli import scaleout_command
    from .preflight import check_device_name, input_folder, output_stem

    scaleout = scaleout_command(args)  # torchrun (context parallel), --batch [--ray]; None: one job here
    if scaleout is None and args.instruction is None:
        raise UnisonError("give an INSTRUCTION, or --batch FILE")
    output_stem(args.out)  # an unwritable --out is said now, not after the generation
    input_folder(args.models, "--models folder", "a models folder with diffusion_models/, vae/, text_encoders/, "
                 "unison/ sub-folders")
    _check_model_args(args)
    check_device_name(args.text_device, "--text-device")
    if scaleout is not None:
        return scaleout(args, out, progress)
    from .pipeline import run_cli_job

    result = run_cli_job(args, progress=progress)
    out.write(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return EXIT_OK


def cmd_selftest(args: argparse.Namespace, out: TextIO, progress: Progress) -> int:
    if args.out is not None:
        from .preflight import writable_folder

        writable_folder(args.out, "--out folder")
    from .selftest import run_selftest

    report = run_selftest(args.out, progress=progress)
    out.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    return EXIT_OK if report.get("ok") else EXIT_PARTIAL


def cmd_convert_projector(args: argparse.Namespace, out: TextIO, progress: Progress) -> int:
    from .preflight import input_file, new_file_target

    input_file(args.source, "projector file")
    new_file_target(args.target, force=args.force, what="conversion target")
    from .projector import convert_projector

    written = convert_projector(args.source, args.target)
    out.write(f"wrote {written}\n")
    return EXIT_OK


def cmd_download(args: argparse.Namespace, out: TextIO, progress: Progress) -> int:
    from .download import download_all

    for line in download_all(args.to, dry_run=args.dry_run):
        out.write(line + "\n")
    return EXIT_OK


COMMANDS = {
    "plan": cmd_plan,
    "ask": cmd_ask,
    "run": cmd_run,
    "selftest": cmd_selftest,
    "convert-projector": cmd_convert_projector,
    "download": cmd_download,
}


def _one_line(exc: BaseException | str) -> str:
    """A message on one line: multi-line advice joined with '; '."""
    lines = [line.strip().removeprefix("- ") for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    head, rest = lines[0], lines[1:]
    return head + (" " + "; ".join(rest) if rest else "")


def _library_bars(on: bool) -> None:
    """transformers' and diffusers' own progress bars (they pass ``disable=`` explicitly, past TQDM_DISABLE)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for module in (transformers_logging, diffusers_logging):
        (module.enable_progress_bar if on else module.disable_progress_bar)()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    from .progress import make_progress

    quiet = bool(getattr(args, "quiet", False))
    progress = make_progress(quiet)
    # --quiet silences the libraries' own bars too (transformers' "Loading weights", diffusers'):
    # tqdm reads TQDM_DISABLE whenever a bar is made. Restored afterwards for in-process callers.
    saved = os.environ.get("TQDM_DISABLE")
    loads_models = args.command in ("run", "ask", "selftest") or getattr(args, "model", None) is not None
    if loads_models:
        from .heap import unmap_large_blocks

        unmap_large_blocks()  # freed tensors leave no resident heap holes (BENCHMARKS.md section 8)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
        if loads_models:
            _library_bars(False)
    try:
        return COMMANDS[args.command](args, out, progress)
    except KeyboardInterrupt:
        print("interrupted: stopped; no partial output was left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OutOfMemory as exc:  # includes MemoryWontFit, the preflight's refusal
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_MEMORY
    except UnisonError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_REFUSED
    except MemoryError:
        print("error: out of memory (the machine ran out of RAM); lower the size or length, or use --low-memory",
              file=sys.stderr)
        return EXIT_MEMORY
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or _one_line(exc)}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:
        if os.environ.get("UNISON_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {_one_line(exc)[:300]} (a bug; please report it; "
              "UNISON_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_BUG
    finally:
        if quiet:
            if loads_models:
                _library_bars(True)
            if saved is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = saved


if __name__ == "__main__":
    sys.exit(main())
