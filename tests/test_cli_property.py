"""Property: whatever the argv and whatever the bytes of a batch file, the CLI answers cleanly.

``main(argv)`` is driven with random argument lists (commands, flags, numbers including nan and
inf, paths that exist, are missing, are files or sit under files) and random batch-file bytes.
Each run must end with no traceback, an exit code from the documented set, and either a JSON
document on stdout (JSON lines for ``plan --batch``) or exactly one line on stderr. No argv here
can reach a model load: ``--models``/``--model`` point at empty or missing folders.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unison_runtime.__main__ import EXIT_CODES, main

ALLOWED = set(EXIT_CODES)


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli_property")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a model\n")
    (root / "batch.jsonl").write_text('{"id": 1, "prompt": "a cat, 480P"}\n')
    return {"empty": str(root / "empty"), "file": str(root / "file.txt"), "missing": str(root / "missing"),
            "under_file": str(root / "file.txt" / "x"), "batch": str(root / "batch.jsonl"), "root": str(root),
            "proc": "/proc/nowhere/x"}


def _numbers() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["nan", "inf", "-inf", "1e999", "0", "-1", "300", "1001", "2**64", "", "x"]),
                     st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True).map(repr))


def _argv(places: dict[str, str]) -> st.SearchStrategy[list[str]]:
    path = st.sampled_from(sorted(places.values()))
    text = st.one_of(st.text(max_size=40), st.sampled_from(["Create an image of a fox, 64x64", "What is 2+2?",
                                                             "Edit ###file.txt###", "###../x.png###", "[" * 500]))
    flag_value = st.one_of(
        st.tuples(st.sampled_from(["--steps", "--guidance", "--shift", "--seed"]), _numbers()),
        st.tuples(st.sampled_from(["--device", "--text-device"]),
                  st.sampled_from(["cpu", "cuda", "cuda:7", "bogus", "mps", "", "cpu:0", "cuda:-1"])),
        st.tuples(st.sampled_from(["--out", "--models", "--input-dir", "--batch", "--model", "--lora", "--to"]), path),
        st.tuples(st.sampled_from(["--vace-dtype", "--dtype"]), st.sampled_from(["fp32", "fp4", "auto"])),
        st.tuples(st.sampled_from(["--quiet", "--low-memory", "--vae-tiling", "--force", "--dry-run"]), st.just(None)),
    )
    command = st.sampled_from(["plan", "run", "ask", "convert-projector", "selftest", "bogus", "download"])

    @st.composite
    def build(draw) -> list[str]:
        argv = [draw(command)]
        if draw(st.booleans()):
            argv.append(draw(text))
        for flag, value in draw(st.lists(flag_value, max_size=6)):
            argv.append(flag)
            if value is not None:
                argv.append(value)
        if argv[0] == "run":  # never reach a model: the models folder is empty or missing
            argv += ["--models", places["empty"]]
        if argv[0] in ("selftest", "download"):  # would build models / download: only their refusals
            argv += ["--out" if argv[0] == "selftest" else "--to", places["under_file"]]
        if argv[0] == "download":
            argv.append("--dry-run")
        return argv

    return build()


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv, out=out)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _strict(line: str) -> object:
    def refuse(name: str) -> object:
        raise AssertionError(f"{name} in the output is not JSON")

    value = json.loads(line, parse_constant=refuse)
    assert not (isinstance(value, float) and not math.isfinite(value))
    return value


def _check(argv: list[str], code: int, out: str, err: str) -> None:
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    assert code in ALLOWED, (argv, code, err)
    if code == 0 or (code == 1 and out):
        if argv[0] == "download":
            assert out.strip(), argv
        elif argv[0] == "plan" and "--batch" in argv:
            for line in out.splitlines():
                _strict(line)
        else:
            _strict(out)
    else:
        errors = [line for line in err.splitlines() if line.startswith(("error:", "interrupted", "internal error"))]
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], (argv, err)
        assert not errors[0].startswith("internal error"), (argv, err)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_argv_never_ends_in_a_traceback(places, data):
    argv = data.draw(_argv(places))
    argv = [a for a in argv if a not in ("-h", "--help")]
    code, out, err = _run(argv)
    _check(argv, code, out, err)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(content=st.one_of(
    st.binary(max_size=400),
    st.lists(st.one_of(
        st.binary(max_size=60),
        st.sampled_from([b'{"id": NaN, "prompt": "a"}', b'{"id": 1e999, "prompt": "a"}', b"[" * 5000,
                         b'{"id": 7, "prompt": "Create an image of a fox, 64x64"}', b"\xff\xfe", b"{}", b"null",
                         b'{"id": {"a": [1, 2]}, "prompt": "What is 2+2?"}', b'"just a string"']),
        st.builds(lambda i, p: json.dumps({"id": i, "prompt": p}).encode(),
                  st.one_of(st.integers(), st.text(max_size=5), st.none()), st.text(max_size=40)),
    ), max_size=8).map(b"\n".join),
))
def test_random_batch_bytes_give_json_lines(tmp_path_factory, content):
    batch = tmp_path_factory.mktemp("batch") / "prompts.jsonl"
    batch.write_bytes(content)
    argv = ["plan", "--batch", str(batch), "--input-dir", str(batch.parent)]
    code, out, err = _run(argv)
    assert code in (0, 1), (content, err)
    _check(argv, code, out, err)
    lines = [line for line in content.split(b"\n") if line.strip()]
    records = [_strict(line) for line in out.splitlines()]
    assert len(records) == len([line for line in lines if line.decode("utf-8", "replace").strip()])
    assert (code == 1) == any("error" in r for r in records)
    assert Path(batch).read_bytes() == content
