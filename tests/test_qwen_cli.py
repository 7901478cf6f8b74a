"""``python -m unison_runtime plan/ask`` with the Qwen2.5-VL planner, end to end on tiny models."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from unison_runtime.__main__ import main
from unison_runtime.errors import PlannerOutputError
from unison_runtime.instruction import parse_instruction
from unison_runtime.media import write_image, write_video
from unison_runtime.planner import qwen
from unison_runtime.planner.qwen import load_planner
from unison_runtime.testing.tiny_qwen import script_tiny_planner

SCRIPT = "<BORES>640,352<EORES><BONF>8<EONF><CFV>"


@pytest.fixture(scope="module")
def scripted(tiny_qwen, tmp_path_factory):
    """A merged planner that emits SCRIPT, shipped with the reference's tie_word_embeddings bug."""
    directory = script_tiny_planner(tiny_qwen.merged_fixed, SCRIPT, tmp_path_factory.mktemp("scripted") / "planner")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    config_path.write_text(json.dumps(config))
    return directory


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_plan_with_a_merged_planner_prints_the_lora_plan(scripted, tmp_path):
    code, text = _run("plan", "--model", str(scripted), "--input-dir", str(tmp_path), "--dtype", "fp32",
                      "A short clip of waves at dusk")  # fmt: skip
    assert code == 0
    plan = json.loads(text)
    assert plan["task"] == "text_to_video"
    assert (plan["width"], plan["height"], plan["num_frames"]) == (640, 352, 9)
    assert plan["source"] == "lora"
    assert plan["planner_text"] == SCRIPT
    assert plan["prompt"] == "A short clip of waves at dusk"


def test_plan_with_base_and_lora_matches_the_python_api(tiny_qwen, tmp_path, monkeypatch):
    monkeypatch.setattr(qwen, "PLAN_MAX_NEW_TOKENS", 12)  # the random LoRA never stops: keep it short
    instruction_text = "Please make an image of a lighthouse 720P"
    code, text = _run("plan", "--model", str(tiny_qwen.base), "--lora", str(tiny_qwen.lora), "--device", "cpu",
                      "--input-dir", str(tmp_path), instruction_text)  # fmt: skip
    planner = load_planner(tiny_qwen.base, lora=tiny_qwen.lora, device="cpu")
    try:
        expected = planner.plan(parse_instruction(instruction_text, roots=[tmp_path])).to_dict()
    except PlannerOutputError:
        assert code == 2
    else:
        assert code == 0
        assert json.loads(text) == expected
        assert expected["source"] == "lora"


def test_ask_answers_seeing_the_referenced_media(tiny_qwen, tmp_path, monkeypatch):
    answerer = script_tiny_planner(tiny_qwen.merged_fixed, "It walks.", tmp_path / "answerer")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    write_image(image, tmp_path / "cat.png")
    write_video(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), tmp_path / "walk.mp4", fps=8)
    seen = []
    original = qwen.QwenPlanner.answer

    def spy(self, instruction, media, **kwargs):
        seen.extend(media)
        return original(self, instruction, media, **kwargs)

    monkeypatch.setattr(qwen.QwenPlanner, "answer", spy)
    code, text = _run("ask", "--model", str(answerer), "--input-dir", str(tmp_path),
                      "What does the cat in ###cat.png### do in ###walk.mp4###?")  # fmt: skip
    assert code == 0
    assert text == "It walks.\n"
    assert [(m.name, m.kind, m.frames.shape) for m in seen] == [
        ("cat.png", "image", (1, 32, 32, 3)),
        ("walk.mp4", "video", (6, 32, 32, 3)),
    ]
    np.testing.assert_array_equal(seen[0].frames[0], image)


def test_cli_refusals_are_one_clear_line(tiny_qwen, tmp_path, capsys):
    code, _ = _run("plan", "--model", str(tiny_qwen.base), "--lora", str(tmp_path / "missing"), "a cat")
    assert code == 2
    assert "LoRA adapter directory" in capsys.readouterr().err

    code, _ = _run("ask", "--model", str(tiny_qwen.base), "--device", "cpu", "--attention", "flash_attention_2", "Why?")
    assert code == 2
    err = capsys.readouterr().err
    assert "flash_attention_2" in err
