"""The CLI never ends in a traceback: each everyday mistake is one line on stderr and a documented exit code.

Cases from issue 15, each run through the real entry point (``main(argv)``); the ones that need
stage two use a tiny random Wan2.1-VACE folder and the rule planner.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unison_runtime.__main__ import EXIT_CODES, main

ROOT = Path(__file__).resolve().parents[1]
T2I = "Create an image of a red car parked on a street at night, 32x32"


def cli(*argv: str) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured; argparse's exits are returned as codes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv], out=out)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, expected_code: int = 2) -> str:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]



# --------------------------------------------------------------------------- plan --batch


def test_batch_missing_file_or_folder_is_one_line(tmp_path):
    line = one_line_error(*cli("plan", "--batch", tmp_path / "missing.jsonl")[::2])
    assert "missing.jsonl: file not found" in line
    line = one_line_error(*cli("plan", "--batch", tmp_path)[::2])
    assert "is a folder; expected a file" in line


def test_batch_bad_lines_are_reported_and_valid_lines_still_planned(tmp_path):
    batch = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"id": 1, "prompt": "Create an image of a fox, 480P"}).encode(),
        b'{"id": 2, "prompt": "bad \xff\xfe bytes"}',
        b"[" * 100_000,
        b'{"id": NaN, "prompt": "a cat"}',
        b'{"id": 1e999, "prompt": "a cat"}',
        b'{"id": -Infinity, "prompt": "a cat"}',
        b'{"id": "' + b"9" * 10 + b'", "prompt": 5}',
        json.dumps({"id": "last", "prompt": "What is the capital of France?"}).encode(),
    ]
    batch.write_bytes(b"\n".join(lines) + b"\n")
    code, out, err = cli("plan", "--batch", batch)
    assert code == 1 and "Traceback" not in err
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the output"))
               for line in out.splitlines()]
    assert len(records) == 8
    assert records[0]["id"] == 1 and records[0]["task"] == "text_to_image"
    assert records[7]["id"] == "last" and records[7]["task"] == "text_understanding"
    assert "not UTF-8" in records[1]["error"] and ":2:" in records[1]["error"]
    assert "nested deeper" in records[2]["error"]
    assert "NaN is not JSON" in records[3]["error"]
    assert "too large" in records[4]["error"]
    assert "-Infinity is not JSON" in records[5]["error"]
    assert records[6]["id"] == "9999999999" and "expected" in records[6]["error"]


# --------------------------------------------------------------------------- run: outputs, devices, numbers


@pytest.mark.parametrize("flag,value,words", [
    ("--guidance", "nan", "expected a finite number"),
    ("--shift", "inf", "expected a finite number"),
    ("--steps", "1001", "expected 1 to 1000 steps"),
    ("--steps", "0", "expected 1 to 1000 steps"),
    ("--seed", "-1", "expected a seed"),
])
def test_run_refuses_non_finite_and_out_of_range_numbers(tmp_path, flag, value, words):
    line = one_line_error(*cli("run", T2I, "--models", tmp_path, "--out", tmp_path / "x", flag, value)[::2])
    assert words in line and flag in line


def test_run_checks_out_before_any_model_loads(vace_models_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = one_line_error(*cli("run", T2I, "--models", vace_models_dir, "--out", blocker / "sub" / "car")[::2])
    assert f"{blocker} is a file, not a folder" in line
    line = one_line_error(*cli("run", T2I, "--models", vace_models_dir, "--out", "/proc/unison-nowhere/car")[::2])
    assert "cannot write in /proc" in line
    line = one_line_error(*cli("run", T2I, "--models", tmp_path / "no_models", "--out", tmp_path / "car")[::2])
    assert "--models folder" in line and "not found" in line


def test_devices_are_checked_with_one_line(vace_models_dir, tmp_path):
    line = one_line_error(*cli("run", T2I, "--models", vace_models_dir, "--out", tmp_path / "x",
                               "--device", "bogus")[::2])
    assert "--device 'bogus': expected cpu, cuda, cuda:N or mps" in line
    line = one_line_error(*cli("run", T2I, "--models", vace_models_dir, "--out", tmp_path / "x", "--device", "cpu",
                               "--text-device", "cuda:7")[::2])
    assert "--text-device cuda:7" in line and "CUDA" in line
    line = one_line_error(*cli("plan", "--model", tmp_path, "--device", "gpu0", "a cat")[::2])
    assert "--device 'gpu0'" in line


def test_2048_video_is_refused_fast_with_the_estimate_and_advice(vace_models_dir, tmp_path, monkeypatch):
    """The real 1.3B/umT5 sizes (estimated from the shipped configs), the tiny folder for the rest."""
    import unison_runtime.memory_estimate as memory

    big = memory.ModelFootprint(transformer=1_420_000_000 * 4, vae=127_000_000 * 4, text_encoder=5_680_000_000 * 2,
                                transformer_config=memory._json_config(None, "wan2.1-vace-1.3b-transformer"),
                                vae_config=memory._json_config(None, "wan2.1-vae"))
    monkeypatch.setattr(memory, "footprint_from_paths", lambda *a, **k: big)
    monkeypatch.setattr(memory, "free_memory", lambda device: 24 * 1024**3)
    start = time.perf_counter()
    code, out, err = cli("run", "Create a 2048x2048 video of a lion walking, 5 seconds", "--models", vace_models_dir,
                         "--out", tmp_path / "lion", "--device", "cpu", "--quiet")
    seconds = time.perf_counter() - start
    line = one_line_error(code, err, expected_code=3)
    assert seconds < 10, seconds
    assert "2048x2048, 121 frames needs about" in line and "GB on cpu" in line and "is free" in line
    for way in ("a smaller size or length (e.g.", "--vae-tiling"):
        assert way in line
    assert out == "" and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- run: what works, progress, Ctrl-C


def test_run_out_dir_writes_inside_with_progress_and_quiet(vace_models_dir, tmp_path):
    folder = tmp_path / "outs"
    folder.mkdir()
    code, out, err = cli("run", T2I, "--models", vace_models_dir, "--out", folder, "--steps", "3", "--device", "cpu",
                         "--input-dir", tmp_path)
    assert code == 0, err
    report = json.loads(out)
    assert report["path"] == str(folder / "text_to_image.png") and Path(report["path"]).is_file()
    assert "Traceback" not in err
    assert re.search(r"loading Wan2\.1-VACE \(transformer, VAE, umT5\) from \S+, \d+ (KB|MB) \.\.\.", err), err
    for words in ("planning with the rule planner", "estimated peak about", "loaded Wan2.1-VACE",
                  "encoding the prompt with umT5", "sampling [", "3/3", "s/step, ETA 0:00", "decoding 1 frame",
                  f"wrote image: {folder / 'text_to_image.png'}"):
        assert words in err, (words, err)
    code, out, err = cli("run", T2I, "--models", vace_models_dir, "--out", folder / "quiet", "--steps", "2",
                         "--device", "cpu", "--input-dir", tmp_path, "--quiet")
    assert code == 0 and err == "" and json.loads(out)["path"] == str(folder / "quiet.png")


def test_ctrl_c_during_sampling_exits_130_and_leaves_no_file(vace_models_dir, tmp_path, monkeypatch):
    import unison_runtime.vace.sampler as sampler

    original = sampler.denoise

    def interrupted(*args, progress=None, **kwargs):
        def step(done, total):
            progress(done, total)
            if done == 2:
                raise KeyboardInterrupt

        return original(*args, progress=step, **kwargs)

    monkeypatch.setattr(sampler, "denoise", interrupted)
    code, out, err = cli("run", T2I, "--models", vace_models_dir, "--out", tmp_path / "car", "--steps", "5",
                         "--device", "cpu", "--input-dir", tmp_path, "--quiet")
    assert code == 130 and out == ""
    assert err.strip() == "interrupted: stopped; no partial output was left"
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_no_half_written_file(tmp_path, monkeypatch):
    import torch

    import unison_runtime.media as media
    from unison_runtime.pipeline import UnisonResult, write_result
    from unison_runtime.plan import default_plan

    def half_then_interrupt(frames, path, fps):
        Path(path).write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(media, "write_video", half_then_interrupt)
    result = UnisonResult(plan=default_plan("text_to_video", width=32, height=32, num_frames=5),
                          frames=torch.zeros(5, 32, 32, 3), fps=24)
    with pytest.raises(KeyboardInterrupt):
        write_result(result, tmp_path / "clip")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- other commands


def test_convert_projector_and_selftest_targets(tmp_path):
    from unison_runtime.testing.tiny_projector import build_tiny_projector

    source = build_tiny_projector(tmp_path / "projector.pth", seed=1)
    target = tmp_path / "projector.safetensors"
    target.write_bytes(b"keep me")
    line = one_line_error(*cli("convert-projector", source, target)[::2])
    assert "already exists; pass --force" in line and target.read_bytes() == b"keep me"
    code, out, _ = cli("convert-projector", source, target, "--force")
    assert code == 0 and out.strip() == f"wrote {target}" and target.read_bytes() != b"keep me"
    line = one_line_error(*cli("convert-projector", source, "/proc/nowhere/p.safetensors")[::2])
    assert "cannot write in /proc" in line
    line = one_line_error(*cli("convert-projector", source, source / "p.safetensors")[::2])
    assert "is a file, not a folder" in line
    line = one_line_error(*cli("selftest", "--out", source / "out")[::2])
    assert "--out folder" in line and "is a file, not a folder" in line


def test_ask_checks_the_named_media_before_loading_the_model(tmp_path, monkeypatch):
    import unison_runtime.planner.qwen as qwen

    monkeypatch.setattr(qwen, "load_planner", lambda *a, **k: pytest.fail("the model was loaded first"))
    (tmp_path / "model").mkdir()
    line = one_line_error(*cli("ask", "--model", tmp_path / "model", "--input-dir", tmp_path,
                               "What is in ###missing.png###?")[::2])
    assert "missing.png" in line


def test_plan_with_a_missing_model_folder_answers_before_heavy_imports(tmp_path):
    """In a fresh interpreter: the answer comes without importing torch (so in well under a second's work)."""
    code = ("import sys, time; t = time.perf_counter(); from unison_runtime.__main__ import main; "
            f"c = main(['plan', '--model', {str(tmp_path / 'nope')!r}, 'a cat']); "
            "print(c, 'torch' in sys.modules, round(time.perf_counter() - t, 3))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    exit_code, torch_loaded, _seconds = done.stdout.split()
    assert exit_code == "2" and torch_loaded == "False"
    assert "--model folder" in done.stderr and "not found" in done.stderr and "Traceback" not in done.stderr


def test_exit_codes_are_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for code in EXIT_CODES:
        assert f"| {code} |" in readme


def test_batch_records_stay_one_line_whatever_the_prompt_holds(tmp_path):
    """U+0085 / U+2028 / U+2029 are line ends to str.splitlines and JavaScript: escaped in JSON Lines."""
    batch = tmp_path / "prompts.jsonl"
    prompts = ["Create an image of a fox\u2028at dusk", "0\x85", "a boat\u2029on a lake"]
    batch.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in enumerate(prompts)), encoding="utf-8")
    code, out, err = cli("plan", "--batch", batch, "--input-dir", tmp_path, "--quiet")
    lines = out.splitlines()
    assert code == 0, err
    assert len(lines) == 3 and [json.loads(line)["id"] for line in lines] == [0, 1, 2]
    assert json.loads(lines[0])["prompt"] == prompts[0]
