"""``run --batch`` (issue 18) in this process and on a local 2-worker Ray cluster: per-id results, a rerun
that skips finished ids, a refused line reported without stopping the batch, a worker killed mid-batch."""

from __future__ import annotations

import io
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from unison_runtime.__main__ import build_parser, main
from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers

ROOT = Path(__file__).resolve().parents[1]
VACE = "diffusion_models/Wan2.1-VACE-1.3B-diffusers"
LINES = [
    {"id": "car", "prompt": "Create an image of a red car parked on a street at night, 32x32"},
    {"id": "lion", "prompt": "Create a video of a lion walking around in its habitat, 32x32, 5 frames", "seed": 3},
    {"id": "hero", "prompt": "Make a 32x32 video of this character ###ref.png### walking on the beach, 5 frames"},
    {"id": "ghost", "prompt": "Make a 32x32 image of this person ###missing.png### as a painting"},
]
EXPECTED = {"car": "text_to_image.png", "lion": "text_to_video.mp4", "hero": "video_reference.mp4"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    build_tiny_vace_diffusers(root / "models" / VACE)
    (root / "media").mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
        root / "media" / "ref.png")
    batch = root / "prompts.jsonl"
    batch.write_text("\n".join([*(json.dumps(line) for line in LINES), "{not json"]) + "\n", encoding="utf-8")
    return root


def _argv(workspace, out: Path, *extra: str) -> list[str]:
    return ["run", "--batch", str(workspace / "prompts.jsonl"), "--models", str(workspace / "models"), "--out",
            f"{out}/", "--input-dir", str(workspace / "media"), "--steps", "2", "--quiet", *extra]


def _run(argv: list[str]) -> tuple[int, dict]:
    out = io.StringIO()
    code = main(argv, out=out)
    return code, json.loads(out.getvalue())


def _check_layout(out: Path) -> None:
    for item_id, name in EXPECTED.items():
        record = json.loads((out / item_id / "result.json").read_text())
        assert record["file"] == name and (out / item_id / name).stat().st_size == record["bytes"] > 0
        assert record["report"]["task"] == name.split(".")[0]
    assert not (out / "ghost").exists()


def _check_failures(summary: dict) -> None:
    failed = {entry["line"]: entry for entry in summary["failed"]}
    assert set(failed) == {4, 5}
    assert failed[4]["id"] == "ghost" and "missing.png" in failed[4]["error"] and failed[4]["attempts"] == 1
    assert "not valid JSON" in failed[5]["error"]


@pytest.fixture(scope="module")
def sequential(workspace):
    out = workspace / "sequential"
    code, summary = _run(_argv(workspace, out))
    return out, code, summary


def test_sequential_batch_writes_each_id_and_reports_bad_lines(sequential):
    out, code, summary = sequential
    assert code == 1  # some lines failed; the others are done
    assert summary["done"] == 3 and summary["skipped"] == []
    _check_layout(out)
    _check_failures(summary)


def test_rerun_skips_done_ids_and_redoes_changed_or_removed_ones(workspace, sequential, tmp_path, capsys):
    out, _, _ = sequential
    code, summary = _run([arg for arg in _argv(workspace, out) if arg != "--quiet"])
    assert code == 1 and summary["done"] == 0 and sorted(summary["skipped"]) == ["car", "hero", "lion"]
    assert "batch: 3 id(s) already done, skipped" in capsys.readouterr().err  # progress goes to stderr
    (out / "car" / "text_to_image.png").unlink()  # a removed output is redone
    changed = tmp_path / "changed.jsonl"  # a changed line is redone
    lines = [dict(line, seed=4) if line["id"] == "lion" else line for line in LINES]
    changed.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    argv = _argv(workspace, out)
    argv[2] = str(changed)
    code, summary = _run([arg for arg in argv if arg != "--quiet"])
    assert sorted(entry["id"] for entry in summary["results"]) == ["car", "lion"]
    said = capsys.readouterr().err
    assert "batch: 3 line(s) to run" in said  # car, lion and the refused ghost
    assert "/3] car: text_to_image in" in said and "/3] lion: text_to_video in" in said
    assert "/3] ghost: FAILED after 1 attempt(s): media reference 'missing.png'" in said
    assert sorted(summary["skipped"]) == ["hero"]


def test_batch_refusals_are_one_line(workspace, tmp_path, capsys):
    (tmp_path / "file.png").write_bytes(b"")
    assert main(_argv(workspace, tmp_path / "file.png")) == 2
    assert "is a file: a batch writes one folder per id" in capsys.readouterr().err
    assert main([*_argv(workspace, tmp_path / "o"), "--workers", "2"]) == 2
    assert "--workers N needs --ray" in capsys.readouterr().err
    assert main(["run", "a cat", "--batch", str(workspace / "prompts.jsonl"), "--models", str(workspace),
                 "--out", f"{tmp_path}/"]) == 2
    assert "either an INSTRUCTION or --batch FILE" in capsys.readouterr().err


def test_ray_missing_is_said_in_one_line(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main([*_argv(workspace, tmp_path / "o"), "--ray"]) == 2
    assert "--ray needs Ray, which is not installed: pip install 'unison[cluster]'" in capsys.readouterr().err


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is the optional 'cluster' extra (installed by the 'test' extra)")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, logging_level=logging.ERROR,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()
    import psutil

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = [p for p in psutil.Process().children(recursive=True) if "ray" in " ".join(p.cmdline()).lower()]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"Ray processes left running: {[p.pid for p in left]}"


def test_ray_batch_survives_a_killed_worker_and_a_rerun_skips(workspace, sequential, ray_cluster, tmp_path):
    from unison_runtime.parallel.batch import batch_folder, plan_batch
    from unison_runtime.parallel.ray_batch import run_ray_batch
    from unison_runtime.testing.scaleout import exit_on_first_visit

    out = workspace / "ray"
    args = build_parser().parse_args([*_argv(workspace, out), "--ray", "--workers", "2"])
    marker = tmp_path / "killed"
    stdout = io.StringIO()
    code = run_ray_batch(args, plan_batch(args), batch_folder(args.out), stdout,
                         before_item=partial(exit_on_first_visit, str(marker), "lion"))
    summary = json.loads(stdout.getvalue())
    assert marker.exists()  # the worker running "lion" died once ...
    assert code == 1 and summary["done"] == 3 and summary["workers"] == 2
    results = {entry["id"]: entry for entry in summary["results"]}
    assert results["lion"]["attempts"] == 2  # ... and the line was run again
    assert {entry["worker"] for entry in results.values()} >= {"worker-3"}  # on a fresh worker
    _check_layout(out)
    _check_failures(summary)
    sequential_out = sequential[0]
    for item_id, name in EXPECTED.items():  # the same bytes as the in-process batch
        if (sequential_out / item_id / name).exists() and item_id != "lion":
            assert (out / item_id / name).read_bytes() == (sequential_out / item_id / name).read_bytes()
    code, summary = _run([*_argv(workspace, out), "--ray"])  # the CLI, on the same cluster: all done already
    assert summary["done"] == 0 and sorted(summary["skipped"]) == ["car", "hero", "lion"] and summary["ray"]
