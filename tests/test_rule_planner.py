"""The embedded rule planner follows every convention of DESIGN section 6, for all 12 tasks."""

from __future__ import annotations

import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal

import pytest

from unison_runtime.errors import PlanError
from unison_runtime.instruction import parse_instruction
from unison_runtime.plan import Plan, Task, format_planner_text, parse_planner_text
from unison_runtime.planner.base import Planner
from unison_runtime.planner.rules import RulePlanner, detect_task
from unison_runtime.planner.rules_meta import (
    edit_indices,
    frames_for_count,
    frames_for_seconds,
    parse_frame_index,
    parse_length,
    parse_size,
    round_to_step,
)

PLANNER = RulePlanner()


def plan(text: str) -> Plan:
    return PLANNER.plan(parse_instruction(text))


# --------------------------------------------------------------------------- the required examples

LION = (
    "Please create a video with a width of 768 pixels and a height of 480 pixels, "
    "that is 2 seconds long, of a lion walking around in its habitat."
)
TEA_PARTY = (
    "I have an image ###a.png### and a mask ###b.png###. "
    "Apply the mask to the source image and alter the content to show them having tea party."
)


def test_lion_example_is_a_768x480_two_second_text_to_video() -> None:
    p = plan(LION)
    assert (p.task, p.width, p.height, p.num_frames) == (Task.TEXT_TO_VIDEO, 768, 480, 49)
    assert p.planner_text == "<BORES>768,480<EORES><BONF>48<EONF><CFV>"
    assert p.source == "rules"
    assert p.prompt == LION


def test_tea_party_example_is_image_editing_with_the_mask_second() -> None:
    p = plan(TEA_PARTY)
    assert p.task is Task.IMAGE_EDITING
    assert (p.mask_index, p.source_index) == (1, 0)
    assert [(m.path, m.role) for m in p.media] == [("a.png", "source"), ("b.png", "mask")]
    assert p.num_frames == 1
    assert p.planner_text == "<BORES>832,480<EORES><BOEDIT>1,0<EOEDIT><CFI>"
    assert "###" not in p.prompt and "tea party" in p.prompt


# --------------------------------------------------------------------------- all 12 tasks, several phrasings

PHRASINGS: dict[Task, list[str]] = {
    Task.TEXT_UNDERSTANDING: [
        "There are 100 books in a library. On Monday, 40 books are borrowed. On Tuesday, 20 books are "
        "returned. How many books are now in the library?",
        "What is the capital of Australia?",
        "Explain the difference between a comet and an asteroid.",
        "Translate 'good morning, how are you' into French.",
        "Summarize the plot of Hamlet in two sentences.",
        "Which planet is the largest? A) Mars B) Jupiter C) Venus",
        "How do I draw a realistic portrait?",
        "Write a short poem about autumn leaves.",
        "Generate a caption for my sister's birthday card.",
        "Please explain how to make a sourdough starter.",
        "Is a tomato a fruit or a vegetable",
        "What is 4096x4096 in megapixels?",
        "Add 17 and 25.",
    ],
    Task.IMAGE_UNDERSTANDING: [
        "###cat.png### What breed is this cat?",
        "Describe this picture ###beach.jpg### in detail.",
        "###a.png### ###b.jpeg### Compare these two photos and tell me which one was taken at night.",
        "###./assets/image_understanding.jpg### What is the dark sauce in the bowl? Choices: A) tomato sauce "
        "B) bbq sauce C) salsa D) gravy Answer with the option's letter from the given choices directly.",
        "Is the image ###x.webp### AI-generated?",
        "###chart.png### Summarize the trend shown in this chart.",
        "###sign.bmp### Read the text on the sign.",
        "Can you tell me what is happening in ###scene.png###?",
        "###photo.jpg###",
    ],
    Task.VIDEO_UNDERSTANDING: [
        "###clip.mp4### What is the man doing in this video?",
        "Summarize the video ###lecture.mov###.",
        "###a.png### ###b.mp4### Does the person in the image appear in the video?",
        "Describe what happens at the end of ###match.webm###",
        "###traffic.avi### How many cars pass by?",
        "Count the birds in ###flock.mkv###.",
    ],
    Task.TEXT_TO_IMAGE: [
        "Create an 480P image of a clownfish swims among the tentacles of a sea anemone, showcasing its "
        "vibrant orange and white stripes.",
        "Draw a cat wearing a tiny wizard hat.",
        "Generate a picture of a snowy mountain village at dusk.",
        "A watercolor painting of a lighthouse on a stormy coast.",
        "Could you make an illustration of a dragon reading a book?",
        "Paint a sunflower field in the style of Van Gogh.",
        "Show me a photo of a red vintage car parked by the sea.",
        "Design a poster for a video game convention.",
        "Please create an image of a movie theater lobby in the 1990s.",
    ],
    Task.TEXT_TO_VIDEO: [
        LION,
        "Generate a video of waves crashing on a rocky shore.",
        "Make a 5 second clip of a hummingbird drinking nectar.",
        "Animate a paper boat sailing down a rainy street.",
        "A timelapse of clouds rolling over a mountain ridge.",
        "Create a 720P video of a cat chasing a laser pointer, 3 seconds long.",
        "Produce a vertical clip of fireworks over a city.",
        "Please create 49 frames of a spinning top.",
        "Could you generate an animation of a bouncing ball?",
        "Turn the story of a seed growing into a tree into a short video.",
    ],
    Task.IMAGE_EDITING: [
        TEA_PARTY,
        "Replace the sky in ###photo.png### with a starry night.",
        "###room.jpg### Remove the chair next to the window.",
        "Use ###m.png### as the mask for ###s.png### and add a vase of flowers there.",
        "Change the color of the car in ###car.png### to blue.",
        "###s.png### is the source and ###m.png### is the mask; fill the masked area with a wooden table.",
        "Make it snowy: ###street.png###",
        "Turn the dog in ###dog.jpg### into a cat.",
        "With ###area_mask.png### as mask, edit ###photo.jpg### so the man wears sunglasses.",
    ],
    Task.IMAGE_CONTROLLABLE: [
        "###pose.png### Following this pose, generate an image of a ballerina on stage.",
        "Generate a picture of a modern house using the depth map ###depth.png###.",
        "###edges.png### Create a photorealistic image of a sports car following the canny edges.",
        "Turn this sketch ###sketch.png### into a detailed oil painting.",
        "Based on the skeleton in ###skel.jpg###, draw a knight in armor.",
        "###scribble.png### Render a fantasy castle from my scribble.",
    ],
    Task.IMAGE_REFERENCE: [
        "###./assets/image_ref.png### Please generate an ID photo for this woman, depicting her working in front "
        "of a computer in her room. The scene should include books scattered nearby, with a very warm layout "
        "featuring wooden walls and a warm-toned desk lamp.",
        "###me.jpg### Generate a picture of this person as an astronaut on the moon.",
        "Create a professional headshot from ###selfie.png###.",
        "Use ###product.png### as a reference and make an advertisement image of it on a marble countertop.",
        "###dog.jpg### Paint my dog in the style of a Renaissance portrait.",
        "Keep the identity of the woman in ###face.png### and generate a photo of her hiking.",
        "###hero.png### Draw this character riding a dragon.",
    ],
    Task.IMAGE_TO_VIDEO: [
        "Based on the provided last frame ###./assets/video_i2v.jpg###, generate a video that showcases a "
        "magnificent natural landscape. The camera remains stationary, capturing the rolling mountains and vast sky.",
        "Animate this photo ###lake.jpg###.",
        "###street.png### Turn this image into a 4 second video of cars driving by.",
        "Generate a video that starts from ###sunrise.jpg### and shows the sun rising over the hills.",
        "Create a clip that ends with ###finale.png###, with petals falling.",
        "Using ###frame.webp### as the opening frame, make a 3 second clip of a rocket launch.",
        "Make a video where ###ending.png### is the final frame.",
    ],
    Task.VIDEO_REFERENCE: [
        "Based on the provided face ID ###./assets/video_ref.png###, generate a video featuring a close-up, "
        "eye-level shot of a foreign man. He is wearing a black outer coat over a black and red striped sweater.",
        "###woman.png### Generate a video of this woman walking through a market.",
        "Create a 2 second clip of the bottle ###bottle.png### rotating on a turntable, use it as reference.",
        "Make an animation featuring the same character as ###hero.png### flying over mountains.",
        "###cat.jpg### Produce a clip of my cat chasing a butterfly.",
    ],
    Task.VIDEO_EDITING: [
        "Here is the mask <VIDPAD>. Make the bird in this video ###./assets/video_edit_source.mp4### appear "
        "cleaner and neater, presenting it in white.",
        "Here is the mask ###m.mp4###. Make the bird in this video ###v.mp4### appear cleaner and neater.",
        "Replace the car in ###traffic.mp4### with a red bus.",
        "###clip.mov### Change the season in this video to winter.",
        "Remove the watermark from ###ad.webm### using the mask ###wm_area.mp4###.",
        "###v.mp4### ###face.png### Replace the person in the video with this person.",
    ],
    Task.VIDEO_CONTROLLABLE: [
        "###./assets/video_ctrl.mp4### Following the provided pose information, please create a video showing a "
        "construction worker in workwear and a safety helmet diligently working at a construction site.",
        "###depth.mp4### Generate a video of a forest path following the depth map.",
        "Using the pose sequence in ###dance.mp4###, create a video of a robot dancing.",
        "###edges.avi### Render a video of a neon city following these edges.",
        "Make a video of a tiger walking that follows the motion of the skeleton ###skel.mkv###.",
    ],
}
CASES = [(task, text) for task, texts in PHRASINGS.items() for text in texts]


def test_every_task_has_several_phrasings() -> None:
    assert set(PHRASINGS) == set(Task)
    assert all(len(texts) >= 5 for texts in PHRASINGS.values())


@pytest.mark.parametrize(("task", "text"), CASES, ids=[f"{t.value}-{i}" for i, (t, _) in enumerate(CASES)])
def test_task_is_detected(task: Task, text: str) -> None:
    p = plan(text)
    assert p.task is task, text
    assert detect_task(text, parse_instruction(text).media) is task


@pytest.mark.parametrize(("task", "text"), CASES, ids=[f"{t.value}-{i}" for i, (t, _) in enumerate(CASES)])
def test_plan_is_consistent(task: Task, text: str) -> None:
    """Source, prompt, frames by output, planner text that reads back to the same plan."""
    instruction = parse_instruction(text)
    p = PLANNER.plan(instruction)
    assert p.source == "rules"
    assert p.prompt == instruction.prompt
    assert p.answer is None
    assert p.planner_text == format_planner_text(p)
    if p.output == "video":
        assert (p.num_frames - 1) % 4 == 0
    else:
        assert p.num_frames == 1
    if p.output == "text":
        assert (p.width, p.height, p.planner_text) == (832, 480, "")
    back = parse_planner_text(p.planner_text, instruction.media, prompt=p.prompt, source="rules")
    assert back == p  # notes are not part of plan equality
    assert Plan.from_dict(p.to_dict()) == p


# --------------------------------------------------------------------------- roles by task


@pytest.mark.parametrize(
    ("text", "roles"),
    [
        ("###pose.png### Following this pose, generate an image of a dancer.", ["control"]),
        ("###a.png### ###b.png### Generate a picture of this man and this dog together.", ["reference", "reference"]),
        ("Animate ###a.png### and make it look like ###b.png###.", ["frame", "context"]),
        ("###v.mp4### Generate a video of a forest following the depth map.", ["control"]),
        ("###m.mp4### is the mask. Remove the boat from ###v.mp4###.", ["mask", "source"]),
        ("###woman.png### Generate a video of this woman dancing.", ["reference"]),
    ],
)
def test_media_roles_follow_the_task(text: str, roles: list[str]) -> None:
    assert [m.role for m in plan(text).media] == roles


# --------------------------------------------------------------------------- size


def test_round_to_step_is_nearest_multiple_of_16_halves_up() -> None:
    for value in range(0, 3000):
        expected = int(Decimal(value / 16).quantize(Decimal(1), rounding=ROUND_HALF_UP)) * 16
        assert round_to_step(value) == expected
        assert abs(round_to_step(value) - value) <= 8


@pytest.mark.parametrize(
    ("phrase", "size"),
    [
        ("1024x576", (1024, 576)),
        ("1280×720", (1280, 720)),
        ("640*480", (640, 480)),
        ("768 x 432", (768, 432)),
        ("1024 X 1024", (1024, 1024)),
        ("1280 by 720 pixels", (1280, 720)),
        ("with a width of 768 pixels and a height of 480 pixels", (768, 480)),
        ("1000 pixels wide and 500 pixels tall", (1008, 496)),
        ("1000x500", (1008, 496)),
        ("width: 1000, height: 600", (1008, 608)),
        ("a width of 1024 px", (1024, 480)),
        ("in 480P", (832, 480)),
        ("in 720P", (1280, 720)),
        ("in 1080p", (1920, 1088)),
        ("as a vertical video", (480, 832)),
        ("in 720P, vertical format", (720, 1280)),
        ("in portrait orientation", (480, 832)),
        ("in portrait mode at 1080P", (1088, 1920)),
        ("a portrait of an old fisherman", (832, 480)),
        ("in landscape format, 9:16", (848, 480)),
        ("as a square image", (480, 480)),
        ("square, 720P", (720, 720)),
        ("16:9", (848, 480)),
        ("9:16", (480, 848)),
        ("aspect ratio 4:3", (640, 480)),
        ("with an aspect ratio of 2:1", (960, 480)),
        ("aspect ratio 7:5", (672, 480)),
        ("720P 4:3", (960, 720)),
        ("1080P 16:9", (1920, 1088)),
        ("1:1", (480, 480)),
        ("16:9 but vertical", (480, 848)),
        ("at 10:30 in the morning", (832, 480)),
        ("on a 3x3 grid", (832, 480)),
        ("in Times Square", (832, 480)),
        ("with vertical stripes", (832, 480)),
        ("highly detailed, 4k", (832, 480)),
        ("", (832, 480)),
    ],
)
def test_size_conventions(phrase: str, size: tuple[int, int]) -> None:
    text = f"Generate a picture of a fox, {phrase}."
    assert parse_size(text) == size
    p = plan(text)
    assert (p.width, p.height) == size


def test_file_names_never_set_a_size() -> None:
    p = plan("Animate ###renders/1920x1080_720p.png### into a video.")
    assert (p.task, p.width, p.height) == (Task.IMAGE_TO_VIDEO, 832, 480)


@pytest.mark.parametrize(
    ("phrase", "field"),
    [
        ("4096x2160", "width"),
        ("1024x3000", "height"),
        ("with a height of 3000 pixels", "height"),
        ("with a width of 5 pixels", "width"),
        ("99999999999999 pixels wide", "width"),
        ("1080P at 21:9", "width"),
    ],
)
def test_size_out_of_range_is_a_plan_error_naming_the_field(phrase: str, field: str) -> None:
    with pytest.raises(PlanError) as err:
        plan(f"Generate a video of a ship {phrase}.")
    assert err.value.field == field
    assert field in str(err.value) and "2048" in str(err.value)


def test_understanding_keeps_default_size_whatever_numbers_it_mentions() -> None:
    p = plan("What is 4096x4096 in megapixels? And how long is 60 seconds in frames at 24 fps?")
    assert (p.task, p.width, p.height, p.num_frames) == (Task.TEXT_UNDERSTANDING, 832, 480, 1)


# --------------------------------------------------------------------------- length


def _nearest_4k_plus_1(target: Decimal) -> int:
    """Independent: the 4k+1 value nearest to ``target`` (ties upwards), by search."""
    candidates = [4 * k + 1 for k in range(0, 400)]
    return min(candidates, key=lambda c: (abs(Decimal(c) - target), -c))


@pytest.mark.parametrize(
    ("phrase", "frames"),
    [
        ("2 seconds long", 49),
        ("lasting 2.5 seconds", 61),
        ("3 secs", 73),
        ("4s long", 97),
        ("a 10s", 241),
        ("1.1 seconds", 29),
        ("0.25 seconds", 9),
        ("five-second", 121),
        ("ten seconds long", 241),
        ("1 second", 25),
        ("81 frames", 81),
        ("80 frames", 81),
        ("with 49-frame length", 49),
        ("50 frames", 53),
        ("two frames", 5),
        ("2 seconds long with 33 frames", 33),
        ("at 24 frames per second", 81),
        ("in the style of the 80s", 81),
        ("with an 80s look", 81),
        ("set in the 1990s", 81),
        ("", 81),
    ],
)
def test_length_conventions(phrase: str, frames: int) -> None:
    text = f"Generate a video of a lighthouse {phrase}."
    assert parse_length(text) == frames
    assert plan(text).num_frames == frames


@pytest.mark.parametrize("tenths", range(1, 200))
def test_seconds_give_the_4k_plus_1_nearest_to_24n_plus_1(tenths: int) -> None:
    seconds = Decimal(tenths) / 10
    frames = parse_length(f"Make a {seconds} second clip of rain.")
    assert (frames - 1) % 4 == 0
    assert frames == _nearest_4k_plus_1(24 * seconds + 1)
    assert abs(frames - (24 * seconds + 1)) <= 2


def test_whole_and_sixth_seconds_are_exactly_24n_plus_1() -> None:
    from fractions import Fraction

    for n in range(1, 43):
        assert frames_for_seconds(Fraction(n)) == 24 * n + 1
        assert frames_for_seconds(Fraction(n, 6)) == 4 * n + 1


def test_frame_counts_round_to_a_multiple_of_4_plus_1() -> None:
    from fractions import Fraction

    for n in range(2, 1000):
        expected = 4 * int(Decimal(n / 4).quantize(Decimal(1), rounding=ROUND_HALF_UP)) + 1
        assert frames_for_count(Fraction(n)) == expected
        assert parse_length(f"Generate a video with {n} frames.") == expected


def test_a_long_decimal_is_read_to_six_places() -> None:
    assert parse_length("Generate a video of a comet, 1." + "9" * 5000 + " seconds.") == 49  # 6 * 1.999999 -> 12


@pytest.mark.parametrize(
    ("phrase", "field"),
    [("9" * 5000 + " frames", "num_frames"), ("9" * 5000 + "x480", "width"), ("a height of " + "9" * 5000, "height")],
)
def test_absurdly_long_numbers_are_clean_errors_with_short_messages(phrase: str, field: str) -> None:
    with pytest.raises(PlanError) as err:
        plan(f"Generate a video of a comet, {phrase}.")
    assert err.value.field == field and len(str(err.value)) < 300


@pytest.mark.parametrize("phrase", ["60 seconds long", "0 seconds long", "2000 frames", "one frame"])
def test_length_out_of_range_is_a_plan_error_naming_num_frames(phrase: str) -> None:
    with pytest.raises(PlanError) as err:
        plan(f"Generate a video of a waterfall, {phrase}.")
    assert err.value.field == "num_frames"
    assert phrase.split()[0].replace("one", "1") in str(err.value)


def test_image_tasks_ignore_durations() -> None:
    p = plan("Generate a picture of a clock that reads 10 seconds to midnight.")
    assert (p.task, p.num_frames) == (Task.TEXT_TO_IMAGE, 1)


# --------------------------------------------------------------------------- frame index


@pytest.mark.parametrize(
    ("phrase", "index"),
    [
        ("Use ###a.png### as the first frame and generate a video of a storm.", "first"),
        ("Generate a video with ###a.png### as the opening frame.", "first"),
        ("###a.png### is the starting frame of a video of a rose blooming.", "first"),
        ("Generate a video starting from ###a.png###.", "first"),
        ("Generate a video where ###a.png### is the last frame.", "last"),
        ("###a.png### should be the final frame of a clip of a collapsing tower.", "last"),
        ("Make a video with ###a.png### as the ending frame.", "last"),
        ("Create a video of a car that ends on ###a.png###.", "last"),
        ("Create a clip of a sunset that ends with ###a.png###.", "last"),
        ("Generate a video of a dog running from ###a.png###.", "first"),
        ("Animate ###a.png###.", "first"),
        ("Starting from a calm sea, generate a video that ends with ###a.png###.", "last"),
        ("Generate a video that starts with ###a.png### and ends with a wide shot.", "first"),
    ],
)
def test_frame_index_conventions(phrase: str, index: str) -> None:
    p = plan(phrase)
    assert p.task is Task.IMAGE_TO_VIDEO
    assert p.frame_index == index
    assert p.planner_text.count(f"<BOFIDX>{0 if index == 'first' else 1}<EOFIDX>") == 1


def test_parse_frame_index_defaults_to_first() -> None:
    assert parse_frame_index("a video of a bird") == "first"
    assert parse_frame_index("the last frame") == "last"


# --------------------------------------------------------------------------- edit indices


@pytest.mark.parametrize(
    ("text", "indices"),
    [
        (TEA_PARTY, (1, 0)),
        ("###m.png### is the mask and ###s.png### is the photo; replace the hat with a crown.", (0, 1)),
        ("Use ###m.png### as the mask for ###s.png### and add a vase there.", (0, 1)),
        ("Apply the mask ###x.png### to ###y.png### and change the shirt to red.", (0, 1)),
        ("Edit ###y.png###: the mask is ###x.png###, recolor the masked shirt red.", (1, 0)),
        ("Apply the mask to ###scene_mask.png### ... no, to ###scene.png###. Remove the car.", (0, 1)),
        ("Replace the sky in ###a.png### with the sky from ###b.png###.", (None, 0)),
        ("###a.png### ###b.png### Use the mask ###c.png### to remove the lamp.", (2, 0)),
        ("Apply the mask ###only.png### and remove the cup.", (None, 0)),
    ],
)
def test_edit_indices_mask_is_next_to_the_word_mask(text: str, indices: tuple[int | None, int]) -> None:
    p = plan(text)
    assert p.task is Task.IMAGE_EDITING
    assert (p.mask_index, p.source_index) == indices
    assert edit_indices(text, parse_instruction(text).media, "image") == indices


def test_video_edit_source_is_the_video_and_an_image_mask_is_allowed() -> None:
    p = plan("Remove the boat from ###sea.mp4### using the mask ###boat.png###.")
    assert (p.task, p.mask_index, p.source_index) == (Task.VIDEO_EDITING, 1, 0)
    assert p.planner_text.endswith("<BOEDIT>1,0<EOEDIT><CFV>")


def test_an_edit_without_a_mask_says_the_whole_frame_is_editable() -> None:
    p = plan("Replace the car in ###traffic.mp4### with a red bus.")
    assert p.mask_index is None and p.source_index == 0
    assert any("whole frame" in note for note in p.notes)
    assert "<BOEDIT>0,0<EOEDIT>" in p.planner_text


# --------------------------------------------------------------------------- cue details


@pytest.mark.parametrize(
    ("text", "task"),
    [
        # generation verb and a question mark: a polite request is still a request
        ("Can you generate an image of a cat?", Task.TEXT_TO_IMAGE),
        # "how to" + verb is a question about the process
        ("I want to know how to paint clouds", Task.TEXT_UNDERSTANDING),
        # the first sentence that asks for something decides
        ("What is in this image ###a.png###? Please make it short.", Task.IMAGE_UNDERSTANDING),
        ("Generate a video of a cat. What do you think?", Task.TEXT_TO_VIDEO),
        # bare descriptions: a noun makes a request, none leaves a question
        ("A photo of a cat on a windowsill", Task.TEXT_TO_IMAGE),
        ("A cinematic clip of a horse galloping", Task.TEXT_TO_VIDEO),
        ("A cat on a windowsill, 720P", Task.TEXT_TO_IMAGE),
        ("A cat on a windowsill, 3 seconds", Task.TEXT_TO_VIDEO),
        ("A cat on a windowsill", Task.TEXT_TO_IMAGE),
        # "AI-generated" is not a request
        ("Is this photo ###a.jpg### AI-generated or real", Task.IMAGE_UNDERSTANDING),
        # "make sure" is not a request
        ("Make sure you answer in one word: is the sky blue", Task.TEXT_UNDERSTANDING),
        # a control cue on images with a video requested cannot be video_controllable
        ("###pose.png### Following this pose, generate a video of a dancer.", Task.IMAGE_CONTROLLABLE),
        # edit verbs need a given medium
        ("Change the world with a picture of a sunrise", Task.TEXT_TO_IMAGE),
        # cues that need media are ignored without media
        ("Generate a picture of a person doing a yoga pose", Task.TEXT_TO_IMAGE),
        ("Draw a depth map of a room", Task.TEXT_TO_IMAGE),
        # depth of field and "a pose" are not control cues
        ("###me.png### Generate a photo of this woman with a shallow depth of field", Task.IMAGE_REFERENCE),
        ("###me.png### Generate a photo of this woman striking a pose", Task.IMAGE_REFERENCE),
        # a video game is not a video
        ("Generate an image of a video game console", Task.TEXT_TO_IMAGE),
        # text-to-image prompt vocabulary and camera motion make a bare description a request
        ("a cat sitting on a mat, highly detailed, 8k, cinematic lighting", Task.TEXT_TO_IMAGE),
        ("A drone shot over a misty forest at dawn", Task.TEXT_TO_VIDEO),
        ("Red fox in the snow, the camera slowly zooms in", Task.TEXT_TO_VIDEO),
        # a frame position asks for a video only about a given image
        ("###a.png### Use this as the first frame, the camera slowly pans right.", Task.IMAGE_TO_VIDEO),
        ("###a.png### the last frame of a sunset timelapse", Task.IMAGE_TO_VIDEO),
        ("Draw the last frame of a film reel", Task.TEXT_TO_IMAGE),
        # put / place edit a given image; "put simply" does not
        ("###a.png### Put a hat on the man.", Task.IMAGE_EDITING),
        ("###a.png### Put simply, what is this", Task.IMAGE_UNDERSTANDING),
    ],
)
def test_cue_word_details(text: str, task: Task) -> None:
    assert plan(text).task is task


def test_control_on_images_for_video_leaves_a_note() -> None:
    p = plan("###pose.png### Following this pose, generate a video of a dancer.")
    assert any("control video" in note for note in p.notes)


# --------------------------------------------------------------------------- protocol and cold start


def test_rule_planner_implements_the_planner_protocol() -> None:
    assert isinstance(PLANNER, Planner)
    assert PLANNER.name == "rules"
    instruction = parse_instruction("###a.png### What is this?")
    assert PLANNER.answer(instruction, []) is None
    assert PLANNER.hidden_states(instruction) is None


def test_planning_media_wired_without_inline_references() -> None:
    """Media named by kind (graph-wired) still plan; with no positions, no mask is guessed."""
    instruction = parse_instruction(
        "###src### ###msk### Apply the mask and remove the cup.", kinds={"src": "image", "msk": "image"}
    )
    p = PLANNER.plan(instruction)
    assert (p.task, p.mask_index, p.source_index) == (Task.IMAGE_EDITING, 1, 0)


def test_planning_does_not_import_torch_or_numpy() -> None:
    code = (
        "import sys\n"
        "from unison_runtime.instruction import parse_instruction\n"
        "from unison_runtime.planner.rules import RulePlanner\n"
        f"p = RulePlanner().plan(parse_instruction({LION!r}))\n"
        "assert p.num_frames == 49, p\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'PIL', 'av', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=_repo_root())
    assert result.returncode == 0, result.stderr


def _repo_root() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1])
