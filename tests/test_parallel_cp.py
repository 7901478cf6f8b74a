"""Context parallelism (issue 18): one generation split across 2 CPU processes over gloo gives the frames one
process gives, through the Python API and through ``run`` as torchrun starts it.

The two processes are started once for the module (torch.multiprocessing, spawn) with the variables
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and run every job in turn;
the single-process frames are computed here, in the test process.
"""

from __future__ import annotations

import json
import os
import socket
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from unison_runtime.__main__ import main
from unison_runtime.errors import UnisonError
from unison_runtime.parallel.context import (
    ParallelDegrees,
    check_degrees,
    check_sequence,
    choose_degrees,
    vace_cp_plan,
)
from unison_runtime.testing.tiny_wan import TinyVaceDims, build_tiny_vace_diffusers

VACE = "diffusion_models/Wan2.1-VACE-1.3B-diffusers"
#: Two VACE layers, so more than one hint is split and added; 2 heads, so Ulysses 2 divides them.
DIMS = TinyVaceDims(vace_layers=(0, 1), heads=2)
WORLD = 2
#: (name, instruction, sampling options): text-to-video with two-pass guidance, and a reference task
#: (its reference latent frame prepended to the sequence) with batched guidance; the CLI runs the
#: reference task with two passes.
JOBS = [
    ("t2v_two_pass", "Create a video of a lion walking around in its habitat, 32x32, 5 frames", {"batch_cfg": False}),
    ("reference_batched", "Make a 32x32 video of this character ###ref.png### walking on the beach, 5 frames",
     {"batch_cfg": True, "seed": 7}),
]
CLI_JOB = "Make a 32x32 video of this character ###ref.png### walking on the beach, 5 frames"
UNEVEN_JOB = "Create an image of a red car parked on a street at night, 48x48"  # 9 tokens: 2 ranks cannot split


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _options(extra: dict):
    from unison_runtime.vace.sampler import SamplingOptions

    return SamplingOptions(steps=2, **extra)


def _rank_main(rank: int, world: int, port: int, models: str, media: str, out: str) -> None:
    """One process of the group: the Python API jobs, then ``run`` as torchrun would start it."""
    import torch.distributed as dist

    from unison_runtime.parallel.session import ContextParallelSession
    from unison_runtime.pipeline import UnisonPipeline
    from unison_runtime.planner.rules import RulePlanner
    from unison_runtime.vace.loading import load_vace_diffusers

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("cpu:gloo", rank=rank, world_size=world)  # kept open for both parts below
    folder = Path(models) / VACE
    with ContextParallelSession(device="cpu") as session:
        if session.leader:
            pipeline = UnisonPipeline(planner=RulePlanner(), roots=[media],
                                      vace=session.wrap_loader(lambda: load_vace_diffusers(folder, device="cpu")))
            for name, prompt, extra in JOBS:
                session.new_job()
                result = pipeline.run(prompt, options=_options(extra))
                torch.save({"frames": result.frames, "notes": result.notes}, Path(out) / f"{name}.pt")
            try:
                pipeline.run(UNEVEN_JOB, options=_options({}))
            except UnisonError as exc:  # refused on rank 0 before the others hear of the call
                (Path(out) / "uneven.txt").write_text(str(exc))
            (Path(out) / "calls.json").write_text(json.dumps(session.transformer_calls))
        else:
            calls = session.follow(lambda: load_vace_diffusers(folder, device="cpu",
                                                               parts=("transformer",)).transformer)
            (Path(out) / "follower_calls.json").write_text(json.dumps(calls))
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["run", CLI_JOB, "--models", models, "--out", str(Path(out) / "cli") + "/", "--steps", "2",
                     "--input-dir", media, "--quiet", "--no-batch-cfg"], out=stdout)
    (Path(out) / f"cli_rank{rank}.json").write_text(json.dumps({"code": code, "stdout": stdout.getvalue()}))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    build_tiny_vace_diffusers(root / "models" / VACE, dims=DIMS)
    media = root / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(media / "ref.png")
    return root


@pytest.fixture(scope="module")
def parallel_run(workspace):
    """The 2-process run of every job, started once; its outputs in ``workspace/parallel``."""
    import torch.multiprocessing as mp

    out = workspace / "parallel"
    (out / "cli").mkdir(parents=True)
    context = mp.start_processes(_rank_main, args=(WORLD, _free_port(), str(workspace / "models"),
                                                   str(workspace / "media"), str(out)),
                                 nprocs=WORLD, start_method="spawn", join=False)
    deadline = time.monotonic() + 600
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError("the 2-process context-parallel run did not finish in 600 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return out


def _single_process(workspace, name: str):
    from unison_runtime.pipeline import UnisonPipeline
    from unison_runtime.planner.rules import RulePlanner
    from unison_runtime.vace.loading import load_vace_diffusers

    _, prompt, extra = next(job for job in JOBS if job[0] == name)
    pipeline = UnisonPipeline(planner=RulePlanner(), roots=[workspace / "media"],
                              vace=load_vace_diffusers(workspace / "models" / VACE, device="cpu"))
    return pipeline.run(prompt, options=_options(extra)).frames


@pytest.mark.parametrize("name", [job[0] for job in JOBS])
def test_two_processes_give_the_frames_of_one(workspace, parallel_run, name):
    split = torch.load(parallel_run / f"{name}.pt")
    single = _single_process(workspace, name)
    assert split["frames"].shape == single.shape
    assert float(single.std()) > 0.01  # real frames, not a constant
    assert float((split["frames"] - single).abs().max()) <= 1e-5


def test_every_transformer_call_ran_on_both_ranks(parallel_run):
    # 2 steps per job; two-pass guidance makes 2 calls a step, batched 1.
    expected = sum(2 * (1 if extra.get("batch_cfg") else 2) for _, _, extra in JOBS)
    assert json.loads((parallel_run / "calls.json").read_text()) == expected
    assert json.loads((parallel_run / "follower_calls.json").read_text()) == expected


def test_cli_under_torchrun_writes_once_and_matches_one_process(workspace, parallel_run, tmp_path):
    leader = json.loads((parallel_run / "cli_rank0.json").read_text())
    follower = json.loads((parallel_run / "cli_rank1.json").read_text())
    assert leader["code"] == 0 and follower["code"] == 0, (leader, follower)
    assert follower["stdout"] == ""  # only rank 0 prints
    report = json.loads(leader["stdout"])
    assert report["task"] == "video_reference"
    assert any("context parallel over 2 processes (Ulysses 2)" in note for note in report["notes"])
    assert sorted(p.name for p in (parallel_run / "cli").iterdir()) == ["video_reference.mp4"]
    single_out = tmp_path / "single"
    single_out.mkdir()
    assert main(["run", CLI_JOB, "--models", str(workspace / "models"), "--out", str(single_out) + "/", "--steps",
                 "2", "--input-dir", str(workspace / "media"), "--quiet", "--no-batch-cfg"]) == 0
    from unison_runtime.media import read_video

    split = read_video(parallel_run / "cli" / "video_reference.mp4")
    single = read_video(single_out / "video_reference.mp4")
    assert np.array_equal(np.asarray(split.frames), np.asarray(single.frames))


# --------------------------------------------------------------------------- refusals (no processes)


def _fake_transformer(heads: int, backend: str | None = None):
    processor = types.SimpleNamespace(_attention_backend=backend, _parallel_config=None)
    attention = types.SimpleNamespace(processor=processor)
    return types.SimpleNamespace(config=types.SimpleNamespace(num_attention_heads=heads),
                                 modules=lambda: [attention], is_cache_enabled=False)


def test_ulysses_degree_must_divide_the_heads():
    check_degrees(_fake_transformer(12), ParallelDegrees(ulysses=4))
    with pytest.raises(UnisonError, match=r"Ulysses degree 5 does not divide the transformer's 12 attention heads.*"
                                          r"use a Ulysses degree of 2, 3, 4, 6, 12"):
        check_degrees(_fake_transformer(12), ParallelDegrees(ulysses=5))


def test_ring_needs_a_backend_with_log_sum_exp():
    check_degrees(_fake_transformer(12, "flash"), ParallelDegrees(ring=2))
    with pytest.raises(UnisonError, match=r"ring attention needs .* log-sum-exp .* 'native'"):
        check_degrees(_fake_transformer(12), ParallelDegrees(ring=2))


def test_degrees_follow_the_process_count():
    assert choose_degrees(4) == ParallelDegrees(ulysses=4, ring=1)
    assert choose_degrees(8, ring=2) == ParallelDegrees(ulysses=4, ring=2)
    with pytest.raises(UnisonError, match=r"--ulysses 3 x --ring .* must equal the 4 processes"):
        choose_degrees(4, ulysses=3)
    with pytest.raises(UnisonError, match="at least 2 processes"):
        choose_degrees(1)


def test_a_sequence_that_does_not_split_evenly_is_refused_and_the_group_goes_on(parallel_run):
    said = (parallel_run / "uneven.txt").read_text()
    assert "this job's 9 video tokens do not split evenly across 2 processes" in said
    check_sequence(ParallelDegrees(ulysses=2), 1560 * 21)  # 832x480, 81 frames
    with pytest.raises(UnisonError, match="16 processes"):
        check_sequence(ParallelDegrees(ulysses=4, ring=4), 1560 * 21)


def test_plan_splits_hints_like_the_video_tokens():
    plan = vace_cp_plan()
    assert set(plan["vace_blocks.0"]) == {"hidden_states", "control_hidden_states"}
    assert plan["vace_blocks.0"]["control_hidden_states"].split_dim == plan["blocks.0"]["hidden_states"].split_dim == 1
    assert plan["proj_out"].gather_dim == 1


def test_degree_flags_outside_torchrun_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["run", "a cat", "--models", str(tmp_path), "--out", str(tmp_path) + "/", "--ulysses", "2"])
    assert code == 2
    assert "--ulysses / --ring split one generation across processes started by torchrun" in capsys.readouterr().err
