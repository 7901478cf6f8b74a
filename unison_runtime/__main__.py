"""Command line: ``python -m unison_runtime {plan,ask,run,selftest,convert-projector,download}``.

Each command imports only what it needs, so ``plan`` with the rule planner never loads torch.
Deliberate refusals (:class:`UnisonError`) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from .errors import UnisonError

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


def _input_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-dir",
        type=Path,
        default=Path.cwd(),
        help="folder that ###name### references resolve in; nothing outside it is read (default: current folder)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unison_runtime",
        description="Unison: plan a free-form instruction, answer it, or generate the image or video it asks for.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    ask = sub.add_parser("ask", help="answer an understanding instruction with stage one")
    ask.add_argument("instruction")
    _input_dir_arg(ask)
    _add_model_args(ask)

    run = sub.add_parser("run", help="run the whole job: plan, then answer (.txt) or generate (.png / .mp4)")
    run.add_argument("instruction")
    run.add_argument("--models", type=Path, required=True, help="models folder (sub-folders as in ComfyUI's models/)")
    run.add_argument("--out", type=Path, required=True, help="output path; the extension is set from the task")
    run.add_argument("--steps", type=int, default=None)
    run.add_argument("--guidance", type=float, default=None)
    run.add_argument("--shift", type=float, default=None)
    run.add_argument("--seed", type=int, default=None)
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
    _input_dir_arg(run)
    _add_model_args(run)

    selftest = sub.add_parser(
        "selftest", help="build tiny random models and run all 12 tasks end to end on this machine"
    )
    selftest.add_argument("--out", type=Path, default=None, help="folder for the outputs and report.json")

    convert = sub.add_parser("convert-projector", help="convert a projector .pth to .safetensors (no pickle run)")
    convert.add_argument("source", type=Path)
    convert.add_argument("target", type=Path)

    download = sub.add_parser("download", help="download the released models into a models folder (needs internet)")
    download.add_argument("--to", type=Path, required=True)
    download.add_argument("--dry-run", action="store_true", help="print what would go where, download nothing")
    return parser


# --------------------------------------------------------------------------- plan


def _make_planner(args: argparse.Namespace) -> Any:
    if args.model is None:
        if args.lora is not None:
            raise UnisonError("--lora needs --model (the Qwen2.5-VL base directory)")
        from .planner.rules import RulePlanner

        return RulePlanner()
    from .planner.qwen import load_planner

    return load_planner(args.model, lora=args.lora, device=args.device, dtype=args.dtype, attention=args.attention)


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


def _batch_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    if (args.instruction is None) == (args.batch is None):
        raise UnisonError("give either an INSTRUCTION or --batch FILE (not both)")
    planner = _make_planner(args)
    if args.batch is None:
        plan = _plan_one(planner, args.instruction, args.input_dir, args.fallback_to_rules)
        out.write(json.dumps(plan, ensure_ascii=False, indent=2) + "\n")
        return 0
    failures = 0
    for number, line in _batch_lines(args.batch):
        record = _plan_batch_line(planner, args, number, line)
        failures += "error" in record
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
    return 0 if failures == 0 else 1


def _plan_batch_line(planner: Any, args: argparse.Namespace, number: int, line: str) -> dict[str, Any]:
    """One batch record: the plan with its id, or the id with the error; the batch goes on either way."""
    where = f"{args.batch}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"id": None, "error": f"{where}: not valid JSON ({exc.msg})"}
    item_id = item.get("id") if isinstance(item, dict) else None
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        return {"id": item_id, "error": f'{where}: expected {{"id": ..., "prompt": "..."}}'}
    try:
        return {"id": item_id, **_plan_one(planner, item["prompt"], args.input_dir, args.fallback_to_rules)}
    except UnisonError as exc:
        return {"id": item_id, "error": str(exc)}


def cmd_ask(args: argparse.Namespace, out: TextIO) -> int:
    from .instruction import parse_instruction
    from .media import read_reference

    if args.model is None:
        raise UnisonError("ask needs --model (a Qwen2.5-VL directory); the rule planner cannot answer")
    planner = _make_planner(args)
    instruction = parse_instruction(args.instruction, roots=[args.input_dir], must_exist=True)
    media = [read_reference(ref.path, [args.input_dir]) for ref in instruction.media]
    out.write((planner.answer(instruction, media) or "") + "\n")
    return 0


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    from .pipeline import run_cli_job

    result = run_cli_job(args)
    out.write(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return 0


def cmd_selftest(args: argparse.Namespace, out: TextIO) -> int:
    from .selftest import run_selftest

    report = run_selftest(args.out)
    out.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    return 0 if report.get("ok") else 1


def cmd_convert_projector(args: argparse.Namespace, out: TextIO) -> int:
    from .projector import convert_projector

    written = convert_projector(args.source, args.target)
    out.write(f"wrote {written}\n")
    return 0


def cmd_download(args: argparse.Namespace, out: TextIO) -> int:
    from .download import download_all

    for line in download_all(args.to, dry_run=args.dry_run):
        out.write(line + "\n")
    return 0


COMMANDS = {
    "plan": cmd_plan,
    "ask": cmd_ask,
    "run": cmd_run,
    "selftest": cmd_selftest,
    "convert-projector": cmd_convert_projector,
    "download": cmd_download,
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        return COMMANDS[args.command](args, out)
    except UnisonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
