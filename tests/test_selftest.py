"""``python -m unison_runtime selftest``: all 12 tasks pass on tiny models; a failing task makes it fail."""

from __future__ import annotations

import io
import json

import av
import pytest
from PIL import Image

from unison_runtime import selftest
from unison_runtime.__main__ import main
from unison_runtime.plan import Task

SUFFIX = {"text": ".txt", "image": ".png", "video": ".mp4"}


@pytest.mark.slow
def test_selftest_runs_all_12_tasks_and_writes_outputs(tmp_path, capsys):
    out = io.StringIO()
    code = main(["selftest", "--out", str(tmp_path)], out=out)
    report = json.loads(out.getvalue())
    # One progress line per task on stderr (time and output), the inputs kept beside the outputs.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(lines) == 12 and all(" s  " in line and str(tmp_path) in line for line in lines), lines
    assert report["inputs"] == str(tmp_path / "inputs")
    assert {p.name for p in (tmp_path / "inputs").iterdir()} >= {"photo.png", "clip.mp4", "mask.png", "depth.mp4"}
    assert code == 0, report
    assert report["ok"] is True and report["failed"] == []
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8")) == report
    assert sorted(t["task"] for t in report["tasks"]) == sorted(task.value for task in Task)
    for entry in report["tasks"]:
        task = Task(entry["task"])
        assert entry["ok"] and entry["plan"]["task"] == task.value, entry
        path = tmp_path / (task.value + SUFFIX[task.output])
        assert entry["path"] == str(path) and path.is_file()
        if task.output == "text":
            assert path.read_text(encoding="utf-8") == entry["answer"] + "\n"
        elif task.output == "image":
            with Image.open(path) as image:
                assert image.size == (32, 32)
            assert entry["frames"] == [1, 32, 32, 3]
        else:
            with av.open(str(path)) as container:
                assert len(list(container.decode(video=0))) == 5
            assert entry["frames"] == [5, 32, 32, 3] and entry["fps"] == 24
    plans = {t["task"]: t["plan"] for t in report["tasks"]}
    assert plans["image_to_video"]["frame_index"] == "last"
    assert (plans["video_editing"]["mask_index"], plans["video_editing"]["source_index"]) == (1, 0)


@pytest.mark.slow
def test_a_failing_task_makes_the_selftest_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(selftest, "CASES", (
        selftest.SelftestCase("text_to_image", "Create an image of a red fox in the snow, 32x32."),
        selftest.SelftestCase("text_to_video", "Create an image of a cat, 32x32."),  # planned as an image
    ))
    out = io.StringIO()
    code = main(["selftest", "--out", str(tmp_path)], out=out)
    report = json.loads(out.getvalue())
    assert code == 1 and report["ok"] is False and report["failed"] == ["text_to_video"]
    failed = report["tasks"][1]
    assert "the rule planner chose text_to_image, expected text_to_video" in failed["error"]
    assert report["tasks"][0]["ok"] and (tmp_path / "text_to_image.png").is_file()
