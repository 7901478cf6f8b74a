"""The words a rule-planner cue is gated on are in every match of its regex (rules_text.Cue).

A cue skips the regex scan of a text that lacks its words (and a digit, where every match has one).
A word list that misses a spelling the regex accepts would silently drop that cue, so each cue is
checked against strings Hypothesis builds from the regex itself, and against every instruction of
the case table and the eval set after the planner's normalisation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unison_runtime.planner import rules, rules_meta, rules_zh
from unison_runtime.planner.rules_cues import Cue
from unison_runtime.planner.rules_text import read_rule_text

CUES = {f"{module.__name__.rsplit('.', 1)[1]}.{name}": value for module in (rules, rules_meta)
        for name, value in vars(module).items() if isinstance(value, Cue)}  # fmt: skip
CUES.update({f"rules_zh._NUMBER_RULES[{i}]": cue for i, (cue, _) in enumerate(rules_zh._NUMBER_RULES)})
GATED = sorted(name for name, cue in CUES.items() if cue.words or cue.digit)
DATA = Path(__file__).parent / "data"
TEXTS = [
    json.loads(line)["text"]
    for name in ("planner_cases.jsonl", "planner_eval.jsonl")
    for line in (DATA / name).read_text(encoding="utf-8").splitlines()
]


def test_the_gated_cues_are_found() -> None:
    assert len(GATED) >= 30
    assert {"rules_meta._EXPLICIT_SIZE", "rules_meta._FPS", "rules._GENERATION_VERB"} <= set(CUES)


@pytest.mark.parametrize("name", GATED)
def test_every_string_the_regex_matches_passes_the_gate(name: str) -> None:
    cue = CUES[name]

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(cue.pattern))
    def check(text: str) -> None:
        assert cue.pattern.search(text) is not None
        assert cue.may_match(text), f"{name} matches {text!r}, which has none of {cue.words}"

    check()


@pytest.mark.parametrize("name", GATED)
def test_the_gate_keeps_every_match_in_the_planner_texts(name: str) -> None:
    cue = CUES[name]
    for text in TEXTS:
        rule_text = read_rule_text(text)
        for piece in (text.lower(), rule_text.text, *(sentence for _, sentence in rule_text.sentences)):
            assert _span(cue.search(piece)) == _span(cue.pattern.search(piece)), (name, piece)
        assert _span(rule_text.search(cue)) == _span(cue.pattern.search(rule_text.text)), (name, text)


def _span(match: re.Match[str] | None) -> tuple[int, int] | None:
    return None if match is None else match.span()


def test_a_wrong_word_list_is_caught() -> None:
    """The check above can fail: a cue gated on a word its matches lack is rejected."""
    wrong = Cue(r"\bsquare\b", "sqaure")
    assert wrong.pattern.search("a square frame") is not None
    assert not wrong.may_match("a square frame")
    assert wrong.search("a square frame") is None
