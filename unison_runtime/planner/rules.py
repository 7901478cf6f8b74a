"""The embedded rule planner: the plan from cue words and media kinds, no model, no torch.

It follows the conventions of DESIGN section 6, so its plans match what the Unison planning
LoRA was trained to emit for the same instruction. Deterministic and pure Python (regexes
compiled once at import): a plan takes tens of microseconds, and importing it pulls in
neither torch nor numpy, so ``python -m unison_runtime plan`` answers from a cold start.

The decision, in the order a reader should follow it:

1. :func:`decide_task` - understanding or generation (:func:`read_intent`: the first sentence
   that asks for something decides), then image or video output (:func:`wants_video`), then
   the task from the media kinds and the mask / control / edit / reference cues.
2. :mod:`.rules_meta` - size, length, frame index and edit indices for that task.
3. :class:`RulePlanner` - assembles and validates the :class:`Plan`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..plan import (
    DEFAULT_FPS,
    EDITING_TASKS,
    MediaRef,
    Plan,
    Task,
    assign_roles,
    default_plan,
    understanding_task,
)
from .rules_checks import check_instruction_text, check_plan_media, media_info, shape_from_media
from .rules_cues import Cue
from .rules_meta import (
    asks_for_length,
    asks_for_shape,
    edit_indices,
    frame_cue_gaps,
    has_first_and_last_cues,
    mask_named,
    mentions_frame_position,
    mentions_mask,
    parse_fps,
    parse_frame_index,
    parse_length,
    parse_size,
    quality_tag,
)
from .rules_text import REF_MARK, RuleText, as_rule_text, read_rule_text
from .rules_zh import QUESTION_MARK

if TYPE_CHECKING:
    from ..instruction import Instruction
    from ..media import Medium
    from ..media_probe import MediaInfo

# --------------------------------------------------------------------------- cue words

# A sentence that opens with a wh-word is a question, whatever verbs follow ("How do I draw a cat?").
_WH_START = re.compile(r"^[\W_]*(?:what|what's|whats|how|why|which|who|whom|whose|where|when)\b")
# An inverted yes/no question ("Is this photo real") when no verb asks for anything else; not
# "###m.png### is the mask", where the reference is the subject.
# The auxiliary must be followed by a subject ("Is this...", "Can you..."): "Will Smith eating
# spaghetti" and "Can of soda on a table" are descriptions.
_AUX_START = re.compile(
    "^[^\\w" + REF_MARK + "]*"
    r"(?:is|are|was|were|do|does|did|can|could|would|will|should|shall|has|have|had|may|might|isn't|aren't"
    r"|doesn't|don't|didn't|can't|won't)\s+(?:not\s+)?(?:this|that|these|those|it|there|the|a|an|he|she|they|you"
    r"|i|we|my|your|his|her|its|our|their|any|anyone|anything|someone|something|some|all|both|either|each"
    r"|image|photo|picture|video|" + REF_MARK + ")(?!\\w)"
)
# Generation verbs in their base form only: "AI-generated", "made of", "created by" describe, not ask.
_GENERATION_VERB = Cue(
    r"\b(?:generate|create|make(?!\s+sure\b)|draw|paint|render|produce|animate|design|illustrate|depict"
    r"|visuali[sz]e|synthesi[sz]e|(?:turn|convert|transform)\b(?=[^.!?;]*?\binto\b)"
    r"|(?:show|give|send)\s+(?:me|us)\b(?=[^.!?;]{0,40}?\b(?:image|picture|photo|video|clip|animation"
    r"|illustration|painting|drawing|portrait)s?\b))\b",
    "generate create make draw paint render produce animate design illustrate depict visuali synthesi "
    "turn convert transform show give send",
)
# Verbs that ask for text: these make a sentence a question even without a question mark.
_UNDERSTANDING_VERB = Cue(
    r"\b(?:describe|explain|translate|summari[sz]e|caption|identify|count|classify|recogni[sz]e|analy[sz]e"
    r"|compare|tell\s+(?:me|us)|list|write|answer|read|transcribe|solve|calculate|compute|determine|estimate"
    r"|interpret|evaluate|guess)\b",
    "describe explain translate summari caption identify count classify recogni analy compare tell list "
    "write answer read transcribe solve calculate compute determine estimate interpret evaluate guess",
)
# Edit verbs only count with a medium to edit ("add 3 and 4" is arithmetic, not an edit).
_EDIT_VERB = Cue(
    r"\b(?:replace|change|alter|modify|edit|remove|erase|delete|add|insert|swap|recolou?r|colou?ri[sz]e"
    r"|inpaint|retouch|restore|fix|fill|apply|place|put(?!\s+(?:simply|differently|briefly|another\s+way)\b)|make\s+(?:it|this|that|them|him|her|the|these|those)\b"
    r"|(?:turn|convert|transform)\b(?=[^.!?;]*?\b(?:into|to)\b))\b",
    "replace change alter modify edit remove erase delete add insert swap colo inpaint retouch restore "
    "fix fill apply place put make turn convert transform",
)
# Arithmetic asks for an answer: "add 17 and 25", "multiply 6 by 7", "17 + 25 =".
_ARITHMETIC = Cue(
    r"\b(?:add|subtract|multiply|divide|sum\s+up|sum)\s+-?\d|\d\s*[-+*/×÷^]\s*\d[\d\s.+*/×÷^()-]*=\s*\??\s*$",
    "add subtract multiply divide sum =",
)
# A question after a comma ("put simply, what is this"), or a wish to know ("I want to know how to...").
_WH_CLAUSE = Cue(
    r"(?:^|[,:;]\s*)(?:what|how|why|which|who|where|when)\s+(?:is|are|was|were|do|does|did|can|could|would|will"
    r"|should|kind|type|colou?r|many|much|to)\b|\b(?:want|like|need)\s+to\s+know\b|\bi\s+wonder\b"
    r"|\bhow\s+(?:to|do\s+i|can\s+i|should\s+i)\b",
    "wh how know wonder",
)
_HOW_TO = re.compile(r"\bhow\s+(?:to|do\s+i|can\s+i|should\s+i|would\s+i|do\s+you)\s+$")
# Verbs that can produce text ("generate a caption") and the text they produce.
_TEXT_CAPABLE_VERB = re.compile(r"(?:generate|create|make|produce)$")
_TEXT_PRODUCT = re.compile(
    r"\s+(?:[\w'-]+\s+){0,3}?(?:captions?|descriptions?|summary|summaries|stor(?:y|ies)|poems?|essays?|titles?"
    r"|slogans?|taglines?|lists?|answers?|explanations?|translations?|paragraphs?|sentences?|haikus?|jokes?"
    r"|text|emails?|letters?|reports?|recipes?|questions?|prompts?|code|songs?|lyrics|reviews?|tweets?"
    r"|articles?|plans?)\b"
)
_MULTIPLE_CHOICE = Cue(
    r"\b(?:choices|options)\s*:|\banswer\s+with\b|(?:^|\s)\(?a\)\s.+?\s\(?b\)\s",
    "choices options answer a)",
    flags=re.S,
)

_IMAGE_NOUN = (
    r"image|picture|pic|photo|photograph|illustration|painting|drawing|portrait|artwork|poster|wallpaper"
    r"|selfie|headshot|snapshot|logo|icon|banner|sticker"
)
_VIDEO_NOUN = r"video(?!\s*games?\b)|clip|animation|time-?lapse|footage|gif|vlog"
_OUTPUT_NOUN = re.compile(rf"\b(?:({_IMAGE_NOUN})|({_VIDEO_NOUN}))s?\b")
# A noun after one of these names a medium the user gave ("turn this image into a video").
_INPUT_DETERMINER = re.compile(
    r"\b(?:this|that|these|those|the|given|provided|input|original|source|uploaded|attached|my|above|following)"
    r"\s+(?:[\w-]+\s+)?$"
)
_ANIMATE = Cue(r"\banimate\b", "animate")
# Words only a video has: camera motion, slow motion. They ask for a video
# and, like output nouns, make a bare description a generation request.
_MOTION = Cue(
    r"\bcamera\s+(?:slowly\s+|smoothly\s+|then\s+)?(?:pans|zooms|tilts|moves|tracks|orbits|dollies|follows|rotates"
    r"|pushes|pulls|circles)\b|\bslow[- ]motion\b|\b(?:panning|tracking|dolly|drone)\s+shot\b",
    "camera motion shot",
)
# With a given image, naming it the first/last frame asks for image_to_video.
_FRAME_POSITION = Cue(r"\b(?:first|opening|starting|initial|last|final|ending)\s+frame\b", "frame")
_CONTROL = Cue(
    r"\b(?:skeletons?|openpose|canny|scribbles?|line\s*-?art|depth\s*maps?|edge\s*maps?|pose\s*maps?"
    r"|segmentation\s*maps?|control\s*(?:map|image|video|signal|condition)s?)\b"
    r"|\b(?:this|that|these|those|the|provided|given|following|input|same|my|reference)\s+(?:[\w-]+\s+){0,2}?"
    r"(?:poses?|posture|depth(?!\s+of\s+field)|edges|sketch(?:es)?|outlines?|contours?)\b"
    r"|\b(?:pose|depth|edge|sketch|outline)\s+(?:map|image|information|info|sequence|video|condition|guidance"
    r"|control|keypoints)\b"
    r"|\bfollow(?:s|ing)?\s+(?:[\w-]+\s+){0,3}?(?:maps?|information|info|edges|lines|structure|layout"
    r"|skeleton|poses?|motion|movements?)\b",
    "skeleton pose posture canny scribble line depth edge segmentation control sketch contour follow",
)
_REFERENCE = Cue(
    r"\b(?:identity|identities|headshots?|id\s+photos?|face\s+id|passport\s+photos?|as\s+(?:a\s+|the\s+)?references?"
    r"|reference\s+(?:image|photo|picture|subject|person|face)s?"
    r"|same\s+(?:person|face|character|man|woman|product|subject))\b"
    r"|\b(?:this|that|these|those|given|provided|my|our|same)\s+(?:[\w-]+\s+)?(?:person|people|man|men|woman"
    r"|women|girl|boy|lady|guy|child|kid|baby|face|faces|character|characters|product|products|subject"
    r"|individual|celebrity|model|figure|item|object|toy|dog|cat|pet|logo|mascot)\b",
)


_SUBJECT = (
    r"(?:person|people|man|men|woman|women|girl|boy|lady|guy|child|kid|baby|face|character|product|subject"
    r"|model|figure|dog|cat|pet|toy|item|object|bottle|car|outfit|dress|jacket|shirt|hat|shoes?|bag|logo|mascot)"
)
# "the person in ###a###", "the woman from this photo", "the jacket from ###b###": a subject taken
# out of a given image is a reference, whatever is done with it.
_SUBJECT_FROM_MEDIUM = Cue(
    rf"\b{_SUBJECT}s?\s+(?:(?:in|from|of|shown\s+in|seen\s+in)\s+)(?:the\s+|this\s+|that\s+|my\s+|our\s+|first\s+"
    rf"|second\s+|given\s+|provided\s+)?(?:(?:image|photo|picture|pic|selfie|portrait|reference)s?\b|{REF_MARK})"
    rf"|\bthe\s+(?:[\w-]+\s+){{0,2}}from\s+(?:the\s+|this\s+|my\s+)?(?:(?:image|photo|picture)\s+)?{REF_MARK}",
)
# Putting a given subject into a new scene: "place ###p.png### on a marble table", "put this person
# in a castle". The placed thing is the medium or a subject, not a new object ("put a hat on him").
_PLACE_GIVEN = Cue(
    rf"\b(?:place|put|set|insert|position|drop|bring|take|transport|move)\s+(?:{REF_MARK}|(?:this|that|these|the"
    rf"|my|our|given)\s+(?:[\w-]+\s+)?{_SUBJECT}s?\b|it|him|her|them)\s*(?:{REF_MARK}\s*)?"
    r"(?:in|into|on|onto|inside|at|against|to|under|next\s+to|in\s+front\s+of)\b"
    rf"|(?:{REF_MARK}|\b(?:this|that|the|my|our|given)\s+(?:[\w-]+\s+)?{_SUBJECT}s?)\s*(?:{REF_MARK}\s*)?place\s+into\b",
    "place put set insert position drop bring take transport move",
)
# Edit verbs that change the given medium itself (a second image is then not a reference).
_STRONG_EDIT = Cue(
    r"\b(?:replace|change|alter|modify|edit|remove|erase|delete|swap|recolou?r|colou?ri[sz]e|inpaint|retouch"
    r"|restore|fix|fill)\b",
    "replace change alter modify edit remove erase delete swap colo inpaint retouch restore fix fill",
)
# Both ends of a video from two images: "from ###a### to ###b###", "between ###a### and ###b###".
_FROM_TO = Cue(
    rf"\b(?:from|between)\s+(?:the\s+)?(?:(?:image|photo|picture|frame)\s+)?{REF_MARK}\s*(?:[\w-]+\s+){{0,3}}?"
    rf"(?:to|and|into|until)\s+(?:the\s+)?(?:(?:image|photo|picture|frame)\s+)?{REF_MARK}",
    "from between",
)
# The words of a request for an answer that no sentence form gives away ("caption this").
_NO_WORDS = re.compile(r"[\w\u4e00-\u9fff]")


# --------------------------------------------------------------------------- intent


@dataclass(frozen=True)
class Intent:
    """What the instruction asks, and where the deciding sentence starts.

    ``generate`` / ``edit`` / ``understand``: the lead verb (or '?') of the first sentence that
    asks for something; ``describe``: no sentence asks, but the bare description reads as a
    generation request (an image/video noun, a size or length, prompt-style words).
    """

    kind: Literal["generate", "edit", "understand", "describe"]
    position: int


def _first_generation_verb(sentence: str) -> re.Match[str] | None:
    for match in _GENERATION_VERB.finditer(sentence):
        if not _HOW_TO.search(sentence[max(0, match.start() - 16) : match.start()]):
            return match
    return None


def _asks_for_text(sentence: str, verb: re.Match[str]) -> bool:
    """'generate a caption', 'create a short story': a generation verb whose object is text."""
    if not _TEXT_CAPABLE_VERB.search(verb.group(0)):
        return False
    product = _TEXT_PRODUCT.match(sentence, verb.end())
    if not product:
        return False
    noun = _OUTPUT_NOUN.search(sentence, verb.end(), product.end())
    return noun is None


_LEAD_ORDER = {"edit": 0, "generate": 1, "understand": 2}


def sentence_intent(sentence: str, has_media: bool) -> Literal["generate", "edit", "understand"] | None:
    """What one sentence asks for: the earliest lead verb decides; without one, '?' or 'Is/Does...' asks.

    A Chinese question word (什么, 为什么, 怎么, 多少, 哪, 谁, 是否) asks wherever it stands.
    """
    if _WH_START.match(sentence) or QUESTION_MARK in sentence:
        return "understand"
    found: list[tuple[int, Literal["generate", "edit", "understand"]]] = []
    generation = _first_generation_verb(sentence)
    if generation:
        found.append((generation.start(), "understand" if _asks_for_text(sentence, generation) else "generate"))
    if has_media and (edit := _EDIT_VERB.search(sentence)):
        found.append((edit.start(), "edit"))
    if understanding := _UNDERSTANDING_VERB.search(sentence):
        found.append((understanding.start(), "understand"))
    if not has_media and (sums := _ARITHMETIC.search(sentence)):
        found.append((sums.start(), "understand"))
    if found:
        # On a tie ("turn ... into" is both), edit wins over generate: it names a given medium.
        return min(found, key=lambda item: (item[0], _LEAD_ORDER[item[1]]))[1]
    asks = sentence.rstrip().endswith("?") or _AUX_START.match(sentence) or _WH_CLAUSE.search(sentence)
    return "understand" if asks else None


def read_intent(text: str | RuleText, media_count: int = 0) -> Intent:
    """Understanding or generation for the whole instruction.

    Multiple-choice markers make it a question. Otherwise the first sentence with a lead verb
    or a question form decides. With none, the instruction is a description, and a description
    is a generation request (the most common way prompts are written), unless it has no words
    at all besides its media ("###photo.jpg###" alone asks what is in it).
    """
    rule_text = as_rule_text(text)
    if rule_text.search(_MULTIPLE_CHOICE):
        return Intent("understand", 0)
    for start, sentence in rule_text.sentences:
        kind = sentence_intent(sentence, media_count > 0)
        if kind is not None:
            return Intent(kind, start)
    if media_count and not _NO_WORDS.search(rule_text.text.replace(REF_MARK, "")):
        return Intent("understand", 0)
    if media_count >= 2 and mentions_mask(rule_text):
        return Intent("edit", 0)
    return Intent("describe", 0)


def wants_video(text: str | RuleText, start: int = 0, *, image_given: bool = False) -> bool:
    """Whether a generation request asks for a video (only consulted when no video was given).

    "animate", camera motion, or a given image named as the first/last frame do; otherwise the
    first output noun after ``start`` that names the result, not a given medium ("turn this
    image into a video" -> video); without one, a duration or frame count, or any video noun.
    """
    rule_text = as_rule_text(text)
    t = rule_text.text
    if rule_text.search(_ANIMATE) or rule_text.search(_MOTION) or (image_given and rule_text.search(_FRAME_POSITION)):
        return True
    for noun in _OUTPUT_NOUN.finditer(t, start):
        if _INPUT_DETERMINER.search(t[max(0, noun.start() - 40) : noun.start()]):
            continue
        if t[noun.end() : noun.end() + 3].strip(" :,").startswith(REF_MARK):
            continue  # "an image ###a.png###": the noun introduces a given medium
        return noun.group(2) is not None
    if asks_for_length(rule_text):
        return True
    return any(noun.group(2) for noun in _OUTPUT_NOUN.finditer(t))


# --------------------------------------------------------------------------- task


@dataclass(frozen=True)
class Reading:
    """The task and what else the planner read on the way: mask candidate, frame placement, notes."""

    task: Task
    notes: tuple[str, ...] = ()
    mask: int | None = None
    frame_index: str | None = None


def _mask_candidates(media: Sequence[MediaRef], info: Sequence[MediaInfo | None]) -> list[int]:
    """Media that look like a mask: two-level single-channel images/videos (only with media info)."""
    if len(info) != len(media):
        return []
    return [i for i, m in enumerate(info) if m is not None and m.two_level]


def _frame_placement(rule_text: RuleText, media: Sequence[MediaRef]) -> tuple[str, int]:
    """(frame_index, how many images it places) for image_to_video from the words around each image."""
    images = [i for i, m in enumerate(media) if m.kind == "image"]
    offsets = rule_text.ref_offsets
    if len(images) < 2 or len(offsets) != len(media):
        near = offsets[images[0]] if images and len(offsets) == len(media) else None
        return parse_frame_index(rule_text, near=near), 1
    a, b = images[0], images[1]
    if rule_text.search(_FROM_TO):
        return "first_last", 2
    if has_first_and_last_cues(rule_text):
        # The cheaper way to pair the two images with the two cues wins (nearest words, both ends set).
        first_a, last_a = frame_cue_gaps(rule_text, offsets[a])
        first_b, last_b = frame_cue_gaps(rule_text, offsets[b])
        assert None not in (first_a, last_a, first_b, last_b)
        forward = first_a + last_b  # type: ignore[operator]
        backward = last_a + first_b  # type: ignore[operator]
        return ("first_last" if forward <= backward else "last_first"), 2
    return parse_frame_index(rule_text, near=offsets[a]), 1


def decide(
    text: str | RuleText, media: Sequence[MediaRef], info: Sequence[MediaInfo | None] = ()
) -> Reading:
    """The task for ``text`` and ``media`` (see :func:`detect_task`), with the choices it made."""
    rule_text = as_rule_text(text)
    intent = read_intent(rule_text, len(media))
    if intent.kind == "understand":
        return Reading(understanding_task(media))

    kinds = [m.kind for m in media]
    images = kinds.count("image")
    candidates = _mask_candidates(media, info)
    control = bool(media) and rule_text.search(_CONTROL) is not None
    subject_taken = "image" in kinds and (
        rule_text.search(_REFERENCE) is not None or rule_text.search(_SUBJECT_FROM_MEDIUM) is not None
    )
    placed = "image" in kinds and rule_text.search(_PLACE_GIVEN) is not None
    worded_mask = len(media) >= 2 and (mentions_mask(rule_text) or mask_named(media))
    mask = worded_mask or (len(media) >= 2 and bool(candidates) and len(candidates) < len(media))
    edit_lead = intent.kind == "edit"
    strong_edit = bool(media) and rule_text.search(_STRONG_EDIT) is not None  # only media can be edited
    notes: list[str] = []
    if mask and not worded_mask:
        notes.append("no mask was named, but a two-level single-channel medium was given: it is read as the mask")

    if "video" in kinds:
        if control and not mask:
            return Reading(Task.VIDEO_CONTROLLABLE, tuple(notes))
        if subject_taken and not (mask or edit_lead or strong_edit):
            return Reading(Task.VIDEO_REFERENCE, tuple(notes))
        return Reading(Task.VIDEO_EDITING, tuple(notes))
    if "image" in kinds:
        if not mask and wants_video(rule_text, intent.position, image_given=True):
            if control:
                notes.append(
                    "a video was asked for, but following a pose/depth/edge map over time needs a control "
                    "video; the image was used as an image condition map instead"
                )
                return Reading(Task.IMAGE_CONTROLLABLE, tuple(notes))
            placement, count = _frame_placement(rule_text, media)
            framed = count == 2 or mentions_frame_position(rule_text) or rule_text.search(_ANIMATE) is not None
            if (subject_taken or placed) and not framed:
                return Reading(Task.VIDEO_REFERENCE, tuple(notes))
            if images >= 2 and not framed:
                notes.append(f"{images} images and no first/last frame named: all are used as references")
                return Reading(Task.VIDEO_REFERENCE, tuple(notes))
            return Reading(Task.IMAGE_TO_VIDEO, tuple(notes), frame_index=placement)
        if mask:
            return Reading(Task.IMAGE_EDITING, tuple(notes))
        if control:
            return Reading(Task.IMAGE_CONTROLLABLE, tuple(notes))
        if placed or (subject_taken and not (edit_lead and (images == 1 or strong_edit))):
            if edit_lead or strong_edit:
                notes.append("the given subject is placed into a new picture (image_reference), not edited in place")
            return Reading(Task.IMAGE_REFERENCE, tuple(notes))
        if images >= 2 and not strong_edit:
            notes.append(f"{images} images and no mask: all are used as references for one new picture")
            return Reading(Task.IMAGE_REFERENCE, tuple(notes))
        if edit_lead or rule_text.search(_EDIT_VERB):
            return Reading(Task.IMAGE_EDITING, tuple(notes))
        return Reading(Task.IMAGE_REFERENCE, tuple(notes))
    video = wants_video(rule_text, intent.position)
    if intent.kind == "describe":
        notes.append(
            f"no question was asked, so the description is {'a video' if video else 'an image'} generation request"
        )
    return Reading(Task.TEXT_TO_VIDEO if video else Task.TEXT_TO_IMAGE, tuple(notes))


def decide_task(text: str | RuleText, media: Sequence[MediaRef]) -> tuple[Task, tuple[str, ...]]:
    """The task and any notes explaining a choice the user may not expect (see :func:`detect_task`)."""
    reading = decide(text, media)
    return reading.task, reading.notes


def detect_task(text: str | RuleText, media: Sequence[MediaRef] = ()) -> Task:
    """Which of the 12 tasks ``text`` (the instruction, ``###references###`` included) asks for.

    Understanding needs a question form or a verb that asks for text; anything else is a
    generation request. A given video is edited, drives a controllable video (control cues) or
    lends its subject (reference cues); given images with a video requested make image_to_video
    (one image, or two as first and last frame) unless reference or control cues apply; given
    images for an image are edited (a mask, or an edit verb on one image), follow a condition map
    (control cues) or serve as references (a subject placed in a new scene, several images);
    no media: text_to_image or text_to_video.
    """
    return decide(text, media).task


# --------------------------------------------------------------------------- planner


class RulePlanner:
    """The embedded default planner (DESIGN section 6): no model, no answers, no hidden states.

    ``probe_files``: with an instruction whose references were resolved to files but that carries
    no ``media_info``, read each file's header (Pillow / PyAV) so the media can inform the plan.
    """

    name = "rules"

    def __init__(self, *, probe_files: bool = True) -> None:
        self.probe_files = probe_files

    def plan(self, instruction: Instruction) -> Plan:
        """The validated plan for ``instruction``; a requested value out of range is a PlanError naming it."""
        check_instruction_text(instruction.text)
        rule_text = read_rule_text(instruction.text)
        media = instruction.media
        info = media_info(instruction, probe=self.probe_files)
        reading = decide(rule_text, media, info)
        task, notes = reading.task, list(reading.notes)
        values: dict[str, object] = {}
        frame_count = 1
        if task.is_generation:
            values["width"], values["height"] = parse_size(rule_text)
            values["fixed_size"] = asks_for_shape(rule_text)
            if tag := quality_tag(rule_text):
                notes.append(f"{tag!r} was read as a quality word, not a size: the model makes at most 2048 px a side")
        if task.output == "video":
            fps = parse_fps(rule_text)
            if fps is not None:
                values["fps"] = fps
            values["num_frames"] = parse_length(rule_text, fps=fps or DEFAULT_FPS)
        if task is Task.IMAGE_TO_VIDEO:
            values["frame_index"] = reading.frame_index or "first"
            frame_count = 2 if values["frame_index"] in ("first_last", "last_first") else 1
        if task in EDITING_TASKS:
            mask, source = edit_indices(
                rule_text, media, "image" if task is Task.IMAGE_EDITING else "video",
                candidates=_mask_candidates(media, info),
            )  # fmt: skip
            values["mask_index"], values["source_index"] = mask, source
            if mask is None:
                notes.append("no mask was referenced: the whole frame is editable")
        roles = assign_roles(
            task, media, mask_index=values.get("mask_index"), source_index=values.get("source_index"),
            frame_count=frame_count,
        )  # fmt: skip
        if task.is_generation and info:
            values.update(shape_from_media(rule_text, task, roles, info, notes))
        plan = default_plan(
            task, roles, prompt=instruction.prompt, source="rules", notes=tuple(notes), derive_planner_text=True,
            **values,
        )  # fmt: skip
        return check_plan_media(plan, info)

    def answer(self, instruction: Instruction, media: Sequence[Medium]) -> str | None:
        """No model, no answer: understanding tasks need the Qwen2.5-VL planner."""
        return None

    def hidden_states(self, instruction: Instruction) -> None:
        """No model, no hidden states: stage two runs without the 4 projector tokens."""
        return None
