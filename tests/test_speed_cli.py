"""``run``'s speed flags (issue 19): bad values are one line before any model loads; a cached run and a
MagCache calibration run end to end through the real entry point on a tiny random VACE folder."""

from __future__ import annotations

import json

import pytest
from test_cli_errors import T2I, cli, one_line_error


def _run(vace_models_dir, tmp_path, *flags: str) -> tuple[int, str, str]:
    return cli("run", T2I, "--models", vace_models_dir, "--out", tmp_path / "out.png", "--steps", "3",
               "--device", "cpu", "--input-dir", tmp_path, *flags)


@pytest.mark.parametrize("flags, words", [
    (("--cache", "fastercache"), "cache fastercache cannot be used with the VACE transformer: FasterCache"),
    (("--cache", "pab", "--cache-threshold", "0.5"), "for pab it is spatial_attention_block_skip_range"),
    (("--cache", "magcache", "--cache-ratios", "missing.json"), "MagCache ratios file missing.json: cannot read"),
    (("--cache", "first_block", "--calibrate-cache", "r.json"), "calibration is for cache=magcache only"),
    (("--cache", "magcache", "--calibrate-cache", "/no/such/folder/r.json"), "does not exist or is not writable"),
])
def test_bad_speed_flags_are_one_line_before_loading(vace_models_dir, tmp_path, monkeypatch, flags, words) -> None:
    import unison_runtime.vace.loading as loading

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "load_vace_diffusers", lambda *a, **k: pytest.fail("loaded a model"))
    code, _, err = _run(vace_models_dir, tmp_path, *flags)
    assert words in one_line_error(code, err)


def test_calibrate_then_run_with_the_ratios(vace_models_dir, tmp_path) -> None:
    ratios = tmp_path / "ratios.json"
    code, _, err = _run(vace_models_dir, tmp_path, "--cache", "magcache", "--calibrate-cache", ratios)
    assert code == 0, err
    data = json.loads(ratios.read_text())
    assert data["steps"] == 3 and len(data["mag_ratios"]) == 3
    code, out, err = _run(vace_models_dir, tmp_path, "--cache", "magcache", "--cache-ratios", ratios,
                          "--cache-threshold", "0.5")
    assert code == 0, err
    notes = " ".join(json.loads(out).get("notes", []))
    assert "cache magcache (threshold 0.5): the blocks ran in" in notes
