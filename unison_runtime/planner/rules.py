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
    EDITING_TASKS,
    MediaRef,
    Plan,
    Task,
    assign_roles,
    default_plan,
    format_planner_text,
    understanding_task,
)
from .rules_meta import (
    asks_for_length,
    asks_for_shape,
    asks_for_size_or_length,
    edit_indices,
    mentions_mask,
    parse_frame_index,
    parse_length,
    parse_size,
)
from .rules_text import REF_MARK, RuleText, as_rule_text, read_rule_text

if TYPE_CHECKING:
    from ..instruction import Instruction
    from ..media import Medium

# --------------------------------------------------------------------------- cue words

# A sentence that opens with a wh-word is a question, whatever verbs follow ("How do I draw a cat?").
_WH_START = re.compile(r"^[\W_]*(?:what|what's|whats|how|why|which|who|whom|whose|where|when)\b")
# An inverted yes/no question ("Is this photo real") when no verb asks for anything else; not
# "###m.png### is the mask", where the reference is the subject.
_AUX_START = re.compile(
    "^[^\\w" + REF_MARK + "]*"
    r"(?:is|are|was|were|do|does|did|can|could|would|will|should|shall|has|have|had|may|might)\b"
)
# Generation verbs in their base form only: "AI-generated", "made of", "created by" describe, not ask.
_GENERATION_VERB = re.compile(
    r"\b(?:generate|create|make(?!\s+sure\b)|draw|paint|render|produce|animate|design|illustrate|depict"
    r"|visuali[sz]e|synthesi[sz]e|(?:turn|convert|transform)\b(?=[^.!?;]*?\binto\b)"
    r"|(?:show|give|send)\s+(?:me|us)\b(?=[^.!?;]{0,40}?\b(?:image|picture|photo|video|clip|animation"
    r"|illustration|painting|drawing|portrait)s?\b))\b"
)
# Verbs that ask for text: these make a sentence a question even without a question mark.
_UNDERSTANDING_VERB = re.compile(
    r"\b(?:describe|explain|translate|summari[sz]e|caption|identify|count|classify|recogni[sz]e|analy[sz]e"
    r"|compare|tell\s+(?:me|us)|list|write|answer|read|transcribe|solve|calculate|compute|determine|estimate"
    r"|interpret|evaluate|guess)\b"
)
# Edit verbs only count with a medium to edit ("add 3 and 4" is arithmetic, not an edit).
_EDIT_VERB = re.compile(
    r"\b(?:replace|change|alter|modify|edit|remove|erase|delete|add|insert|swap|recolou?r|colou?ri[sz]e"
    r"|inpaint|retouch|restore|fix|fill|apply|place|put(?!\s+(?:simply|differently|briefly|another\s+way)\b)|make\s+(?:it|this|that|them|him|her|the|these|those)\b"
    r"|(?:turn|convert|transform)\b(?=[^.!?;]*?\b(?:into|to)\b))\b"
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
_MULTIPLE_CHOICE = re.compile(r"\b(?:choices|options)\s*:|\banswer\s+with\b|(?:^|\s)\(?a\)\s.+?\s\(?b\)\s", re.S)

_IMAGE_NOUN = (
    r"image|picture|pic|photo|photograph|illustration|painting|drawing|portrait|artwork|poster|wallpaper"
    r"|selfie|headshot|snapshot|logo|icon|banner|sticker"
)
_VIDEO_NOUN = r"video(?!\s*games?\b)|clip|animation|time-?lapse|footage"
_OUTPUT_NOUN = re.compile(rf"\b(?:({_IMAGE_NOUN})|({_VIDEO_NOUN}))s?\b")
# A noun after one of these names a medium the user gave ("turn this image into a video").
_INPUT_DETERMINER = re.compile(
    r"\b(?:this|that|these|those|the|given|provided|input|original|source|uploaded|attached|my|above|following)"
    r"\s+(?:[\w-]+\s+)?$"
)
_ANIMATE = re.compile(r"\banimate\b")
# Words only a video has: camera motion, slow motion. They ask for a video
# and, like output nouns, make a bare description a generation request.
_MOTION = re.compile(
    r"\bcamera\s+(?:slowly\s+|smoothly\s+|then\s+)?(?:pans|zooms|tilts|moves|tracks|orbits|dollies|follows|rotates"
    r"|pushes|pulls|circles)\b|\bslow[- ]motion\b|\b(?:panning|tracking|dolly|drone)\s+shot\b"
)
# With a given image, naming it the first/last frame asks for image_to_video.
_FRAME_POSITION = re.compile(r"\b(?:first|opening|starting|initial|last|final|ending)\s+frame\b")
# The vocabulary of text-to-image prompts ("..., highly detailed, 8k, cinematic lighting"): a
# bare description in this style is a generation request even without an image noun.
_PROMPT_STYLE = re.compile(
    r"\b(?:photorealistic|hyperrealistic|highly\s+detailed|ultra[- ]detailed|intricate\s+details?|[248]k|uhd|hdr"
    r"|cinematic|bokeh|masterpiece|best\s+quality|concept\s+art|digital\s+art|octane\s+render|unreal\s+engine"
    r"|studio\s+lighting|volumetric\s+lighting|trending\s+on\s+artstation|shot\s+on|35\s?mm|8[05]\s?mm"
    r"|wide[- ]angle|close-up|watercolou?r|oil\s+on\s+canvas|pixel\s+art|low\s+poly|isometric|anime\s+style)\b"
)

_CONTROL = re.compile(
    r"\b(?:skeletons?|openpose|canny|scribbles?|line\s*-?art|depth\s*maps?|edge\s*maps?|pose\s*maps?"
    r"|segmentation\s*maps?|control\s*(?:map|image|video|signal|condition)s?)\b"
    r"|\b(?:this|that|these|those|the|provided|given|following|input|same|my|reference)\s+(?:[\w-]+\s+){0,2}?"
    r"(?:poses?|posture|depth(?!\s+of\s+field)|edges|sketch(?:es)?|outlines?|contours?)\b"
    r"|\b(?:pose|depth|edge|sketch|outline)\s+(?:map|image|information|info|sequence|video|condition|guidance"
    r"|control|keypoints)\b"
    r"|\bfollow(?:s|ing)?\s+(?:[\w-]+\s+){0,3}?(?:maps?|information|info|edges|lines|structure|layout"
    r"|skeleton|poses?|motion|movements?)\b"
)
_REFERENCE = re.compile(
    r"\b(?:identity|identities|headshots?|id\s+photos?|face\s+id|passport\s+photos?|as\s+(?:a\s+|the\s+)?references?"
    r"|reference\s+(?:image|photo|picture|subject|person|face)s?"
    r"|same\s+(?:person|face|character|man|woman|product|subject))\b"
    r"|\b(?:this|that|these|those|given|provided|my|our|same)\s+(?:[\w-]+\s+)?(?:person|people|man|men|woman"
    r"|women|girl|boy|lady|guy|child|kid|baby|face|faces|character|characters|product|products|subject"
    r"|individual|celebrity|model|figure|item|object|toy|dog|cat|pet|logo|mascot)\b"
)


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


def sentence_intent(sentence: str, has_media: bool) -> Literal["generate", "edit", "understand"] | None:
    """What one sentence asks for: the earliest lead verb decides; without one, '?' or 'Is/Does...' asks."""
    if _WH_START.match(sentence):
        return "understand"
    found: list[tuple[int, Literal["generate", "edit", "understand"]]] = []
    generation = _first_generation_verb(sentence)
    if generation:
        found.append((generation.start(), "understand" if _asks_for_text(sentence, generation) else "generate"))
    if has_media and (edit := _EDIT_VERB.search(sentence)):
        found.append((edit.start(), "edit"))
    if understanding := _UNDERSTANDING_VERB.search(sentence):
        found.append((understanding.start(), "understand"))
    if found:
        # On a tie ("turn ... into" is both), edit wins over generate: it names a given medium.
        order = {"edit": 0, "generate": 1, "understand": 2}
        return min(found, key=lambda item: (item[0], order[item[1]]))[1]
    return "understand" if sentence.rstrip().endswith("?") or _AUX_START.match(sentence) else None


def read_intent(text: str | RuleText, media_count: int = 0) -> Intent:
    """Understanding or generation for the whole instruction.

    Multiple-choice markers make it a question. Otherwise the first sentence with a lead verb
    or a question mark decides. With none, a bare description that names an image/video noun,
    asks for a size or length, is worded like a text-to-image prompt or describes camera motion,
    or names a mask among two or more media, is a generation request; anything else is a question.
    """
    rule_text = as_rule_text(text)
    if _MULTIPLE_CHOICE.search(rule_text.text):
        return Intent("understand", 0)
    for start, sentence in rule_text.sentences:
        kind = sentence_intent(sentence, media_count > 0)
        if kind is not None:
            return Intent(kind, start)
    t = rule_text.text
    if _OUTPUT_NOUN.search(t) or _MOTION.search(t) or _PROMPT_STYLE.search(t) or asks_for_size_or_length(rule_text):
        return Intent("describe", 0)
    if media_count and _FRAME_POSITION.search(t):
        return Intent("describe", 0)
    if media_count >= 2 and mentions_mask(rule_text):
        return Intent("edit", 0)
    return Intent("understand", 0)


def wants_video(text: str | RuleText, start: int = 0, *, image_given: bool = False) -> bool:
    """Whether a generation request asks for a video (only consulted when no video was given).

    "animate", camera motion, or a given image named as the first/last frame do; otherwise the
    first output noun after ``start`` that names the result, not a given medium ("turn this
    image into a video" -> video); without one, a duration or frame count, or any video noun.
    """
    rule_text = as_rule_text(text)
    t = rule_text.text
    if _ANIMATE.search(t) or _MOTION.search(t) or (image_given and _FRAME_POSITION.search(t)):
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


def decide_task(text: str | RuleText, media: Sequence[MediaRef]) -> tuple[Task, tuple[str, ...]]:
    """The task and any notes explaining a choice the user may not expect (see :func:`detect_task`)."""
    rule_text = as_rule_text(text)
    t = rule_text.text
    intent = read_intent(rule_text, len(media))
    if intent.kind == "understand":
        return understanding_task(media), ()

    kinds = {m.kind for m in media}
    control = bool(media) and _CONTROL.search(t) is not None
    reference = "image" in kinds and _REFERENCE.search(t) is not None
    mask = len(media) >= 2 and mentions_mask(rule_text)
    edit_lead = intent.kind == "edit"

    if "video" in kinds:
        if control:
            return Task.VIDEO_CONTROLLABLE, ()
        if reference and not (mask or edit_lead):
            return Task.VIDEO_REFERENCE, ()
        return Task.VIDEO_EDITING, ()
    if "image" in kinds:
        if wants_video(rule_text, intent.position, image_given=True):
            if control:
                return Task.IMAGE_CONTROLLABLE, (
                    "a video was asked for, but following a pose/depth/edge map over time needs a control "
                    "video; the image was used as an image condition map instead",
                )
            return (Task.VIDEO_REFERENCE if reference else Task.IMAGE_TO_VIDEO), ()
        if mask:
            return Task.IMAGE_EDITING, ()
        if control:
            return Task.IMAGE_CONTROLLABLE, ()
        if edit_lead:
            return Task.IMAGE_EDITING, ()
        if reference or not _EDIT_VERB.search(t):
            return Task.IMAGE_REFERENCE, ()
        return Task.IMAGE_EDITING, ()
    return (Task.TEXT_TO_VIDEO if wants_video(rule_text, intent.position) else Task.TEXT_TO_IMAGE), ()


def detect_task(text: str | RuleText, media: Sequence[MediaRef] = ()) -> Task:
    """Which of the 12 tasks ``text`` (the instruction, ``###references###`` included) asks for.

    Understanding tasks follow the media kinds (video > image > text). Generation: a given
    video is edited, or drives a controllable video when control cues apply; given images
    with a video requested make image_to_video unless reference or control cues apply; given
    images for an image are edited (mask, or an edit verb leads), follow a condition map
    (control cues) or serve as references; no media: text_to_image or text_to_video.
    """
    return decide_task(text, media)[0]


# --------------------------------------------------------------------------- planner


class RulePlanner:
    """The embedded default planner (DESIGN section 6): no model, no answers, no hidden states."""

    name = "rules"

    def plan(self, instruction: Instruction) -> Plan:
        """The validated plan for ``instruction``; a requested value out of range is a PlanError naming it."""
        rule_text = read_rule_text(instruction.text)
        media = instruction.media
        task, notes = decide_task(rule_text, media)
        values: dict[str, object] = {}
        if task.is_generation:
            values["width"], values["height"] = parse_size(rule_text)
            values["fixed_size"] = asks_for_shape(rule_text)
        if task.output == "video":
            values["num_frames"] = parse_length(rule_text)
        if task is Task.IMAGE_TO_VIDEO:
            values["frame_index"] = parse_frame_index(rule_text, near=_first_offset(rule_text, media, "image"))
        if task in EDITING_TASKS:
            mask, source = edit_indices(rule_text, media, "image" if task is Task.IMAGE_EDITING else "video")
            values["mask_index"], values["source_index"] = mask, source
            if mask is None:
                notes += ("no mask was referenced: the whole frame is editable",)
        roles = assign_roles(task, media, mask_index=values.get("mask_index"), source_index=values.get("source_index"))
        plan = default_plan(task, roles, prompt=instruction.prompt, source="rules", notes=notes, **values)
        return plan.with_changes(planner_text=format_planner_text(plan))

    def answer(self, instruction: Instruction, media: Sequence[Medium]) -> str | None:
        """No model, no answer: understanding tasks need the Qwen2.5-VL planner."""
        return None

    def hidden_states(self, instruction: Instruction) -> None:
        """No model, no hidden states: stage two runs without the 4 projector tokens."""
        return None


def _first_offset(rule_text: RuleText, media: Sequence[MediaRef], kind: str) -> int | None:
    if len(rule_text.ref_offsets) != len(media):
        return None
    return next((rule_text.ref_offsets[i] for i, m in enumerate(media) if m.kind == kind), None)
