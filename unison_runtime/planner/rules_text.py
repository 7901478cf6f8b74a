"""The instruction as the rule planner reads it: lower-cased, media references replaced by one mark.

Cue words must never be read out of file names (``###clips/1920x1080_mask.mp4###`` names no
size and no mask), yet edit indices need to know *where* each reference sat. So every
``###reference###`` becomes a single private-use character, surrounded by spaces, and its
offset is kept. Sentences are split here once, because intent is decided per sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..instruction import REFERENCE_PATTERN

#: Stands for one ``###reference###``; a private-use code point that no cue regex matches (not ``\w``).
REF_MARK = "\ue000"

# A sentence ends at . ! ? ; followed by white space (so "2.5 seconds" stays whole), or at a newline.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


@dataclass(frozen=True)
class RuleText:
    """What the cue regexes scan.

    ``text`` is lower-case with each reference replaced by `` REF_MARK ``; ``ref_offsets[i]`` is
    where the mark of the i-th reference sits; ``sentences`` are ``(start, sentence)`` pairs.
    """

    text: str
    ref_offsets: tuple[int, ...]
    sentences: tuple[tuple[int, str], ...]


def read_rule_text(instruction_text: str) -> RuleText:
    """Lower-case ``instruction_text``, mark its references, split it into sentences."""
    parts: list[str] = []
    offsets: list[int] = []
    length = 0
    pos = 0
    for match in REFERENCE_PATTERN.finditer(instruction_text):
        chunk = instruction_text[pos : match.start()].lower()
        parts.append(chunk)
        length += len(chunk)
        offsets.append(length + 1)
        parts.append(f" {REF_MARK} ")
        length += 3
        pos = match.end()
    parts.append(instruction_text[pos:].lower())
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
