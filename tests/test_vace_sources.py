"""VACE inputs per generation task, checked against independent computations written here.

Expected values come from the test's own arithmetic (solid colour regions, a ComfyUI-style crop
box, nearest-exact index maps, PIL's BICUBIC), never from the module under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unison_runtime.errors import MediaError, PlanError
from unison_runtime.media import Medium
from unison_runtime.plan import MediaRef, Task, assign_roles, default_plan
from unison_runtime.vace.resize import center_crop_box
from unison_runtime.vace.sources import (
    VaceInputs,
    medium_from_comfy_image,
    medium_from_comfy_mask,
    prepare_vace_inputs,
    to_comfy_vace_inputs,
)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
ATOL = 1e-6


# --------------------------------------------------------------------------- builders


def bands(height: int, width: int, colours: list[tuple[int, int, int]], axis: int = 1) -> np.ndarray:
    """uint8 [H,W,3] split into equal bands of ``colours`` along ``axis`` (1 = columns, 0 = rows)."""
    image = np.zeros((height, width, 3), np.uint8)
    size = (width if axis == 1 else height) // len(colours)
    for i, colour in enumerate(colours):
        if axis == 1:
            image[:, i * size : (i + 1) * size] = colour
        else:
            image[i * size : (i + 1) * size] = colour
    return image


def solid(height: int, width: int, colour: tuple[int, int, int], frames: int = 1) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (frames, height, width, 3)).copy()


def image(name: str, pixels: np.ndarray) -> Medium:
    return Medium(name=name, kind="image", frames=pixels[None] if pixels.ndim == 3 else pixels)


def video(name: str, frames: np.ndarray) -> Medium:
    return Medium(name=name, kind="video", frames=frames, fps=24.0)


def plan_for(task: Task, media: list[Medium], *, mask_index=None, source_index=None, **values):
    refs = [MediaRef(m.name, m.kind) for m in media]
    roles = assign_roles(task, refs, mask_index=mask_index, source_index=source_index)
    return default_plan(task, roles, mask_index=mask_index, source_index=source_index, **values)


def rgb(colour: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32) / 255.0


def assert_region(frame: torch.Tensor, rows: slice, cols: slice, colour: tuple[int, int, int]) -> None:
    region = frame[rows, cols]
    assert region.numel() > 0
    assert torch.allclose(region, rgb(colour).expand_as(region), atol=ATOL), region.reshape(-1, 3)[:3]


def comfy_crop_box(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int, int, int]:
    """ComfyUI's common_upscale(crop="center") box, written the way ComfyUI writes it (floats)."""
    old_aspect, new_aspect = width / height, target_w / target_h
    x = y = 0
    if old_aspect > new_aspect:
        x = round((width - width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((height - height * (old_aspect / new_aspect)) / 2)
    return x, y, width - 2 * x, height - 2 * y


def nearest_exact(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Pixel-centre nearest neighbour: output (y, x) reads input floor((y + 0.5) * in / out)."""
    in_h, in_w = src.shape[:2]
    ys = np.minimum(((np.arange(out_h) + 0.5) * in_h / out_h).astype(int), in_h - 1)
    xs = np.minimum(((np.arange(out_w) + 0.5) * in_w / out_w).astype(int), in_w - 1)
    return src[ys][:, xs]


def assert_shapes(inputs: VaceInputs, frames: int, height: int, width: int, refs: int = 0) -> None:
    assert inputs.frames.shape == (frames, height, width, 3)
    assert inputs.masks.shape == (frames, height, width)
    assert inputs.references.shape == (refs, height, width, 3)
    for tensor in (inputs.frames, inputs.masks, inputs.references):
        assert tensor.dtype == torch.float32
    assert set(inputs.masks.unique().tolist()) <= {0.0, 1.0}
    assert float(inputs.frames.min()) >= 0.0 and float(inputs.frames.max()) <= 1.0


# --------------------------------------------------------------------------- text only


@pytest.mark.parametrize(("task", "frames"), [(Task.TEXT_TO_IMAGE, 1), (Task.TEXT_TO_VIDEO, 9)])
def test_text_tasks_are_grey_with_all_ones_mask(task, frames):
    plan = plan_for(task, [], width=48, height=32, num_frames=frames)
    inputs = prepare_vace_inputs(plan, [])
    assert_shapes(inputs, frames, 32, 48)
    assert torch.equal(inputs.frames, torch.full((frames, 32, 48, 3), 0.5))
    assert torch.equal(inputs.masks, torch.ones(frames, 32, 48))
    assert inputs.notes == []


def test_text_task_ignores_context_media():
    media = [image("look.png", solid(8, 8, RED)[0])]
    plan = plan_for(Task.TEXT_TO_VIDEO, media, width=32, height=16, num_frames=5)
    inputs = prepare_vace_inputs(plan, media)
    assert torch.equal(inputs.frames, torch.full((5, 16, 32, 3), 0.5))


# --------------------------------------------------------------------------- editing


def test_image_editing_crops_wide_source_and_resizes_mask_from_another_size():
    # 128x64 source: green | red | blue | green quarters. A 32x32 target keeps the middle 64x64
    # (red | blue) and halves it: a squash instead of a crop would show green at the sides.
    src = bands(64, 128, [GREEN, RED, BLUE, GREEN])
    rng = np.random.default_rng(3)
    mask_bits = rng.integers(0, 2, (12, 24)).astype(bool)  # another size (same 2:1 aspect), a 12→32 ratio
    mask_px = np.where(mask_bits[..., None], np.array(WHITE, np.uint8), np.array(BLACK, np.uint8))
    media = [image("photo.png", src), image("mask.png", mask_px)]
    plan = plan_for(Task.IMAGE_EDITING, media, mask_index=1, source_index=0, width=32, height=32)
    inputs = prepare_vace_inputs(plan, media)

    assert_shapes(inputs, 1, 32, 32)
    frame = inputs.frames[0]
    assert_region(frame, slice(None), slice(0, 14), RED)  # 2 px of bicubic support left of the edge
    assert_region(frame, slice(None), slice(18, 32), BLUE)
    assert float(frame[..., 1].abs().max()) == 0.0  # no green anywhere: the side bands were cropped

    left, top, cw, ch = comfy_crop_box(24, 12, 32, 32)
    assert (left, top, cw, ch) == (6, 0, 12, 12)
    expected = nearest_exact(mask_bits[top : top + ch, left : left + cw], 32, 32).astype(np.float32)
    assert np.array_equal(inputs.masks[0].numpy(), expected)
    assert any("centre-cropped" in n and "photo.png" in n for n in inputs.notes)


def test_source_resize_matches_pil_bicubic_after_the_comfy_crop():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    media = [image("noise.png", src)]
    plan = plan_for(Task.IMAGE_EDITING, media, source_index=0, width=32, height=32)
    got = prepare_vace_inputs(plan, media).frames[0].numpy()

    left, top, cw, ch = comfy_crop_box(96, 64, 32, 32)
    pil = Image.fromarray(src).crop((left, top, left + cw, top + ch)).resize((32, 32), Image.BICUBIC)
    expected = np.asarray(pil).astype(np.float32) / 255.0
    assert np.abs(got - expected).max() <= 1.5 / 255.0


@pytest.mark.parametrize(("size", "target"), [((96, 64), (32, 32)), ((64, 96), (48, 16)), ((50, 30), (16, 32))])
def test_crop_box_is_comfyui_center_crop(size, target):
    assert center_crop_box(*size, *target) == comfy_crop_box(*size, *target)


def test_mask_polarity_and_threshold():
    # White, light grey and pure red mean "regenerate"; black and dark grey mean "keep".
    src = solid(16, 16, BLUE)[0]
    mask_px = bands(16, 16, [WHITE, (200, 200, 200), RED, (100, 100, 100)], axis=0)
    media = [image("src.png", src), image("mask.png", mask_px)]
    plan = plan_for(Task.IMAGE_EDITING, media, mask_index=1, source_index=0, width=16, height=16)
    masks = prepare_vace_inputs(plan, media).masks[0]
    assert torch.equal(masks[:12], torch.ones(12, 16))
    assert torch.equal(masks[12:], torch.zeros(4, 16))
    # The source is kept whole under the mask: the engine splits it into inactive/reactive parts.
    assert_region(prepare_vace_inputs(plan, media).frames[0], slice(None), slice(None), BLUE)


def test_editing_without_mask_is_all_editable_and_says_so():
    media = [image("src.png", solid(32, 32, RED)[0])]
    plan = plan_for(Task.IMAGE_EDITING, media, source_index=0, width=32, height=32)
    inputs = prepare_vace_inputs(plan, media)
    assert torch.equal(inputs.masks, torch.ones(1, 32, 32))
    assert_region(inputs.frames[0], slice(None), slice(None), RED)
    assert "no mask given: the whole frame is editable" in inputs.notes


def test_all_dark_mask_is_noted():
    media = [image("src.png", solid(16, 16, RED)[0]), image("mask.png", solid(16, 16, BLACK)[0])]
    plan = plan_for(Task.IMAGE_EDITING, media, mask_index=1, source_index=0, width=16, height=16)
    inputs = prepare_vace_inputs(plan, media)
    assert torch.equal(inputs.masks, torch.zeros(1, 16, 16))
    assert any("marks no pixel" in n for n in inputs.notes)


def test_video_editing_pads_a_short_source_with_grey_mask_one_and_broadcasts_an_image_mask():
    colours = [RED, GREEN, BLUE]
    src = np.stack([solid(32, 64, c)[0] for c in colours])
    mask_px = bands(32, 64, [WHITE, BLACK])  # left half regenerates
    media = [video("clip.mp4", src), image("mask.png", mask_px)]
    plan = plan_for(Task.VIDEO_EDITING, media, mask_index=1, source_index=0, width=64, height=32, num_frames=5)
    inputs = prepare_vace_inputs(plan, media)

    assert_shapes(inputs, 5, 32, 64)
    half = torch.cat([torch.ones(32, 32), torch.zeros(32, 32)], dim=1)
    for t, colour in enumerate(colours):
        assert_region(inputs.frames[t], slice(None), slice(None), colour)
        assert torch.equal(inputs.masks[t], half)
    assert torch.equal(inputs.frames[3:], torch.full((2, 32, 64, 3), 0.5))
    assert torch.equal(inputs.masks[3:], torch.ones(2, 32, 64))
    assert any("has 3 frames" in n and "frames 3-4" in n and "grey" in n for n in inputs.notes)


def test_video_editing_takes_first_frames_of_a_long_source_and_a_short_mask_video_ends_editable():
    greys = [(i * 30, i * 30, i * 30) for i in range(7)]
    src = np.stack([solid(16, 16, g)[0] for g in greys])
    mask_frames = np.stack([bands(16, 16, [BLACK, WHITE])] * 2)  # right half, for 2 frames only
    media = [video("long.mp4", src), video("mask.mp4", mask_frames)]
    plan = plan_for(Task.VIDEO_EDITING, media, mask_index=1, source_index=0, width=16, height=16, num_frames=5)
    inputs = prepare_vace_inputs(plan, media)

    for t in range(5):
        assert_region(inputs.frames[t], slice(None), slice(None), greys[t])
    right = torch.cat([torch.zeros(16, 8), torch.ones(16, 8)], dim=1)
    assert torch.equal(inputs.masks[:2], right.expand(2, 16, 16))
    assert torch.equal(inputs.masks[2:], torch.ones(3, 16, 16))
    assert any("7 frames; the first 5" in n for n in inputs.notes)
    assert any("mask" in n and "has 2 frames" in n and "fully editable" in n for n in inputs.notes)


# --------------------------------------------------------------------------- controllable


def test_image_controllable_crops_a_tall_condition_map():
    ctrl = bands(64, 32, [GREEN, RED, BLUE, GREEN], axis=0)  # 32 wide, 64 tall
    media = [image("depth.png", ctrl)]
    plan = plan_for(Task.IMAGE_CONTROLLABLE, media, width=32, height=32)
    inputs = prepare_vace_inputs(plan, media)
    assert_shapes(inputs, 1, 32, 32)
    assert_region(inputs.frames[0], slice(0, 14), slice(None), RED)
    assert_region(inputs.frames[0], slice(18, 32), slice(None), BLUE)
    assert float(inputs.frames[0, ..., 1].max()) == 0.0
    assert torch.equal(inputs.masks, torch.ones(1, 32, 32))


@pytest.mark.parametrize("length", [7, 3])
def test_video_controllable_frames_follow_the_control_video(length):
    greys = [(i * 35, 0, 255 - i * 35) for i in range(length)]
    ctrl = np.stack([solid(24, 48, g)[0] for g in greys])  # 2:1, different size from the 32x16 target
    media = [video("pose.mp4", ctrl)]
    plan = plan_for(Task.VIDEO_CONTROLLABLE, media, width=32, height=16, num_frames=5)
    inputs = prepare_vace_inputs(plan, media)
    assert_shapes(inputs, 5, 16, 32)
    for t in range(5):
        if t < length:
            assert_region(inputs.frames[t], slice(None), slice(None), greys[t])
        else:
            assert torch.equal(inputs.frames[t], torch.full((16, 32, 3), 0.5))
    assert torch.equal(inputs.masks, torch.ones(5, 16, 32))
    if length < 5:
        assert any("no control" in n for n in inputs.notes)
    else:
        assert any("first 5" in n for n in inputs.notes)


# --------------------------------------------------------------------------- reference


def test_image_reference_keeps_aspect_on_a_white_canvas():
    # 16 wide x 8 tall into 32x32: scaled 2x to 32x16, centred at rows 8..23; rows outside are white.
    ref = bands(8, 16, [RED, BLUE])
    media = [image("face.png", ref)]
    plan = plan_for(Task.IMAGE_REFERENCE, media, width=32, height=32)
    inputs = prepare_vace_inputs(plan, media)

    assert_shapes(inputs, 1, 32, 32, refs=1)
    canvas = inputs.references[0]
    assert torch.equal(canvas[:8], torch.ones(8, 32, 3))
    assert torch.equal(canvas[24:], torch.ones(8, 32, 3))
    assert_region(canvas, slice(8, 24), slice(0, 14), RED)
    assert_region(canvas, slice(8, 24), slice(18, 32), BLUE)
    assert torch.equal(inputs.frames, torch.full((1, 32, 32, 3), 0.5))
    assert torch.equal(inputs.masks, torch.ones(1, 32, 32))


def test_video_reference_with_two_references_in_order_and_side_borders():
    # 8 wide x 16 tall into 64x32: scaled 2x to 16x32, centred at columns 24..39.
    tall = bands(16, 8, [GREEN, RED], axis=0)
    square = solid(20, 20, BLUE)[0]
    media = [image("a.png", tall), image("b.png", square)]
    plan = plan_for(Task.VIDEO_REFERENCE, media, width=64, height=32, num_frames=5)
    inputs = prepare_vace_inputs(plan, media)

    assert_shapes(inputs, 5, 32, 64, refs=2)
    first, second = inputs.references
    assert torch.equal(first[:, :24], torch.ones(32, 24, 3))
    assert torch.equal(first[:, 40:], torch.ones(32, 24, 3))
    assert_region(first, slice(0, 14), slice(24, 40), GREEN)
    assert_region(first, slice(18, 32), slice(24, 40), RED)
    # 20x20 → 32x32, centred at columns 16..47.
    assert torch.equal(second[:, :16], torch.ones(32, 16, 3))
    assert torch.equal(second[:, 48:], torch.ones(32, 16, 3))
    assert_region(second, slice(None), slice(16, 48), BLUE)
    assert torch.equal(inputs.frames, torch.full((5, 32, 64, 3), 0.5))
    assert torch.equal(inputs.masks, torch.ones(5, 32, 64))


# --------------------------------------------------------------------------- image to video


@pytest.mark.parametrize(("frame_index", "position"), [("first", 0), ("last", 4)])
def test_image_to_video_places_the_frame_first_or_last(frame_index, position):
    still = bands(32, 64, [RED, BLUE])
    media = [image("start.png", still)]
    plan = plan_for(Task.IMAGE_TO_VIDEO, media, width=64, height=32, num_frames=5, frame_index=frame_index)
    inputs = prepare_vace_inputs(plan, media)

    assert_shapes(inputs, 5, 32, 64)
    assert_region(inputs.frames[position], slice(None), slice(0, 32), RED)
    assert_region(inputs.frames[position], slice(None), slice(32, 64), BLUE)
    assert torch.equal(inputs.masks[position], torch.zeros(32, 64))
    others = [t for t in range(5) if t != position]
    assert torch.equal(inputs.frames[others], torch.full((4, 32, 64, 3), 0.5))
    assert torch.equal(inputs.masks[others], torch.ones(4, 32, 64))


# --------------------------------------------------------------------------- errors


def test_media_count_must_match_the_plan():
    media = [image("a.png", solid(8, 8, RED)[0])]
    plan = plan_for(Task.IMAGE_REFERENCE, media, width=16, height=16)
    with pytest.raises(MediaError, match=r"got 0 decoded media for the 1 in plan\.media"):
        prepare_vace_inputs(plan, [])


def test_medium_kind_must_match_the_plan():
    media = [image("a.png", solid(8, 8, RED)[0])]
    plan = plan_for(Task.IMAGE_REFERENCE, media, width=16, height=16)
    wrong = [video("a.png", solid(8, 8, RED, frames=3))]
    with pytest.raises(MediaError, match=r"media\[0\] \('a\.png'\) is a decoded video.*is an image"):
        prepare_vace_inputs(plan, wrong)


def test_missing_role_names_the_field():
    media = [image("a.png", solid(8, 8, RED)[0])]
    plan = default_plan(Task.IMAGE_TO_VIDEO, [MediaRef("a.png", "image")], width=16, height=16, num_frames=5)
    with pytest.raises(PlanError, match="role 'frame'") as info:
        prepare_vace_inputs(plan, media)
    assert info.value.field == "media"


def test_understanding_tasks_have_no_vace_inputs():
    media = [image("a.png", solid(8, 8, RED)[0])]
    plan = plan_for(Task.IMAGE_UNDERSTANDING, media)
    with pytest.raises(PlanError, match="no VACE inputs") as info:
        prepare_vace_inputs(plan, media)
    assert info.value.field == "task"


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((1, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 3), np.uint8), r"\[T,H,W,3\]"),
        (np.zeros((2, 8, 8, 3), np.uint8), "holds 2 frames"),
    ],
)
def test_malformed_frames_are_refused(frames, message):
    plan = plan_for(Task.IMAGE_CONTROLLABLE, [image("c.png", solid(8, 8, RED)[0])], width=16, height=16)
    with pytest.raises(MediaError, match=message):
        prepare_vace_inputs(plan, [Medium(name="c.png", kind="image", frames=frames)])


# --------------------------------------------------------------------------- ComfyUI


def test_comfy_converters_match_wan_vace_to_video_inputs():
    ref = bands(8, 16, [RED, BLUE])
    media = [image("face.png", ref), image("hat.png", solid(8, 8, GREEN)[0])]
    plan = plan_for(Task.VIDEO_REFERENCE, media, width=32, height=16, num_frames=5)
    inputs = prepare_vace_inputs(plan, media)
    control_video, control_masks, reference_image = to_comfy_vace_inputs(inputs)
    assert control_video.shape == (5, 16, 32, 3) and control_masks.shape == (5, 16, 32)
    assert reference_image is not None and reference_image.shape == (1, 16, 32, 3)
    assert torch.equal(reference_image[0], inputs.references[0])
    # WanVaceToVideo's neutral values: 0.5 control, mask 1.
    assert torch.equal(control_video, torch.full((5, 16, 32, 3), 0.5))
    assert torch.equal(control_masks, torch.ones(5, 16, 32))
    # Copies: a downstream in-place edit does not change the prepared inputs.
    control_video.zero_()
    assert float(inputs.frames.min()) == 0.5

    t2v = prepare_vace_inputs(plan_for(Task.TEXT_TO_VIDEO, [], width=32, height=16, num_frames=5), [])
    assert to_comfy_vace_inputs(t2v)[2] is None


def test_comfy_image_and_mask_round_trip_through_editing():
    gen = torch.Generator().manual_seed(0)
    comfy_video = torch.rand(5, 16, 32, 3, generator=gen)
    comfy_mask = (torch.rand(5, 16, 32, generator=gen) > 0.5).float()
    src = medium_from_comfy_image("graph_video", "video", comfy_video, fps=24.0)
    mask = medium_from_comfy_mask("graph_mask", comfy_mask)
    assert src.kind == "video" and src.frames.dtype == np.uint8 and src.frames.shape == (5, 16, 32, 3)
    assert np.array_equal(src.frames, np.floor(comfy_video.numpy() * 255.0 + 0.5).astype(np.uint8))
    assert mask.kind == "video" and mask.frames.shape == (5, 16, 32, 3)

    plan = plan_for(Task.VIDEO_EDITING, [src, mask], mask_index=1, source_index=0, width=32, height=16, num_frames=5)
    control_video, control_masks, reference_image = to_comfy_vace_inputs(prepare_vace_inputs(plan, [src, mask]))
    assert (control_video - comfy_video).abs().max() <= 0.5 / 255.0 + ATOL
    assert torch.equal(control_masks, comfy_mask)
    assert reference_image is None


def test_comfy_image_channels_and_single_mask():
    grey = torch.full((1, 4, 4, 1), 0.5)
    assert np.array_equal(medium_from_comfy_image("g", "image", grey).frames, np.full((1, 4, 4, 3), 128, np.uint8))
    rgba = torch.zeros(1, 4, 4, 4)
    rgba[..., 3] = 1.0
    assert medium_from_comfy_image("a", "image", rgba).frames.max() == 0
    single = medium_from_comfy_mask("m", torch.ones(4, 4))
    assert single.kind == "image" and single.frames.shape == (1, 4, 4, 3) and single.frames.min() == 255


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: medium_from_comfy_image("x", "image", torch.zeros(2, 4, 4, 3)), "holds 2 images; expected 1"),
        (lambda: medium_from_comfy_image("x", "video", torch.zeros(4, 4)), r"\[B,H,W,C\]"),
        (lambda: medium_from_comfy_image("x", "audio", torch.zeros(1, 4, 4, 3)), "kind must be"),
        (lambda: medium_from_comfy_mask("x", torch.zeros(1, 1, 4, 4)), r"\[B,H,W\]"),
        (lambda: medium_from_comfy_mask("x", torch.zeros(3, 4, 4), kind="image"), "holds 3 masks"),
    ],
)
def test_comfy_converters_refuse_bad_tensors(call, message):
    with pytest.raises(MediaError, match=message):
        call()
