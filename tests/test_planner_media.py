"""The planner's media side: first+last frame, mask-looking media, shapes and lengths, unused media notes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from unison_runtime.errors import InstructionError, PlanError, PlannerOutputError
from unison_runtime.instruction import parse_instruction
from unison_runtime.media import Medium, write_video
from unison_runtime.media_probe import MediaInfo, info_from_medium, probe_file
from unison_runtime.plan import MediaRef, Task, default_plan, format_planner_text, frame_positions, parse_planner_text
from unison_runtime.planner.rules import RulePlanner
from unison_runtime.planner.rules_checks import check_plan_media
from unison_runtime.vace.sources import prepare_vace_inputs

PLANNER = RulePlanner()
TWO_IMAGES = (MediaRef("a.png", "image"), MediaRef("b.png", "image"))


# --------------------------------------------------------------------------- first + last frame


@pytest.mark.parametrize(("tokens", "placement"), [("0,1", "first_last"), ("1,0", "last_first")])
def test_both_frame_indices_read_back_and_write_out(tokens: str, placement: str) -> None:
    text = f"<BORES>832,480<EORES><BONF>80<EONF><BOFIDX>{tokens}<EOFIDX><CFV>"
    plan = parse_planner_text(text, TWO_IMAGES)
    assert (plan.task, plan.frame_index) == (Task.IMAGE_TO_VIDEO, placement)
    assert [m.role for m in plan.media] == ["frame", "frame"]
    assert format_planner_text(plan) == text
    expected = [(0, 0), (1, 80)] if placement == "first_last" else [(0, 80), (1, 0)]
    assert frame_positions(plan) == expected


@pytest.mark.parametrize("tokens", ["0,0", "1,1", "0,2", "0,1,0"])
def test_impossible_frame_pairs_are_planner_errors(tokens: str) -> None:
    with pytest.raises(PlannerOutputError):
        parse_planner_text(f"<BOFIDX>{tokens}<EOFIDX><CFV>", TWO_IMAGES)


def test_both_ends_need_two_frame_images() -> None:
    one = (MediaRef("a.png", "image", "frame"), MediaRef("b.png", "image", "context"))
    with pytest.raises(PlanError) as err:
        default_plan(Task.IMAGE_TO_VIDEO, one, frame_index="first_last")
    assert err.value.field == "frame_index" and "2 images" in str(err.value)


def test_vace_sources_place_the_first_and_the_last_frame() -> None:
    plan = PLANNER.plan(parse_instruction("A video that starts with ###a.png### and ends with ###b.png###, 1 second."))
    assert (plan.task, plan.frame_index, plan.num_frames) == (Task.IMAGE_TO_VIDEO, "first_last", 25)
    plan = plan.with_changes(width=64, height=32)
    red = Medium("a.png", "image", np.full((1, 32, 64, 3), (255, 0, 0), dtype=np.uint8))
    blue = Medium("b.png", "image", np.full((1, 32, 64, 3), (0, 0, 255), dtype=np.uint8))
    inputs = prepare_vace_inputs(plan, [red, blue])
    assert inputs.frames[0, ..., 0].min() > 0.99 and inputs.frames[0, ..., 2].max() < 0.01
    assert inputs.frames[-1, ..., 2].min() > 0.99 and inputs.frames[-1, ..., 0].max() < 0.01
    assert float(inputs.masks[0].max()) == 0.0 and float(inputs.masks[-1].max()) == 0.0
    assert float(inputs.masks[1:-1].min()) == 1.0 and bool((inputs.frames[1:-1] == 0.5).all())


def test_last_first_puts_the_first_medium_at_the_end() -> None:
    plan = PLANNER.plan(parse_instruction("Make a clip ending on ###b.png### and starting with ###a.png###."))
    assert plan.frame_index == "last_first"
    assert frame_positions(plan) == [(0, plan.num_frames - 1), (1, 0)]


# --------------------------------------------------------------------------- probing media


def _mask_png(path: Path, size: tuple[int, int] = (64, 48), mode: str = "L") -> Path:
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle((10, 10, 40, 30), fill=255)
    image.convert(mode).save(path)
    return path


def _photo(path: Path, size: tuple[int, int] = (96, 64)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_probe_tells_a_mask_from_a_photo_and_a_depth_map(tmp_path: Path) -> None:
    assert probe_file(_mask_png(tmp_path / "m.png"), "image") == MediaInfo(64, 48, two_level=True)
    assert probe_file(_mask_png(tmp_path / "rgb.png", mode="RGB"), "image") == MediaInfo(64, 48, two_level=True)
    assert probe_file(_photo(tmp_path / "p.jpg"), "image") == MediaInfo(96, 64, two_level=False)
    ramp = np.tile(np.linspace(0, 255, 80).astype(np.uint8), (40, 1))
    Image.fromarray(ramp, "L").save(tmp_path / "depth.png")
    assert probe_file(tmp_path / "depth.png", "image") == MediaInfo(80, 40, two_level=False)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert probe_file(tmp_path / "broken.png", "image") is None
    assert probe_file(tmp_path / "missing.png", "image") is None


def test_probe_reads_a_video_length_rate_and_look(tmp_path: Path) -> None:
    frames = np.random.default_rng(1).integers(0, 256, (13, 48, 64, 3), dtype=np.uint8)
    write_video(frames, tmp_path / "v.mp4", fps=16)
    assert probe_file(tmp_path / "v.mp4", "video") == MediaInfo(64, 48, frames=13, fps=16.0, two_level=False)
    mask = np.zeros((9, 48, 64, 3), dtype=np.uint8)
    mask[:, 8:40, 16:48] = 255
    write_video(mask, tmp_path / "m.mp4", fps=24)
    info = probe_file(tmp_path / "m.mp4", "video")
    assert info is not None and info.two_level and info.frames == 9


def test_decoded_media_give_the_same_facts() -> None:
    frames = np.zeros((5, 48, 64, 3), dtype=np.uint8)
    frames[:, 10:30, 10:40] = 255
    assert info_from_medium(Medium("m.mp4", "video", frames, fps=8.0)) == MediaInfo(64, 48, 5, 8.0, True)
    photo = np.random.default_rng(2).integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)
    assert not info_from_medium(Medium("p.png", "image", photo)).two_level


# --------------------------------------------------------------------------- media-aware plans


def _with_info(text: str, *info: MediaInfo) -> object:
    instruction = parse_instruction(text)
    return PLANNER.plan(instruction.__class__(**{**instruction.__dict__, "media_info": info}))


def test_a_mask_looking_image_is_the_mask_when_words_are_silent() -> None:
    photo, mask = MediaInfo(1920, 1080), MediaInfo(1920, 1080, two_level=True)
    plan = _with_info("###IMG_1.jpg### ###IMG_2.png### put a vase of flowers there", photo, mask)
    assert (plan.task, plan.mask_index, plan.source_index) == (Task.IMAGE_EDITING, 1, 0)
    assert any("two-level" in note for note in plan.notes)
    swapped = _with_info("###IMG_2.png### ###IMG_1.jpg### put a vase of flowers there", mask, photo)
    assert (swapped.mask_index, swapped.source_index) == (0, 1)


def test_an_image_mask_next_to_a_video_is_its_mask() -> None:
    video, mask = MediaInfo(832, 480, 49, 16.0), MediaInfo(832, 480, two_level=True)
    plan = _with_info("###clip.mp4### ###sel.png### remove the boat", video, mask)
    assert (plan.task, plan.mask_index, plan.source_index) == (Task.VIDEO_EDITING, 1, 0)
    assert [m.role for m in plan.media] == ["source", "mask"]


def test_the_source_shape_and_length_shape_the_plan_where_words_are_silent() -> None:
    portrait = _with_info("###shot.jpg### remove the lamp post", MediaInfo(1080, 1920))
    assert (portrait.width, portrait.height) == (480, 848)
    assert any("follows the shape" in note for note in portrait.notes)
    said = _with_info("###shot.jpg### remove the lamp post, 1024x1024", MediaInfo(1080, 1920))
    assert (said.width, said.height) == (1024, 1024)
    video = _with_info("###clip.mp4### make it snow", MediaInfo(1280, 720, frames=100, fps=25.0))
    assert (video.width, video.height, video.num_frames, video.fps) == (848, 480, 97, 25)
    told = _with_info("###clip.mp4### make it snow, 2 seconds", MediaInfo(1280, 720, frames=100, fps=25.0))
    assert told.num_frames == 49


def test_media_a_task_cannot_use_are_named_in_the_notes() -> None:
    plan = PLANNER.plan(parse_instruction("Replace the person in ###v.mp4### with a robot, see ###face.png###"))
    assert plan.task is Task.VIDEO_EDITING
    assert any("'face.png'" in note and "not used" in note for note in plan.notes)
    lora = parse_planner_text("<BORES>832,480<EORES><BONF>80<EONF><BOFIDX>0<EOFIDX><CFV>", TWO_IMAGES)
    noted = check_plan_media(lora)
    assert any("'b.png'" in note for note in noted.notes) and noted == lora


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_an_empty_instruction_is_an_instruction_error(text: str) -> None:
    with pytest.raises(InstructionError, match="empty"):
        PLANNER.plan(parse_instruction(text))


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("an image of a cat, 0x0", "width", "positive"),
        ("an image of a cat, width -512", "width", "positive"),
        ("a video of a cat, -5 frames", "num_frames", "positive"),
        ("a video of a dog, 10 hours", "num_frames", "1025"),
        ("a 4k video of a city", "width", "2048"),
        ("a clip of rain at 0 fps", "fps", "120"),
        ("a clip of rain at 500 fps", "fps", "120"),
        ("生成一段一分钟的视频", "num_frames", "1025"),
    ],
)
def test_impossible_values_are_errors_naming_the_field_and_the_limit(text: str, field: str, words: str) -> None:
    with pytest.raises(PlanError) as err:
        PLANNER.plan(parse_instruction(text))
    assert err.value.field == field and words in str(err.value)


def test_a_quality_tag_4k_is_noted_not_applied() -> None:
    plan = PLANNER.plan(parse_instruction("a cat on a sofa, highly detailed, 8k"))
    assert (plan.width, plan.height) == (832, 480)
    assert any("'8k' was read as a quality word" in note for note in plan.notes)
