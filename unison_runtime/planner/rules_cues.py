"""Cue regexes that skip the texts they cannot match: most instructions hold few of the planner's cues."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

DIGIT = re.compile(r"\d")


class Cue:
    """A cue regex, with what every match of it holds: one of ``words`` (space-separated; if any), and a digit
    if ``digit``.

    Most instructions hold few cues, and looking for a word costs a fraction of a regex scan, so a
    text that lacks them is not scanned at all: the same matches in much less time. That the words
    and digits are really in every match is tested against the regexes (tests/test_rule_cues.py).
    Hashed by identity, so a :class:`~.rules_text.RuleText` can remember what it found for each cue.
    """

    __slots__ = ("digit", "pattern", "words")

    def __init__(self, pattern: str, words: str = "", *, digit: bool = False, flags: int = 0) -> None:
        self.pattern = re.compile(pattern, flags)
        self.words = tuple(words.split())
        self.digit = digit

    def may_match(self, text: str, has_digit: bool | None = None) -> bool:
        """False when ``text`` lacks what every match holds (``has_digit``: known already, else looked for)."""
        for word in self.words:
            if word in text:
                break
        else:
            if self.words:
                return False
        if self.digit:
            return has_digit if has_digit is not None else DIGIT.search(text) is not None
        return True

    def search(self, text: str) -> re.Match[str] | None:
        return self.pattern.search(text) if self.may_match(text) else None

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        return self.pattern.finditer(text) if self.may_match(text) else iter(())

    def sub(self, replace: Callable[[re.Match[str]], str], text: str) -> str:
        return self.pattern.sub(replace, text) if self.may_match(text) else text
