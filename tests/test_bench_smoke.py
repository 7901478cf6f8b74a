"""Each benchmark script runs end to end with ``--quick`` (tiny sizes) and prints its table.

These check that the scripts work, not how fast anything is: no timing is asserted. What is
asserted is what does not depend on the machine: the table's shape, that every row carries the
machine and the exact command, and the results that are exact (the ``plan`` command does not
import torch; batched and two-pass guidance agree; Unison's frames equal diffusers' frames).
"""

from __future__ import annotations

import importlib
import math
import os

import pytest

from bench.common import Row, format_table, format_value, interleaved, pair_ratios


@pytest.fixture(scope="module", autouse=True)
def bench_cache(tmp_path_factory):
    """Build the benchmarks' random models in a temp folder, once for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNISON_BENCH_CACHE", str(tmp_path_factory.mktemp("bench-models")))
        yield


def run_quick(module: str, capsys, *extra: str) -> tuple[list[Row], str]:
    bench = importlib.import_module(f"bench.{module}")
    rows = bench.main(["--quick", *extra])
    out = capsys.readouterr().out
    return rows, out


def check_table(rows: list[Row], out: str, title: str, module: str) -> list[str]:
    """The printed table has a header, one line per row, each with the machine and the command."""
    if title:
        assert f"### {title}" in out
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(lines) == len(rows) >= 1
    for row, line in zip(rows, lines, strict=True):
        assert line.startswith(f"| {row.case.replace('|', chr(92) + '|')} |")
        assert f"`python -m bench.{module} --quick" in line
        assert "cores" in line and "torch" in line
        assert not math.isnan(row.value)
    return lines


def by_case(rows: list[Row], start: str) -> Row:
    found = [row for row in rows if row.case.startswith(start)]
    assert len(found) == 1, [row.case for row in rows]
    return found[0]


def test_planner_bench_quick(capsys):
    rows, out = run_quick("bench_planner", capsys, "--profile")
    check_table(rows, out, "Planner", "bench_planner")
    imports = by_case(rows, "plan imports torch")
    assert imports.met is True and "torch" not in imports.note.split("heavy imported:")[1].split(";")[0]
    assert by_case(rows, "rule planner: plan(instruction)").value > 0
    assert by_case(rows, "CLI cold start").value > 0
    assert "cumulative" in out  # the --profile report


def test_guidance_bench_quick(capsys):
    rows, out = run_quick("bench_guidance", capsys)
    check_table(rows, out, "Guidance: batched vs two-pass CFG", "bench_guidance")
    assert by_case(rows, "final latents, batched vs two passes").met is True
    assert by_case(rows, "batched guidance speedup").value > 0


def test_cast_buffers_bench_quick(capsys):
    rows, out = run_quick("bench_cast_buffers", capsys)
    check_table(rows, out, "Per-layer casts on the CPU: reused buffers", "bench_cast_buffers")
    assert by_case(rows, "outputs identical").met is True
    assert by_case(rows, "token time, fresh casts / reused buffers").value > 0


def test_engine_overhead_bench_quick(capsys):
    rows, out = run_quick("bench_engine_overhead", capsys)
    check_table(rows, out, "Engine overhead: Unison vs diffusers WanVACEPipeline", "bench_engine_overhead")
    for case in ("frames unison vs diffusers", "frames unison sampler vs diffusers sampler",
                 "frames unison (batched cfg) vs unison"):
        assert by_case(rows, case).met is True
    assert by_case(rows, "time ratio unison / diffusers").value > 0


def test_memory_bench_quick(capsys):
    rows, out = run_quick("bench_memory", capsys, "--kinds", "transformer-fp16-file")
    check_table(rows, out, "Memory: peak RSS while loading, and unloading", "bench_memory")
    load = by_case(rows, "peak RSS during load / weights: VACE transformer, Comfy-Org single file fp16")
    assert load.value > 0 and "float16" in load.note  # loaded in the dtype asked for
    given_back = [row for row in rows if row.case.startswith("RSS given back")]
    assert [row.case.split(" by ")[1].split(" /")[0] for row in given_back] == [
        "unloading the Qwen planner", "dropping the umT5 encoder"]
    assert all(" -> " in row.note for row in given_back)


def test_caching_bench_quick(capsys):
    rows, out = run_quick("bench_caching", capsys)
    check_table(rows, out, "Caching: second run with unchanged models", "bench_caching")
    second = by_case(rows, "UnisonPipeline: model load time in run 2")
    assert second.met is True and second.value == 0.0  # no loader was called on the second run
    assert by_case(rows, "UnisonPipeline: model load time in run 3").met is True  # release() → loads again


def test_gpu_bench_quick_prints_published_numbers_and_runs_its_measuring_code(capsys):
    rows, out = run_quick("bench_gpu", capsys)
    assert "### GPU: published reference numbers (832x480x81)" in out
    assert "| published: Wan2.1 T2V-1.3B, 480P (832x480x81, 50 steps), 1x RTX 4090 | 261 s |" in out
    assert "Wan-Video/Wan2.1 README.md" in out
    check_table(rows, out.split("### GPU: measured here")[1], "", "bench_gpu")
    # the pack's own path: loader (with its dtype / attention decision), encode, sampler steps, decode
    assert by_case(rows, "pack: load (float32, attention native)").value > 0
    assert by_case(rows, "pack: umT5 encode").value > 0
    assert by_case(rows, "pack: denoising step, guidance 5 batched (32x32x5)").value > 0
    assert by_case(rows, "pack: VAE decode, fp32").value > 0
    end_to_end = by_case(rows, "pack: end to end, encode + 2 steps + decode")
    assert "published beside it: Wan2.1 T2V-1.3B, 480P (832x480x81, 50 steps), 1x RTX 4090: 261.4 s" in end_to_end.note
    assert by_case(rows, "pack: batched guidance speedup").value > 0
    assert not any(row.case.startswith("ComfyUI nodes") for row in rows)  # only with --comfyui


def test_gpu_bench_without_a_gpu_says_so_in_one_line(capsys):
    import torch

    from bench import bench_gpu

    assert not torch.cuda.is_available()
    rows = bench_gpu.main([])
    out = capsys.readouterr().out
    assert [row.case for row in rows] == ["GPU measurements"]
    assert "no CUDA device here (torch.cuda.is_available() is False): GPU parts skipped, nothing measured" in out
    assert "| published: Wan2.1 T2V-1.3B, 480P (832x480x81, 50 steps), 1x RTX 4090 | 261 s |" in out


def test_gpu_bench_decisions_name_the_card_and_its_choices(monkeypatch):
    from bench import bench_gpu
    from unison_runtime.testing.fake_gpu import T4, FakeCuda

    FakeCuda((T4,)).install(monkeypatch)
    monkeypatch.setattr("unison_runtime.attention.flash_attention_available", lambda: False)
    assert bench_gpu.gpu_decisions("cuda:0") == ("cuda:0 (Tesla T4, sm75); VACE float16 + native, umT5 float32, "
                                                 "Qwen float32 + sdpa")


@pytest.mark.skipif(not os.environ.get("UNISON_TEST_COMFYUI"),
                    reason="set UNISON_TEST_COMFYUI to a ComfyUI folder (a copy: importing writes __pycache__)")
def test_gpu_bench_quick_through_the_comfyui_nodes(capsys):
    rows, _ = run_quick("bench_gpu", capsys, "--comfyui", os.environ["UNISON_TEST_COMFYUI"])
    assert by_case(rows, "ComfyUI nodes: denoising step").value > 0
    assert by_case(rows, "ComfyUI nodes: end to end").value > 0


# --------------------------------------------------------------------------- helpers


def test_interleaved_rotates_the_order_and_times_every_arm():
    calls: list[str] = []
    times = interleaved({name: (lambda n=name: calls.append(n)) for name in "abc"}, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert pair_ratios([2.0, 3.0], [1.0, 6.0]) == [2.0, 0.5]


def test_table_escapes_pipes_and_marks_missed_targets():
    rows = [Row("a | b", 1234.5, "plans/s", 3, "> 5000", False, "n"), Row("c", 0.0123, "s", 1)]
    text = format_table("T", rows, machine="m", command="python -m bench.x")
    assert "| a \\| b | 1,234 plans/s | 3 | > 5000 | **no** | n | m | `python -m bench.x` |" in text
    assert "| c | 0.0123 s | 1 |  |  |  | m |" in text
    assert format_value(float("nan"), "s") == "n/a"


def test_speed_bench_quick(capsys):
    rows, out = run_quick("bench_speed", capsys)
    check_table(rows, out, "Speed: text K/V once, step caches, compile", "bench_speed")
    exact = by_case(rows, "text K/V once: final latents vs recomputing")
    assert exact.value == 0 and exact.met is True  # bit-identical, whatever the machine
    for cache in ("first_block", "magcache", "taylorseer", "pab"):
        settings = [row for row in rows if row.case.startswith(f"{cache} at ")]
        assert len(settings) == 2 and all("calls" in row.note or "PAB" in row.note for row in settings)
