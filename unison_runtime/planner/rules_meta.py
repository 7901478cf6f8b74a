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
    DEFAULT_FPS,
    DEFAULT_HEIGHT,
    DEFAULT_VIDEO_FRAMES,
    DEFAULT_WIDTH,
    MAX_FPS,
    MAX_FRAMES,
    MAX_SIDE,
    MIN_SIDE,
    SIZE_STEP,
    MediaKind,
    MediaRef,
)
from .rules_cues import Cue
from .rules_text import REF_MARK, RuleText, as_rule_text

# --------------------------------------------------------------------------- numbers

_MAX_DIGITS = 9  # beyond this a number is absurd for any field; don't let int() chew on it
_HALF = Fraction(1, 2)


def _number(text: str) -> Fraction:
    """A parsed number (digits with an optional sign and decimals), exact so rounding is predictable.

    Number words never get here: :mod:`.rules_text` has turned them into digits. Digits are
    bounded before conversion: int() refuses strings of more than 4300 digits with a bare
    ValueError, and no field needs more than 9 digits or 6 decimals anyway.
    """
    if text.startswith("-"):
        return -_number(text[1:])
    whole, _, fraction = text.partition(".")
    if len(whole) > _MAX_DIGITS:
        return Fraction(10**_MAX_DIGITS)
    return Fraction(f"{whole}.{fraction[:6]}") if fraction else Fraction(int(whole))


def _quote(text: str, limit: int = 40) -> str:
    """What the instruction asked for, short enough for an error message."""
    text = text.strip()
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _round_half_up(value: Fraction) -> int:
    """Nearest integer, halves up: Python's round() would send 2.5 to 2 and 3.5 to 4, which surprises users."""
    return int((value + _HALF) // 1)


def round_to_step(value: Fraction | int) -> int:
    """The nearest multiple of 16 (halves up, so 1080 becomes 1088 as in the 1080P class)."""
    if isinstance(value, int):
        return (value + SIZE_STEP // 2) // SIZE_STEP * SIZE_STEP  # the same rounding, without a Fraction
    return _round_half_up(Fraction(value) / SIZE_STEP) * SIZE_STEP


# --------------------------------------------------------------------------- size

# "1280x720", "1280 × 720", "1280*720", "0x0" (a side of two digits, or a zero: "a 3x3 grid" is no size).
_EXPLICIT_SIZE = Cue(r"(?<![\w.\-])(-?\d+)\s*[x×*]\s*(-?\d+)(?![\d]|\.\d)", "x × *", digit=True)
# "640 by 480", "1280 by 720 pixels"; not "12 by 12 inches" or "a 10 by 10 grid".
_EXPLICIT_BY = Cue(
    r"(?<![\w.])(\d{2,})\s+by\s+(\d{2,})(?!\s*(?:-\s*)?(?:inch|inches|in\b|cm|mm|m\b|meters?|metres?|feet|foot|ft"
    r"|yards?|miles?|km|tiles?|grid|squares?|blocks?|cells?|rows?|columns?|units?|boxes)\b)",
    "by",
    digit=True,
)
_WIDTH = Cue(
    r"\bwidth\s*(?:of|is|=|:|to|at|should\s+be)?\s*(-?\d+)(?!\d)"
    r"|(?<![\w.])(-?\d+)\s*(?:px|pixels?)\s*(?:in\s+)?(?:wide|width)\b",
    "wid",
    digit=True,
)
_HEIGHT = Cue(
    r"\bheight\s*(?:of|is|=|:|to|at|should\s+be)?\s*(-?\d+)(?!\d)"
    r"|(?<![\w.])(-?\d+)\s*(?:px|pixels?)\s*(?:in\s+)?(?:tall|high|height)\b",
    "igh tall",
    digit=True,
)
_RESOLUTION_CLASS = Cue(r"(?<![\w.])(360|480|540|720|1080|1440|2160|4320)\s?p\b", "360 480 540 720 1080 1440 2160 4320")
#: class -> (width, height, nominal short side); 1080 is not a multiple of 16, so its class is 1920x1088.
RESOLUTION_CLASSES = {
    "360": (640, 368, 360), "480": (832, 480, 480), "540": (960, 544, 540), "720": (1280, 720, 720),
    "1080": (1920, 1088, 1080), "1440": (2560, 1440, 1440), "2160": (3840, 2160, 2160), "4320": (7680, 4320, 4320),
}  # fmt: skip
# Named resolutions. "4k"/"8k"/"uhd" count as a size only where they name the frame ("in 4K", "a 4k
# video", "4K resolution"); as a bare quality tag ("highly detailed, 8k") they are noted, not applied.
_NAMED_RESOLUTION = Cue(r"(?<![\w.])(full[\s-]?hd|fhd|uhd|qhd|hd|2k|4k|8k)(?![\w])", "hd 2k 4k 8k")
_NAMED_CLASS = {"hd": "720", "full hd": "1080", "full-hd": "1080", "fullhd": "1080", "fhd": "1080",
                "qhd": "1440", "4k": "2160", "uhd": "2160", "8k": "4320"}  # fmt: skip
_TWO_K = (2048, 1152, 1152)
# Names whose frame the model can make count wherever they appear ("..., HD" asks for 1280x720).
_IN_RANGE_NAMES = frozenset({"hd", "full hd", "full-hd", "fullhd", "fhd", "2k"})
_AS_SIZE_BEFORE = re.compile(r"\b(?:in|at|as|to|into|with|native|true|full)\s+$")
_AS_SIZE_AFTER = re.compile(
    r"^\s*(?:resolution|res|video|image|picture|photo|wallpaper|footage|clip|format|size|output|render|frames?"
    r"|film|movie|animation|poster|screen|display|version)\b"
)
_ASPECT = Cue(r"(?<![\w.:])(\d{1,2})\s*:\s*(\d{1,2})(?!\w|[.:]\d)", ":", digit=True)
_ASPECT_WORD = Cue(r"\b(?:aspect|ratio)\b", "aspect ratio")
# Ratios recognised without the word "ratio" next to them; "10:30" (a time) is not among them.
_KNOWN_RATIOS = frozenset(
    {(16, 9), (9, 16), (4, 3), (3, 4), (1, 1), (21, 9), (9, 21), (3, 2), (2, 3), (5, 4), (4, 5), (2, 1), (1, 2)}
)
# Aspect words: widescreen is 16:9; a cinema frame (cinemascope, anamorphic, letterbox, "cinematic
# aspect/format") and ultrawide are 21:9. "cinematic" alone is a style ("cinematic lighting").
_WIDESCREEN = Cue(r"\bwide[\s-]?screen\b", "screen")
_CINEMA_WIDE = Cue(
    r"\bcinema\s*scope\b|\banamorphic\b|\bletter[\s-]?box(?:ed)?\b|\bultra[\s-]?wide\b"
    r"|\bcinematic\s+(?:aspect|ratio|format|widescreen|frame|crop|framing)\b",
    "cinema anamorphic letter ultra",
)
# Orientation words count only where they describe the frame: "vertical video", "in portrait",
# "portrait mode", but not "vertical stripes" or "a portrait of a woman" (an image noun then).
_FRAME_WORDS = (
    r"(?:image|picture|photo|video|clip|format|orientation|aspect|ratio|frame|crop|size|resolution|canvas|"
    r"composition|poster|wallpaper|screen|shot|layout|mode|animation|illustration|painting|shape)s?"
)
_VERTICAL = Cue(
    rf"\bvertical\b(?=\s*(?:[,.;!?)]|$|(?:[\w-]+\s+)?{_FRAME_WORDS}\b))|\bvertically\b"
    rf"|\b(?:in|as)\s+(?:a\s+)?(?:vertical|portrait)\b|\bportrait\b(?!\s+of\b)(?=\s*(?:[,.;!?)]|$|{_FRAME_WORDS}\b))",
    "vertical portrait",
)
_LANDSCAPE = Cue(
    rf"\b(?:horizontal|landscape)\b(?=\s*(?:{_FRAME_WORDS})\b)|\bhorizontally\b|\b(?:in|as)\s+(?:a\s+)?landscape\b(?!\s+of\b)",
    "horizontal landscape",
)
# "square" alone at a clause end counts only after a comma or "a/in/as/is/it" ("Times Square." is a place).
_SQUARE = Cue(
    rf"\bsquare\b(?=\s*(?:[\w-]+\s+)?{_FRAME_WORDS}\b)|\b(?:in|as)\s+(?:a\s+)?square\b"
    r"|(?:^|[,;:(]|\b(?:a|is|be|it|and))\s*square\b(?=\s*(?:[,.;!?)]|$))",
    "square",
)


def _side(name: str, digits: str) -> int:
    """An explicitly requested side, rounded to the nearest multiple of 16; out of range is an error."""
    asked = _number(digits)
    if asked <= 0:
        raise PlanError(name, f"the instruction asks for a {name} of {_quote(digits)} px; a side must be positive "
                        f"({MIN_SIDE} to {MAX_SIDE})", int(asked))
    side = round_to_step(asked)
    if not MIN_SIDE <= side <= MAX_SIDE:
        raise PlanError(
            name,
            f"the instruction asks for a {name} of {_quote(digits)} px (nearest multiple of {SIZE_STEP}: {side}); "
            f"expected {MIN_SIDE} to {MAX_SIDE}",
            int(asked),
        )
    return side


def _aspect_ratio(rule_text: RuleText) -> tuple[int, int] | None:
    has_ratio_word = rule_text.search(_ASPECT_WORD) is not None
    for match in _ASPECT.finditer(rule_text.text):
        a, b = int(match.group(1)), int(match.group(2))
        if a and b and (has_ratio_word or (a, b) in _KNOWN_RATIOS):
            return a, b
        if has_ratio_word and not (a and b):
            raise PlanError("width", f"the aspect ratio {_quote(match.group(0))} has a zero side", 0)
    if rule_text.search(_CINEMA_WIDE):
        return 21, 9
    if rule_text.search(_WIDESCREEN):
        return 16, 9
    return None


def _explicit_size(rule_text: RuleText) -> re.Match[str] | None:
    for match in _EXPLICIT_SIZE.finditer(rule_text.text):
        a, b = match.group(1).lstrip("-"), match.group(2).lstrip("-")
        if max(len(a), len(b)) >= 2 or "0" in (a, b) or match.group(1).startswith("-"):
            return match
    return rule_text.search(_EXPLICIT_BY)


def named_resolution(text: str | RuleText) -> tuple[str, bool] | None:
    """The first named resolution ("hd", "4k", ...) and whether it names the frame (else a quality tag)."""
    return as_rule_text(text).once(_named_resolution)


def quality_tag(text: str | RuleText) -> str | None:
    """A too-large resolution name used as a quality word ("highly detailed, 8k"): not a size request."""
    name = named_resolution(text)
    return name[0] if name and not name[1] and name[0] not in _IN_RANGE_NAMES else None


def _named_resolution(rule_text: RuleText) -> tuple[str, bool] | None:
    match = rule_text.search(_NAMED_RESOLUTION)
    if match is None:
        return None
    t = rule_text.text
    before, after = t[max(0, match.start() - 12) : match.start()], t[match.end() : match.end() + 14]
    as_size = bool(_AS_SIZE_BEFORE.search(before) or _AS_SIZE_AFTER.match(after))
    return match.group(1), as_size


def _resolution(rule_text: RuleText) -> tuple[int, int, int] | None:
    """(width, height, short side) of a resolution class or a named resolution that names the frame."""
    match = rule_text.search(_RESOLUTION_CLASS)
    name = None if match else rule_text.once(_named_resolution)
    if match:
        key = match.group(1)
    elif name and (name[1] or name[0] in _IN_RANGE_NAMES):
        if name[0] == "2k":
            return _TWO_K
        key = _NAMED_CLASS[re.sub(r"[\s-]", " ", name[0]) if "full" in name[0] else name[0]]
    else:
        return None
    width, height, short = RESOLUTION_CLASSES[key]
    if width > MAX_SIDE:
        asked = match.group(0) if match else name[0] if name else key
        raise PlanError(
            "width",
            f"the instruction asks for {_quote(asked)} ({width}x{height}); the model makes at most {MAX_SIDE} px "
            "per side: ask for 2K, 1080P or 720P, or give a size such as 1920x1088",
            width,
        )
    return width, height, short


def parse_size(text: str | RuleText) -> tuple[int, int]:
    """(width, height) the instruction asks for, by the conventions of DESIGN section 6.

    Explicit sizes win and are kept as written (rounded to 16). Otherwise a resolution class
    (480P/720P/1080P, HD, Full HD, 2K) or the default 832x480 gives the short side; an aspect ratio
    (a:b, widescreen, cinemascope) or "square" shapes the frame around that short side;
    "vertical"/"portrait" puts the long side upright. A lone "width of W" or "H pixels tall"
    replaces just that side. Zero, negative or too-large values are a PlanError naming the side.
    """
    rule_text = as_rule_text(text)
    explicit = rule_text.once(_explicit_size)
    if explicit:
        return _side("width", explicit.group(1)), _side("height", explicit.group(2))

    width, height, short = DEFAULT_WIDTH, DEFAULT_HEIGHT, DEFAULT_HEIGHT
    resolution = _resolution(rule_text)
    if resolution:
        width, height, short = resolution
    ratio = rule_text.once(_aspect_ratio)
    if ratio:
        a, b = ratio
        long_side = _side_from_ratio(short, max(a, b), min(a, b), "width" if a >= b else "height")
        width, height = (long_side, round_to_step(short)) if a >= b else (round_to_step(short), long_side)
    elif rule_text.search(_SQUARE):
        width = height = round_to_step(short)
    if rule_text.search(_VERTICAL):
        width, height = min(width, height), max(width, height)
    elif rule_text.search(_LANDSCAPE):
        width, height = max(width, height), min(width, height)

    only_width, only_height = rule_text.search(_WIDTH), rule_text.search(_HEIGHT)
    if only_width:
        width = _side("width", only_width.group(1) or only_width.group(2))
    if only_height:
        height = _side("height", only_height.group(1) or only_height.group(2))
    return width, height


def says_size(text: str | RuleText) -> bool:
    """Whether the instruction states any size, resolution, aspect or orientation (else media may shape it)."""
    rule_text = as_rule_text(text)
    patterns = (_EXPLICIT_BY, _RESOLUTION_CLASS, _WIDTH, _HEIGHT, _VERTICAL, _LANDSCAPE, _SQUARE, _WIDESCREEN,
                _CINEMA_WIDE)
    return (rule_text.once(_explicit_size) is not None or any(rule_text.search(p) for p in patterns)
            or rule_text.once(_aspect_ratio) is not None
            or bool((n := rule_text.once(_named_resolution)) and (n[1] or n[0] in _IN_RANGE_NAMES)))


def _side_from_ratio(short: int, long_part: int, short_part: int, name: str) -> int:
    side = round_to_step(Fraction(short * long_part, short_part))
    if side > MAX_SIDE:
        raise PlanError(
            name,
            f"the aspect ratio {long_part}:{short_part} on a {short} px short side needs {side} px; at most {MAX_SIDE}",
            side,
        )
    return side


# --------------------------------------------------------------------------- length and frame rate

_SIGNED = r"(-?\d+(?:\.\d+)?)"
_SECONDS = Cue(
    rf"(?<![\w.]){_SIGNED}(\s*-?\s*)(seconds?|secs?|s|minutes?|mins?|hours?|hrs?|milliseconds?|ms)\b"
    r"(?!\s*(?:per|/)\s*frame)",
    digit=True,
)
_MS = Fraction(1, 1000)
_UNIT_SECONDS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "min": 60, "mins": 60, "minute": 60,
                 "minutes": 60, "hour": 3600, "hours": 3600, "hr": 3600, "hrs": 3600,
                 "ms": _MS, "millisecond": _MS, "milliseconds": _MS}  # fmt: skip
_FRAMES = Cue(rf"(?<![\w.]){_SIGNED}\s*-?\s*frames?\b(?!\s*(?:per|/|a|each)\s*(?:second|sec|s)\b)", "frame", digit=True)
_FPS = Cue(
    rf"(?<![\w.]){_SIGNED}\s*-?\s*(?:fps|frames?\s*(?:per|/|a|each)\s*(?:second|sec|s)\b|hz\b)"
    rf"|\b(?:frame\s*-?\s*rate|framerate|fps)\s*(?:of|is|=|:|at|to|should\s+be)?\s*{_SIGNED}(?!\w|\.\d)",
    "fps frame hz",
    digit=True,
)
# Words before "80s" that make it a decade ("the 80s", "an 80s look"), not eighty seconds.
_DECADE_BEFORE = re.compile(r"(?:\b(?:the|an|early|late|mid)\s*-?|['’])$")


def frames_for_seconds(seconds: Fraction, fps: int = DEFAULT_FPS) -> int:
    """fps*N + 1 frames for N seconds, on the 4k+1 grid VACE needs.

    At 24 fps, 24*N + 1 = 4*(6N) + 1 is already 4k+1 whenever 6N is whole (any N that is a
    multiple of 1/6 s). Otherwise k = fps*N/4 rounded half up, which moves the length by at most
    2 frames from fps*N + 1.
    """
    return 4 * _round_half_up(Fraction(fps) * seconds / 4) + 1


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


def _seconds_match(rule_text: RuleText) -> re.Match[str] | None:
    text = rule_text.text
    for match in _SECONDS.finditer(text):
        if match.group(3) == "s" and (len(match.group(1).split(".")[0]) > 3 or _is_decade(text, match)):
            continue  # "the 1990s", "80s style": years and decades, not lengths
        return match
    return None


def asks_for_length(text: str | RuleText) -> bool:
    """Whether the instruction states a duration or a frame count (which asks for a video)."""
    rule_text = as_rule_text(text)
    return rule_text.search(_FRAMES) is not None or rule_text.once(_seconds_match) is not None


def asks_for_shape(text: str | RuleText) -> bool:
    """Whether the instruction fixes the frame's shape (a size, a side, an aspect ratio, square, vertical or
    landscape); a resolution class alone only sets the area. Stage two then keeps the plan's size
    instead of following a source's aspect ratio (``Plan.fixed_size``)."""
    rule_text = as_rule_text(text)
    shape_patterns = (_EXPLICIT_BY, _WIDTH, _HEIGHT, _SQUARE, _VERTICAL, _LANDSCAPE)
    return (rule_text.once(_explicit_size) is not None or any(rule_text.search(p) for p in shape_patterns)
            or rule_text.once(_aspect_ratio) is not None)


def parse_fps(text: str | RuleText) -> int | None:
    """The frame rate the instruction asks for ("16 fps", "30 frames per second", "frame rate 24"), or None."""
    match = as_rule_text(text).search(_FPS)
    if match is None:
        return None
    digits = match.group(1) or match.group(2)
    value = _number(digits)
    fps = _round_half_up(value)
    if value <= 0 or not 1 <= fps <= MAX_FPS:
        raise PlanError(
            "fps", f"the instruction asks for {_quote(match.group(0))}; expected a frame rate of 1 to {MAX_FPS}",
            fps,
        )
    return fps


def parse_length(text: str | RuleText, fps: int | None = None) -> int:
    """Number of video frames the instruction asks for: "N frames" wins over a duration; default 81.

    A duration is seconds x fps + 1 made 4k+1, at the instruction's frame rate (``fps``, or
    the one it states, else 24). Zero, negative or too long is a PlanError naming num_frames.
    """
    rule_text = as_rule_text(text)
    rate = fps if fps is not None else (parse_fps(rule_text) or DEFAULT_FPS)
    frames = rule_text.search(_FRAMES)
    seconds = None if frames else rule_text.once(_seconds_match)
    if frames:
        asked, value = frames.group(0), _number(frames.group(1))
        count = frames_for_count(value)
    elif seconds:
        asked = seconds.group(0)
        value = _number(seconds.group(1)) * _UNIT_SECONDS[seconds.group(3)]
        count = frames_for_seconds(value, rate)
    else:
        return DEFAULT_VIDEO_FRAMES
    if value <= 0:
        raise PlanError(
            "num_frames", f"the instruction asks for {_quote(asked)}; a video length must be positive", int(value)
        )
    if not 5 <= count <= MAX_FRAMES:
        raise PlanError(
            "num_frames",
            f"the instruction asks for {_quote(asked)}, which is {count} frames; expected 5 to {MAX_FRAMES} "
            f"(about {4 / rate:.2g} to {(MAX_FRAMES - 1) / rate:.1f} seconds at {rate} fps)",
            count,
        )
    return count


# --------------------------------------------------------------------------- frame index

_FIRST_FRAME = Cue(
    r"\b(?:first|opening|starting|start|initial|beginning|1st)\s+(?:video\s+)?frame\b"
    r"|\b(?:start(?:s|ing)?|begin(?:s|ning)?)\s+(?:from|with|on)\b",
    "frame start begin",
)
_LAST_FRAME = Cue(
    r"\b(?:last|final|ending|end|closing|concluding)\s+(?:video\s+)?frame\b|\bend(?:s|ing)?\s+(?:on|with|in|at)\b",
    "frame end",
)


def _frame_cues(rule_text: RuleText) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The spans of every first-frame cue and of every last-frame cue."""
    t = rule_text.text
    return [m.span() for m in _FIRST_FRAME.finditer(t)], [m.span() for m in _LAST_FRAME.finditer(t)]


def mentions_frame_position(text: str | RuleText) -> bool:
    """Whether the instruction names a first or last frame ("starts with", "final frame", ...)."""
    first, last = as_rule_text(text).once(_frame_cues)
    return bool(first or last)


def has_first_and_last_cues(text: str | RuleText) -> bool:
    """Whether the instruction names both a first and a last frame."""
    first, last = as_rule_text(text).once(_frame_cues)
    return bool(first and last)


def _gap(near: int, span: tuple[int, int]) -> int:
    return near - span[1] if span[1] <= near else span[0] - near


def frame_cue_gaps(text: str | RuleText, near: int) -> tuple[int | None, int | None]:
    """How far the nearest first-frame and last-frame cues are from offset ``near`` (None: no such cue)."""
    first, last = as_rule_text(text).once(_frame_cues)
    return (min(_gap(near, span) for span in first) if first else None), (
        min(_gap(near, span) for span in last) if last else None
    )


def mask_named(media: Sequence[MediaRef]) -> bool:
    """Whether exactly one of two or more media has a file name that says mask."""
    return len(media) >= 2 and sum(1 for m in media if _MASK_NAME.search(PurePath(m.path).stem.lower())) == 1


def parse_frame_index(text: str | RuleText, near: int | None = None) -> str:
    """Where image_to_video puts the image: "first" (the default) or "last".

    With cues for both, the one nearest to offset ``near`` (the image's reference) decides.
    """
    rule_text = as_rule_text(text)
    first, last = rule_text.once(_frame_cues)
    if not last:
        return "first"
    if not first:
        return "last"
    if near is None:
        return "first" if first[0] < last[0] else "last"
    gap_first, gap_last = frame_cue_gaps(rule_text, near)
    return "first" if gap_first <= gap_last else "last"  # type: ignore[operator]


# --------------------------------------------------------------------------- edit indices

# The mask in the user's words: "mask", or the region it marks ("the white area", "the marked region").
_MASK_WORD = Cue(
    r"\bmasks?\b|\bmasked\b|\bmattes?\b|\balpha\s+(?:map|channel|matte)\b|\binpaint(?:ing)?\s+(?:area|region|map)\b"
    r"|\b(?:marked|selected|highlighted|white|painted|indicated|outlined|blank|specified)\s+(?:areas?|regions?"
    r"|parts?|zones?|pixels|spots?|portions?)\b",
    "mask matte alpha inpaint area region part zone pixels spot portion",
)
# File names that say mask: "mask.png", "m_mask.mp4", "area-matte.png", "alpha.png", "seg_mask".
_MASK_NAME = re.compile(r"(?:^|[^a-z])(?:mask|masks|matte|alpha|msk)(?:[^a-z]|$)|mask")
_WORDS = re.compile(r"[\w']+")
# Words that may stand between "mask" and its reference: "a mask ###m###", "###m### is the mask",
# "mask image: ###m###". Anything else ("the mask for ###s###", "###s### and a mask") separates them.
_MASK_FILLERS = frozenset({
    "a", "an", "the", "this", "that", "its", "my", "our", "your", "is", "are", "as", "be", "here", "here's",
    "image", "picture", "photo", "video", "clip", "file", "map", "binary", "given", "provided", "following",
    "corresponding", "below", "above", "called", "named", "see", "use", "using", "area", "areas", "region",
    "regions", "in", "of", "shown", "marked", "white", "selected", "highlighted", "painted", "part", "parts",
})  # fmt: skip


def mentions_mask(text: str | RuleText) -> bool:
    """Whether the word "mask" appears outside the file names."""
    return as_rule_text(text).search(_MASK_WORD) is not None


def mask_index(text: str | RuleText, media: Sequence[MediaRef], candidates: Sequence[int] = ()) -> int | None:
    """Which medium is the mask: one whose file name says "mask", else the reference next to the word "mask",
    else (no word) the one medium that looks like a mask (``candidates``: two-level single-channel media).
    """
    if len(media) < 2:
        return None
    named = [i for i, m in enumerate(media) if _MASK_NAME.search(PurePath(m.path).stem.lower())]
    if len(named) == 1:
        return named[0]
    rule_text = as_rule_text(text)
    offsets = rule_text.ref_offsets
    if not mentions_mask(rule_text) or len(offsets) != len(media):
        # no word to be "next to" (or references not written inline): the media's look decides
        return candidates[0] if len(candidates) == 1 else None
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


def edit_indices(
    text: str | RuleText, media: Sequence[MediaRef], source_kind: MediaKind, candidates: Sequence[int] = ()
) -> tuple[int | None, int]:
    """(mask_index, source_index) for an editing task whose source is of ``source_kind``.

    The source is the first medium of that kind that is not the mask (nor a mask-looking
    medium); when the only such medium was taken for the mask, it is the source instead and
    there is no mask.
    """
    mask = mask_index(text, media, candidates)
    sources = [i for i, m in enumerate(media) if m.kind == source_kind]
    if not sources:
        raise PlanError("source_index", f"an edit needs a {source_kind} to edit; the instruction references none")
    others = [i for i in sources if i != mask]
    if len(others) > 1:
        others = [i for i in others if i not in candidates] or others
    if not others:
        return None, sources[0]
    return mask, others[0]
