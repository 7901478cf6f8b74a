"""The instruction as the rule planner reads it: lower-cased, media references replaced by one mark.

Cue words must never be read out of file names (``###clips/1920x1080_mask.mp4###`` names no
size and no mask), yet edit indices need to know *where* each reference sat. So every
``###reference###`` becomes a single private-use character, surrounded by spaces, and its
offset is kept. Sentences are split here once, because intent is decided per sentence.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..instruction import REFERENCE_PATTERN
from .rules_cues import DIGIT, Cue
from .rules_zh import rewrite_chinese

T = TypeVar("T")

#: Stands for one ``###reference###``; a private-use code point that no cue regex matches (not ``\w``).
REF_MARK = "\ue000"

# --------------------------------------------------------------------------- English number words

_ONES = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_ONE = "|".join(_ONES)
_TEN = "|".join(_TENS)
_BELOW_100 = rf"(?:(?:{_TEN})(?:[\s-](?:{_ONE}))?|{_ONE})"
_WORD_NUMBER = rf"(?:(?:{_ONE}|a|one)\s+hundred(?:\s+(?:and\s+)?{_BELOW_100})?|{_BELOW_100})"
_UNIT = r"(?:seconds?|secs?|minutes?|mins?|hours?|hrs?|milliseconds?|frames?|fps)"
# "five seconds", "twenty-five frames", "one and a half minutes", "a minute and a half", "half a second".
_WORDS_AND_HALF = re.compile(rf"\b({_WORD_NUMBER}|\d+)\s+and\s+a\s+half\s*-?\s*({_UNIT})\b")
_UNIT_AND_HALF = re.compile(rf"\b(?:an?|one)\s*-?\s*({_UNIT})\s+and\s+a\s+half\b")
_HALF_A = re.compile(rf"\bhalf\s+(?:of\s+)?(?:an?\s*-?\s*)?({_UNIT})\b")
_QUARTER = re.compile(rf"\b(?:a|one)\s+quarter\s+(?:of\s+)?(?:an?\s+)?({_UNIT})\b")
_WORDS_UNIT = re.compile(rf"\b({_WORD_NUMBER})(\s*-?\s*)({_UNIT})\b")
# "a minute", "an hour"; "a second" only where it is a length ("for a second", "a second long"),
# never "a second image".
# Every match starts with the "a" of "a"/"an": the leading (?=a) spares the seven look-behinds at every other
# position (a tenth of the time, same matches).
_A_UNIT = re.compile(
    r"(?=a)(?:\ban?\s*-?\s*(minute|min|hour|hr)\b"
    r"|(?:(?<=\bfor\s)|(?<=\blasting\s)|(?<=\babout\s)|(?<=\bjust\s)|(?<=\bonly\s)|(?<=\bof\s)|(?<=\bin\s))"
    r"an?\s*-?\s*(second|sec)\b|\ban?\s*-?\s*(second|sec)(?=\s*-?\s*long\b))"
)


def word_number(words: str) -> int:
    """'twenty-five' -> 25, 'one hundred and twenty' -> 120, 'a hundred' -> 100."""
    total = 0
    for word in re.split(r"[\s-]+", words):
        if word == "hundred":
            total = max(total, 1) * 100
        elif word in _TENS:
            total += _TENS[word]
        elif word in _ONES:
            total += _ONES[word]
        elif word in ("a", "one"):
            total += 1
    return total


def _number_text(value: int, half: bool = False) -> str:
    return f"{value}.5" if half else str(value)


#: A piece of every unit word in _UNIT ("sec" in "milliseconds"). Every rewrite below needs a unit and keeps it,
#: so a text without any of these has nothing to rewrite: most instructions skip every regex scan here.
_UNIT_PIECES = ("sec", "min", "hour", "hr", "frame", "fps")


def _half(m: re.Match[str]) -> str:
    return f"{_number_text(int(m[1]) if m[1].isdigit() else word_number(m[1]), True)} {m[2]}"


def rewrite_number_words(text: str) -> str:
    """Number words next to a unit become digits: 'five seconds' -> '5 seconds', 'half a minute' -> '0.5 minute'."""
    for piece in _UNIT_PIECES:
        if piece in text:
            break
    else:
        return text
    if "half" in text:
        text = _WORDS_AND_HALF.sub(_half, text)
        text = _UNIT_AND_HALF.sub(lambda m: f"1.5 {m[1]}", text)
        text = _HALF_A.sub(lambda m: f"0.5 {m[1]}", text)
    if "quarter" in text:
        text = _QUARTER.sub(lambda m: f"0.25 {m[1]}", text)
    text = _WORDS_UNIT.sub(lambda m: f"{word_number(m[1])}{m[2]}{m[3]}", text)
    return _A_UNIT.sub(lambda m: f"1 {m[1] or m[2] or m[3]}", text)


def normalize(chunk: str) -> str:
    """One stretch of instruction text as the cue regexes read it: lower case, Chinese cues in English."""
    return rewrite_number_words(rewrite_chinese(chunk.lower().replace("\u2212", "-")))


# A sentence ends at . ! ? ; followed by white space (so "2.5 seconds" stays whole), or at a newline.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


@dataclass(frozen=True)
class RuleText:
    """What the cue regexes scan.

    ``text`` is lower-case with each reference replaced by `` REF_MARK ``; ``ref_offsets[i]`` is
    where the mark of the i-th reference sits; ``sentences`` are ``(start, sentence)`` pairs;
    ``has_digit``: whether ``text`` holds a digit (cues that need one skip it otherwise). What each
    cue found is kept (:meth:`search`, :meth:`once`): a RuleText is read for one instruction only.
    """

    text: str
    ref_offsets: tuple[int, ...]
    sentences: tuple[tuple[int, str], ...]
    has_digit: bool = field(init=False, repr=False, compare=False)
    _found: dict[object, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "has_digit", DIGIT.search(self.text) is not None)

    def search(self, cue: Cue) -> re.Match[str] | None:
        """``cue``'s first match in ``text``, looked for once per instruction: several conventions ask about
        the same cue (the size, whether a shape is fixed, whether media may shape the frame all look for
        "1280x720")."""
        found = self._found
        if cue not in found:
            found[cue] = cue.pattern.search(self.text) if cue.may_match(self.text, self.has_digit) else None
        return found[cue]  # type: ignore[return-value]

    def once(self, read: Callable[[RuleText], T]) -> T:
        """``read(self)``, computed once per instruction (a reading that raises is not kept, and raises again)."""
        found = self._found
        if read not in found:
            found[read] = read(self)
        return found[read]  # type: ignore[return-value]


def read_rule_text(instruction_text: str) -> RuleText:
    """Lower-case ``instruction_text``, mark its references, split it into sentences."""
    parts: list[str] = []
    offsets: list[int] = []
    length = 0
    pos = 0
    for match in REFERENCE_PATTERN.finditer(instruction_text):
        chunk = normalize(instruction_text[pos : match.start()])
        parts.append(chunk)
        length += len(chunk)
        offsets.append(length + 1)
        parts.append(f" {REF_MARK} ")
        length += 3
        pos = match.end()
    parts.append(normalize(instruction_text[pos:]))
    text = "".join(parts)

    sentences: list[tuple[int, str]] = []
    start = 0
    for end in _SENTENCE_END.finditer(text):
        if end.start() > start:
            sentences.append((start, text[start : end.start()]))
        start = end.end()
    if start < len(text):
        sentences.append((start, text[start:]))
    return RuleText(text=text, ref_offsets=tuple(offsets), sentences=tuple(sentences))


def as_rule_text(text: str | RuleText) -> RuleText:
    """Accept either the raw instruction or an already-read :class:`RuleText`."""
    return text if isinstance(text, RuleText) else read_rule_text(text)
