"""Meta-information the rule planner reads from an instruction: size, length, frame index, edit indices.

Each function follows one convention of DESIGN section 6 and works on the instruction with its
``###references###`` masked out (see :mod:`.rules_text`), so a file called ``1920x1080.mp4``
never sets a size. A value the instruction asks for that falls outside what a plan allows is a
:class:`PlanError` naming the field and quoting the request: it is never clamped silently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import PurePath

from ..errors import PlanError
from ..plan import (
    DEFAULT_HEIGHT,
    DEFAULT_VIDEO_FRAMES,
    DEFAULT_WIDTH,
    MAX_FRAMES,
    MAX_SIDE,
    MIN_SIDE,
    SIZE_STEP,
    MediaKind,
    MediaRef,
)
from .rules_text import REF_MARK, RuleText, as_rule_text

# --------------------------------------------------------------------------- numbers

_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40,
}  # fmt: skip
_NUMBER = r"(\d+(?:\.\d+)?|" + "|".join(_NUMBER_WORDS) + r")"
_MAX_DIGITS = 9  # beyond this a number is absurd for any field; don't let int() chew on it


def _number(text: str) -> Fraction:
    """A parsed number (digits, a decimal or a small number word), exact so rounding is predictable.

    Digits are bounded before conversion: int() refuses strings of more than 4300 digits with a
    bare ValueError, and no field needs more than 9 digits or 6 decimals anyway.
    """
    if text in _NUMBER_WORDS:
        return Fraction(_NUMBER_WORDS[text])
    whole, _, fraction = text.partition(".")
    if len(whole) > _MAX_DIGITS:
        return Fraction(10**_MAX_DIGITS)
    return Fraction(f"{whole}.{fraction[:6]}" if fraction else whole)


def _quote(text: str, limit: int = 40) -> str:
    """What the instruction asked for, short enough for an error message."""
    text = text.strip()
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _round_half_up(value: Fraction) -> int:
    """Nearest integer, halves up: Python's round() would send 2.5 to 2 and 3.5 to 4, which surprises users."""
    return int((value + Fraction(1, 2)) // 1)


def round_to_step(value: Fraction | int) -> int:
    """The nearest multiple of 16 (halves up, so 1080 becomes 1088 as in the 1080P class)."""
    return _round_half_up(Fraction(value) / SIZE_STEP) * SIZE_STEP


# --------------------------------------------------------------------------- size

# "1280x720", "1280 × 720", "1280*720", "1280 x 720" (two digits at least: "a 3x3 grid" is no size).
_EXPLICIT_SIZE = re.compile(r"(?<![\w.])(\d{2,})\s*[x×*]\s*(\d{2,})(?![\d]|\.\d)")
# "1280 by 720 pixels": "by" alone is too common ("12 by 12 inch"), so a pixel unit is required.
_EXPLICIT_BY = re.compile(r"(?<![\w.])(\d{2,})\s+by\s+(\d{2,})\s*(?:px|pixels?)\b")
_WIDTH = re.compile(
    r"\bwidth\s*(?:of|is|=|:|to|at)?\s*(\d+)(?!\d)|(?<![\w.])(\d+)\s*(?:px|pixels?)\s*(?:in\s+)?(?:wide|width)\b"
)
_HEIGHT = re.compile(
    r"\bheight\s*(?:of|is|=|:|to|at)?\s*(\d+)(?!\d)"
    r"|(?<![\w.])(\d+)\s*(?:px|pixels?)\s*(?:in\s+)?(?:tall|high|height)\b"
)
_RESOLUTION_CLASS = re.compile(r"(?<![\w.])(480|720|1080)\s?p\b")
#: class -> (width, height, nominal short side); 1080 is not a multiple of 16, so its class is 1920x1088.
RESOLUTION_CLASSES = {"480": (832, 480, 480), "720": (1280, 720, 720), "1080": (1920, 1088, 1080)}
_ASPECT = re.compile(r"(?<![\w.:])(\d{1,2})\s*:\s*(\d{1,2})(?!\w|[.:]\d)")
_ASPECT_WORD = re.compile(r"\b(?:aspect|ratio)\b")
# Ratios recognised without the word "ratio" next to them; "10:30" (a time) is not among them.
_KNOWN_RATIOS = frozenset(
    {(16, 9), (9, 16), (4, 3), (3, 4), (1, 1), (21, 9), (9, 21), (3, 2), (2, 3), (5, 4), (4, 5), (2, 1), (1, 2)}
)
# Orientation words count only where they describe the frame: "vertical video", "in portrait",
# "portrait mode", but not "vertical stripes" or "a portrait of a woman" (an image noun then).
_FRAME_WORDS = (
    r"(?:image|picture|photo|video|clip|format|orientation|aspect|ratio|frame|crop|size|resolution|canvas|"
    r"composition|poster|wallpaper|screen|shot|layout|mode|animation|illustration|painting|shape)s?"
)
_VERTICAL = re.compile(
    rf"\bvertical\b(?=\s*(?:[,.;!?)]|$|(?:[\w-]+\s+)?{_FRAME_WORDS}\b))|\bvertically\b"
    rf"|\b(?:in|as)\s+(?:a\s+)?(?:vertical|portrait)\b|\bportrait\b(?!\s+of\b)(?=\s*(?:[,.;!?)]|$|{_FRAME_WORDS}\b))"
)
_LANDSCAPE = re.compile(
    rf"\b(?:horizontal|landscape)\b(?=\s*(?:{_FRAME_WORDS})\b)|\bhorizontally\b|\b(?:in|as)\s+(?:a\s+)?landscape\b(?!\s+of\b)"
)
# "square" alone at a clause end counts only after a comma or "a/in/as/is/it" ("Times Square." is a place).
_SQUARE = re.compile(
    rf"\bsquare\b(?=\s*(?:[\w-]+\s+)?{_FRAME_WORDS}\b)|\b(?:in|as)\s+(?:a\s+)?square\b"
    r"|(?:^|[,;:(]|\b(?:a|is|be|it|and))\s*square\b(?=\s*(?:[,.;!?)]|$))"
)


def _side(name: str, digits: str) -> int:
    """An explicitly requested side, rounded to the nearest multiple of 16; out of range is an error."""
    asked = _number(digits)
    side = round_to_step(asked)
    if not MIN_SIDE <= side <= MAX_SIDE:
        raise PlanError(
            name,
            f"the instruction asks for a {name} of {_quote(digits)} px (nearest multiple of {SIZE_STEP}: {side}); "
            f"expected {MIN_SIDE} to {MAX_SIDE}",
            int(asked),
        )
    return side


def _aspect_ratio(text: str) -> tuple[int, int] | None:
    has_ratio_word = _ASPECT_WORD.search(text) is not None
    for match in _ASPECT.finditer(text):
        a, b = int(match.group(1)), int(match.group(2))
        if a and b and (has_ratio_word or (a, b) in _KNOWN_RATIOS):
            return a, b
    return None


def parse_size(text: str | RuleText) -> tuple[int, int]:
    """(width, height) the instruction asks for, by the conventions of DESIGN section 6.

    Explicit sizes win and are kept as written (rounded to 16). Otherwise a resolution class
    (480P/720P/1080P) or the default 832x480 gives the short side; an aspect ratio or "square"
    shapes the frame around that short side; "vertical"/"portrait" puts the long side upright.
    A lone "width of W" or "H pixels tall" replaces just that side.
    """
    rule_text = as_rule_text(text)
    t = rule_text.text
    explicit = _EXPLICIT_SIZE.search(t) or _EXPLICIT_BY.search(t)
    if explicit:
        return _side("width", explicit.group(1)), _side("height", explicit.group(2))

    width, height, short = DEFAULT_WIDTH, DEFAULT_HEIGHT, DEFAULT_HEIGHT
    resolution = _RESOLUTION_CLASS.search(t)
    if resolution:
        width, height, short = RESOLUTION_CLASSES[resolution.group(1)]
    ratio = _aspect_ratio(t)
    if ratio:
        a, b = ratio
        long_side = _side_from_ratio(short, max(a, b), min(a, b), "width" if a >= b else "height")
        width, height = (long_side, round_to_step(short)) if a >= b else (round_to_step(short), long_side)
    elif _SQUARE.search(t):
        width = height = round_to_step(short)
    if _VERTICAL.search(t):
        width, height = min(width, height), max(width, height)
    elif _LANDSCAPE.search(t):
        width, height = max(width, height), min(width, height)

    only_width, only_height = _WIDTH.search(t), _HEIGHT.search(t)
    if only_width:
        width = _side("width", only_width.group(1) or only_width.group(2))
    if only_height:
        height = _side("height", only_height.group(1) or only_height.group(2))
    return width, height


def _side_from_ratio(short: int, long_part: int, short_part: int, name: str) -> int:
    side = round_to_step(Fraction(short * long_part, short_part))
    if side > MAX_SIDE:
        raise PlanError(
            name,
            f"the aspect ratio {long_part}:{short_part} on a {short} px short side needs {side} px; at most {MAX_SIDE}",
            side,
        )
    return side


# --------------------------------------------------------------------------- length

_SECONDS = re.compile(rf"(?<![\w.]){_NUMBER}(\s*-?\s*)(seconds?|secs?|s)\b")
_FRAMES = re.compile(rf"(?<![\w.]){_NUMBER}\s*-?\s*frames?\b(?!\s*(?:per|/|a|each)\s*(?:second|sec|s)\b)")
# Words before "80s" that make it a decade ("the 80s", "an 80s look"), not eighty seconds.
_DECADE_BEFORE = re.compile(r"(?:\b(?:the|an|early|late|mid)\s*-?|['’])$")


def frames_for_seconds(seconds: Fraction) -> int:
    """24*N + 1 frames for N seconds, on the 4k+1 grid VACE needs.

    24*N + 1 = 4*(6N) + 1, so it is already 4k+1 whenever 6N is whole (any N that is a
    multiple of 1/6 s: every integer, .5, .25 ...). Otherwise k = 6N rounded half up, which
    moves the length by at most 2 frames (1/12 s) from 24*N + 1.
    """
    return 4 * _round_half_up(6 * seconds) + 1


def frames_for_count(count: Fraction) -> int:
    """"N frames" means N rounded to the nearest multiple of 4 (halves up), + 1: 80 or 81 -> 81, 50 -> 53."""
    return 4 * _round_half_up(count / 4) + 1


def _is_decade(text: str, match: re.Match[str]) -> bool:
    """'the 80s', "'90s", 'an 80s look': a decade, not a duration."""
    return (
        match.group(3) == "s"
        and not match.group(2)
        and match.group(1).isdigit()
        and int(match.group(1)) % 10 == 0
        and _DECADE_BEFORE.search(text[max(0, match.start() - 8) : match.start()].rstrip()) is not None
    )


def _seconds_match(text: str) -> re.Match[str] | None:
    for match in _SECONDS.finditer(text):
        if match.group(3) == "s" and (len(match.group(1).split(".")[0]) > 3 or _is_decade(text, match)):
            continue  # "the 1990s", "80s style": years and decades, not lengths
        return match
    return None


def asks_for_length(text: str | RuleText) -> bool:
    """Whether the instruction states a duration or a frame count (which asks for a video)."""
    t = as_rule_text(text).text
    return _FRAMES.search(t) is not None or _seconds_match(t) is not None


def asks_for_size_or_length(text: str | RuleText) -> bool:
    """Whether the instruction states any size, resolution class, duration or frame count."""
    t = as_rule_text(text).text
    size_patterns = (_EXPLICIT_SIZE, _EXPLICIT_BY, _RESOLUTION_CLASS, _WIDTH, _HEIGHT)
    return any(p.search(t) for p in size_patterns) or asks_for_length(text)


def asks_for_shape(text: str | RuleText) -> bool:
    """Whether the instruction fixes the frame's shape (a size, a side, an aspect ratio, square, vertical or
    landscape); a resolution class alone only sets the area. Stage two then keeps the plan's size
    instead of following a source's aspect ratio (``Plan.fixed_size``)."""
    t = as_rule_text(text).text
    shape_patterns = (_EXPLICIT_SIZE, _EXPLICIT_BY, _WIDTH, _HEIGHT, _SQUARE, _VERTICAL, _LANDSCAPE)
    return any(p.search(t) for p in shape_patterns) or _aspect_ratio(t) is not None


def parse_length(text: str | RuleText) -> int:
    """Number of video frames the instruction asks for: "N frames" wins over "N seconds"; default 81."""
    t = as_rule_text(text).text
    frames = _FRAMES.search(t)
    seconds = None if frames else _seconds_match(t)
    if frames:
        asked, count = frames.group(0), frames_for_count(_number(frames.group(1)))
    elif seconds:
        asked, count = seconds.group(0), frames_for_seconds(_number(seconds.group(1)))
    else:
        return DEFAULT_VIDEO_FRAMES
    if not 5 <= count <= MAX_FRAMES:
        raise PlanError(
            "num_frames",
            f"the instruction asks for {_quote(asked)}, which is {count} frames; expected 5 to {MAX_FRAMES} "
            f"(about 0.2 to {(MAX_FRAMES - 1) / 24:.1f} seconds at 24 fps)",
            count,
        )
    return count


# --------------------------------------------------------------------------- frame index

_FIRST_FRAME = re.compile(
    r"\b(?:first|opening|starting|start|initial|beginning|1st)\s+(?:video\s+)?frame\b"
    r"|\b(?:start(?:s|ing)?|begin(?:s|ning)?)\s+(?:from|with|on)\b"
)
_LAST_FRAME = re.compile(
    r"\b(?:last|final|ending|end|closing|concluding)\s+(?:video\s+)?frame\b|\bend(?:s|ing)?\s+(?:on|with|in|at)\b"
)


def parse_frame_index(text: str | RuleText, near: int | None = None) -> str:
    """Where image_to_video puts the image: "first" (the default) or "last".

    With cues for both, the one nearest to offset ``near`` (the image's reference) decides.
    """
    t = as_rule_text(text).text
    first = [m.span() for m in _FIRST_FRAME.finditer(t)]
    last = [m.span() for m in _LAST_FRAME.finditer(t)]
    if not last:
        return "first"
    if not first:
        return "last"
    if near is None:
        return "first" if first[0] < last[0] else "last"

    def gap(span: tuple[int, int]) -> int:
        return near - span[1] if span[1] <= near else span[0] - near

    return "first" if min(map(gap, first)) <= min(map(gap, last)) else "last"


# --------------------------------------------------------------------------- edit indices

_MASK_WORD = re.compile(r"\bmasks?\b")
_WORDS = re.compile(r"[\w']+")
# Words that may stand between "mask" and its reference: "a mask ###m###", "###m### is the mask",
# "mask image: ###m###". Anything else ("the mask for ###s###", "###s### and a mask") separates them.
_MASK_FILLERS = frozenset({
    "a", "an", "the", "this", "that", "its", "my", "our", "your", "is", "are", "as", "be", "here", "here's",
    "image", "picture", "photo", "video", "clip", "file", "map", "binary", "given", "provided", "following",
    "corresponding", "below", "above", "called", "named", "see", "use", "using",
})  # fmt: skip


def mentions_mask(text: str | RuleText) -> bool:
    """Whether the word "mask" appears outside the file names."""
    return _MASK_WORD.search(as_rule_text(text).text) is not None


def mask_index(text: str | RuleText, media: Sequence[MediaRef]) -> int | None:
    """Which medium is the mask: one whose file name says "mask", else the reference next to the word "mask"."""
    if len(media) < 2:
        return None
    named = [i for i, m in enumerate(media) if "mask" in PurePath(m.path).stem.lower()]
    if len(named) == 1:
        return named[0]
    rule_text = as_rule_text(text)
    offsets = rule_text.ref_offsets
    if len(offsets) != len(media):
        return None  # references were not written inline; there is nothing to be "next to"
    t = rule_text.text
    best: tuple[int, int, int, int] | None = None
    for word in _MASK_WORD.finditer(t):
        for i, offset in enumerate(offsets):
            after = offset > word.start()
            gap = t[word.end() : offset] if after else t[offset + 1 : word.start()]
            if REF_MARK in gap:
                continue
            adjacent = all(w in _MASK_FILLERS for w in _WORDS.findall(gap))
            score = (0 if adjacent else 1, len(gap), 0 if after else 1, i)
            if best is None or score < best:
                best = score
    return None if best is None else best[3]


def edit_indices(text: str | RuleText, media: Sequence[MediaRef], source_kind: MediaKind) -> tuple[int | None, int]:
    """(mask_index, source_index) for an editing task whose source is of ``source_kind``.

    The source is the first medium of that kind that is not the mask; when the only such
    medium was taken for the mask, it is the source instead and there is no mask.
    """
    mask = mask_index(text, media)
    sources = [i for i, m in enumerate(media) if m.kind == source_kind]
    if not sources:
        raise PlanError("source_index", f"an edit needs a {source_kind} to edit; the instruction references none")
    others = [i for i in sources if i != mask]
    if not others:
        return None, sources[0]
    return mask, others[0]
