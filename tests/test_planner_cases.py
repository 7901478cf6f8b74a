"""The rule planner against a table of instructions in English and Chinese (tests/data/planner_cases.jsonl).

Each line is an instruction written to one convention of the planner docs (PLANNER.md) with the
whole plan it must give: task, size, frames, fps, frame placement, edit indices and every
medium's role; or the field a refused instruction must name. The expectations were computed from
the conventions (frames = seconds x fps + 1 made 4k+1, sides rounded to 16), not read off the planner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from unison_runtime.errors import InstructionError, PlanError
from unison_runtime.instruction import parse_instruction
from unison_runtime.planner.rules import RulePlanner

CASES_FILE = Path(__file__).parent / "data" / "planner_cases.jsonl"
CASES: list[dict[str, Any]] = [json.loads(line) for line in CASES_FILE.read_text(encoding="utf-8").splitlines()]
PLANNER = RulePlanner()
FIELDS = ("task", "width", "height", "num_frames", "fps", "frame_index", "mask_index", "source_index", "roles")


def test_the_table_is_large_and_bilingual() -> None:
    chinese = [c for c in CASES if any("\u4e00" <= ch <= "\u9fff" for ch in c["text"])]
    assert len(CASES) >= 300 and len(chinese) >= 100
    assert len({c["text"] for c in CASES}) == len(CASES)


def _plan_values(text: str) -> dict[str, Any]:
    plan = PLANNER.plan(parse_instruction(text))
    values = {name: getattr(plan, name) for name in FIELDS if name not in ("task", "roles")}
    return {"task": plan.task.value, **values, "roles": [m.role for m in plan.media]}


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c['tag']}" for i, c in enumerate(CASES)])
def test_planner_case(case: dict[str, Any]) -> None:
    text = case["text"]
    if "error" in case:
        with pytest.raises((PlanError, InstructionError)) as err:
            _plan_values(text)
        field = err.value.field if isinstance(err.value, PlanError) else "instruction"
        assert field == case["error"], str(err.value)
        return
    expected = {name: case[name] for name in FIELDS}
    assert _plan_values(text) == expected, text
