"""VACE inputs per generation task, checked against independent computations written here.

Expected values come from the test's own arithmetic (solid colour regions, VACE's and Unison's
size, frame-id and resize rules written out here, Pillow's ``L`` conversion and BICUBIC), never
from the module under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unison_runtime.errors import MediaError, PlanError
from unison_runtime.media import Medium
from unison_runtime.plan import MediaRef, Task, assign_roles, default_plan
from unison_runtime.vace.framing import frame_ids
from unison_runtime.vace.sources import (
    NO_SALIENT_NOTE,
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


def assert_shapes(inputs: VaceInputs, frames: int, height: int, width: int, refs: int = 0) -> None:
    assert inputs.frames.shape == (frames, height, width, 3)
    assert inputs.masks.shape == (frames, height, width)
    assert inputs.references.shape == (refs, height, width, 3)
    for tensor in (inputs.frames, inputs.masks, inputs.references):
        assert tensor.dtype == torch.float32
    assert float(inputs.masks.min()) >= 0.0 and float(inputs.masks.max()) <= 1.0
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


# --------------------------------------------------------------------------- the reference's rules, written out


def ref_size(width: int, height: int, plan_w: int, plan_h: int, frames: int = 1, plan_frames: int = 81):
    """(w, h) VACE's _get_frameid_bbox_adjust_last gives a source, with Unison's seq_len for the plan's area."""
    area = plan_w * plan_h
    seq = {720 * 1280: 75600, 480 * 832: 32760}.get(area, area // 12)
    seq = seq if (plan_frames - 1) // 4 + 1 == 21 else seq * ((plan_frames - 1) // 4 + 1) // 21
    area_z = min(seq, area / 256, (height // 16) * (width // 16))
    latent = min((frames - 1) // 4 + 1, int(seq / area_z))
    target = min(area_z, int(seq / latent))
    oh = round(np.sqrt(target * height / width))
    return int(target / oh) * 16, oh * 16, (latent - 1) * 4 + 1


def ref_frame_ids(length: int, count: int, fps: float = 24.0) -> list[int]:
    """Timestamps 0 .. middle of the last frame, evenly; each takes the first frame i with i/fps <= t <= (i+1)/fps."""
    duration = (length - 0.5) / fps
    ids = []
    for k in range(count):
        t = duration * k / (count - 1) if count > 1 else 0.0
        ids.append(next(i for i in range(length) if i / fps <= t <= (i + 1) / fps))
    return ids


def ref_resize_crop(frames: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """VACE's resize_crop on uint8 frames [T,H,W,3] → float [T,out_h,out_w,3] in 0..1 (written as VACE writes it)."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)
    ih, iw = video.shape[2:]
    if (ih, iw) != (out_h, out_w):
        scale = max(out_w / iw, out_h / ih)
        video = torch.nn.functional.interpolate(video, size=(round(scale * ih), round(scale * iw)), mode="bicubic",
                                                antialias=True)
        x1, y1 = (video.size(3) - out_w) // 2, (video.size(2) - out_h) // 2
        video = video[:, :, y1 : y1 + out_h, x1 : x1 + out_w]
    return (video.float() / 255).permute(0, 2, 3, 1).numpy()  # VACE's x / 127.5 - 1, in the pack's 0..1


def pil_luma(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).convert("L"))


# --------------------------------------------------------------------------- size and frames of a source


@pytest.mark.parametrize(
    ("source", "plan_size", "expected"),
    [
        ((832, 480), (832, 480), (832, 480)),  # same shape: unchanged
        ((480, 832), (832, 480), (480, 832)),  # portrait source: portrait output, whole frame kept
        ((512, 512), (832, 480), (512, 512)),  # square: 32x32 patches (fewer than the area allows: no upscale)
        ((1024, 1024), (832, 480), (640, 624)),  # round(sqrt(1560)) = 39 patches high, int(1560 / 39) = 40 wide
        ((640, 360), (832, 480), (640, 352)),
        ((1920, 1080), (832, 480), (832, 480)),
        ((131, 97), (832, 480), (128, 96)),
        ((1080, 1920), (1280, 720), (720, 1280)),
        ((97, 131), (48, 32), (32, 48)),
    ],
)
def test_output_size_follows_the_source_aspect_at_the_plan_area(source, plan_size, expected):
    w, h = source
    want_w, want_h, _ = ref_size(w, h, *plan_size)
    assert (want_w, want_h) == expected
    media = [image("photo.png", np.zeros((h, w, 3), np.uint8))]
    plan = plan_for(Task.IMAGE_EDITING, media, source_index=0, width=plan_size[0], height=plan_size[1])
    inputs = prepare_vace_inputs(plan, media)
    assert inputs.size == expected and inputs.num_frames == 1
    used = inputs.used_plan(plan)
    assert (used.width, used.height, used.num_frames) == (*expected, 1)
    if expected != plan_size:
        assert any(f"output is {expected[0]}x{expected[1]}" in n for n in inputs.notes)
    else:
        assert used is plan


def test_a_fixed_size_keeps_the_plan_size_and_covers_it():
    src = np.random.default_rng(1).integers(0, 256, (60, 40, 3), dtype=np.uint8)  # portrait
    media = [image("tall.png", src)]
    plan = plan_for(Task.IMAGE_CONTROLLABLE, media, width=48, height=32, fixed_size=True)
    inputs = prepare_vace_inputs(plan, media)
    assert inputs.size == (48, 32)
    np.testing.assert_array_equal(inputs.frames.numpy(), ref_resize_crop(src[None], 48, 32))
    assert not any("output is" in n for n in inputs.notes)
    assert plan.to_dict()["fixed_size"] is True and "fixed_size" not in plan.with_changes(fixed_size=False).to_dict()


@pytest.mark.parametrize(("length", "plan_frames"), [(200, 81), (40, 81), (81, 81), (9, 81), (30, 17), (100, 49)])
def test_a_clip_is_resampled_whole_into_the_frame_budget(length, plan_frames):
    # Frame i is solid grey i (mod 256): which frames were read shows in the output values.
    frames = np.stack([np.full((32, 48, 3), i % 256, np.uint8) for i in range(length)])
    media = [video("pose.mp4", frames)]
    plan = plan_for(Task.VIDEO_CONTROLLABLE, media, width=48, height=32, num_frames=plan_frames)
    inputs = prepare_vace_inputs(plan, media)

    _, _, count = ref_size(48, 32, 48, 32, frames=length, plan_frames=plan_frames)
    assert count == min((length - 1) // 4 * 4 + 1, (plan_frames - 1) // 4 * 4 + 1)  # same-size source: the budget
    ids = ref_frame_ids(length, count)
    assert ids[0] == 0 and ids[-1] == length - 1  # the whole clip, first to last frame
    assert inputs.num_frames == count
    got = (inputs.frames[:, 0, 0, 0] * 255).round().to(torch.int64).tolist()
    assert got == [i % 256 for i in ids]
    assert torch.equal(inputs.masks, torch.ones(count, 32, 48))


def test_a_small_source_clip_gets_more_frames_from_the_token_budget():
    # 320x240 is 300 patches, the plan's 832x480 area holds 1560: the reference's budget of
    # 81 frames x 1560 patches lets it keep int(32760 / 300) = 109 latent frames of the clip.
    frames = np.zeros((300, 240, 320, 3), np.uint8)
    media = [video("small.mp4", frames)]
    plan = plan_for(Task.VIDEO_CONTROLLABLE, media)
    inputs = prepare_vace_inputs(plan, media)
    assert ref_size(320, 240, 832, 480, frames=300) == (320, 240, 297)
    assert (inputs.size, inputs.num_frames) == ((320, 240), 297)
    assert any("297 frames are generated" in n for n in inputs.notes)


def test_frame_ids_match_the_written_out_rule():
    for length, count in [(200, 81), (40, 37), (1000, 81), (7, 5), (82, 81)]:
        assert list(frame_ids(length, count)) == ref_frame_ids(length, count)


def test_source_frames_are_resized_and_cropped_as_vace_does():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)  # odd size: scaled to 130x96, then cropped to 128x96
    media = [image("noise.png", src)]
    plan = plan_for(Task.IMAGE_EDITING, media, source_index=0)
    got = prepare_vace_inputs(plan, media).frames.numpy()
    np.testing.assert_array_equal(got, ref_resize_crop(src[None], 128, 96))
    # Independently of torch: Pillow's bicubic on the same geometry, within one grey level.
    pil = Image.fromarray(src).resize((130, 96), Image.BICUBIC).crop((1, 0, 129, 96))
    assert np.abs(got[0] - np.asarray(pil) / 255.0).max() <= 1.0 / 255.0 + 1e-6


# --------------------------------------------------------------------------- editing: VACE's inpainting annotator


def test_masked_area_is_painted_grey_128_before_resizing_and_the_mask_is_any_pixel_above_zero():
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    # Rows: white, faint grey (1,1,1), very dark red (1,0,0) (Pillow's L rounds it to 0), dark red (2,0,0)
    # (L = 1), dark green (0,1,0) (L = 1), black.
    colours = [WHITE, (1, 1, 1), (1, 0, 0), (2, 0, 0), (0, 1, 0), BLACK]
    mask_px = bands(48, 64, colours, axis=0)
    regenerate = pil_luma(mask_px) > 0
    assert [bool(regenerate[8 * i, 0]) for i in range(6)] == [True, True, False, True, True, False]
    media = [image("photo.png", src), image("mask.png", mask_px)]
    plan = plan_for(Task.IMAGE_EDITING, media, mask_index=1, source_index=0, width=64, height=48, fixed_size=True)
    inputs = prepare_vace_inputs(plan, media)

    painted = src.copy()
    painted[regenerate] = 128
    np.testing.assert_array_equal(inputs.frames.numpy(), ref_resize_crop(painted[None], 64, 48))
    assert torch.equal(inputs.masks[0], torch.from_numpy(regenerate.astype(np.float32)))  # same size: no resize


def test_a_soft_mask_regenerates_every_non_black_pixel_and_its_edges_soften_when_resized():
    src = np.full((60, 90, 3), 200, np.uint8)
    mask = np.zeros((60, 90), np.uint8)
    mask[10:40, 20:70] = np.linspace(1, 255, 50).astype(np.uint8)[None]  # a feathered ramp
    media = [image("photo.png", src), image("mask.png", np.repeat(mask[..., None], 3, -1))]
    plan = plan_for(Task.IMAGE_EDITING, media, mask_index=1, source_index=0, width=64, height=48)
    inputs = prepare_vace_inputs(plan, media)

    w, h, _ = ref_size(90, 60, 64, 48)
    assert inputs.size == (w, h) == (64, 48)  # 12 patches at 3:2 → 3 high, 4 wide
    hard = np.where(mask > 0, 255, 0).astype(np.uint8)
    expected = ref_resize_crop(np.repeat(hard[None, ..., None], 3, -1), w, h)[0, ..., 0]
    np.testing.assert_allclose(inputs.masks[0].numpy(), expected, atol=1e-6)
    assert float(inputs.masks[0][(inputs.masks[0] > 0) & (inputs.masks[0] < 1)].numel()) > 0  # soft edges
    painted = src.copy()
    painted[mask > 0] = 128
    np.testing.assert_array_equal(inputs.frames.numpy(), ref_resize_crop(painted[None], w, h))


def test_a_mask_of_another_size_is_resized_to_the_source_with_nearest():
    src = np.full((48, 96, 3), 255, np.uint8)
    small = np.zeros((4, 8), np.uint8)
    small[:, :4] = 255  # left half
    media = [image("photo.png", src), image("mask.png", np.repeat(small[..., None], 3, -1))]
    plan = plan_for(Task.IMAGE_EDITING, media, mask_index=1, source_index=0, width=96, height=48, fixed_size=True)
    inputs = prepare_vace_inputs(plan, media)
    left = torch.cat([torch.ones(48, 48), torch.zeros(48, 48)], dim=1)
    assert torch.equal(inputs.masks[0], left)
    assert torch.allclose(inputs.frames[0, :, :48], torch.full((48, 48, 3), 128 / 255))
    assert any("resized (nearest)" in n for n in inputs.notes)


def test_editing_an_image_without_mask_is_all_editable_and_says_so():
    media = [image("src.png", solid(32, 32, RED)[0])]
    plan = plan_for(Task.IMAGE_EDITING, media, source_index=0, width=32, height=32)
    inputs = prepare_vace_inputs(plan, media)
    assert torch.equal(inputs.masks, torch.ones(1, 32, 32))
    assert_region(inputs.frames[0], slice(None), slice(None), RED)
    assert "no mask given: the whole frame is editable" in inputs.notes


def test_all_black_mask_is_noted():
    media = [image("src.png", solid(16, 16, RED)[0]), image("mask.png", solid(16, 16, BLACK)[0])]
    plan = plan_for(Task.IMAGE_EDITING, media, mask_index=1, source_index=0, width=16, height=16)
    inputs = prepare_vace_inputs(plan, media)
    assert torch.equal(inputs.masks, torch.zeros(1, 16, 16))
    assert_region(inputs.frames[0], slice(None), slice(None), RED)
    assert any("marks no pixel" in n for n in inputs.notes)


def test_video_editing_applies_an_image_mask_to_every_resampled_frame():
    frames = np.stack([np.full((32, 64, 3), 10 * i, np.uint8) for i in range(12)])
    mask_px = bands(32, 64, [WHITE, BLACK])  # left half regenerates
    media = [video("clip.mp4", frames), image("mask.png", mask_px)]
    plan = plan_for(Task.VIDEO_EDITING, media, mask_index=1, source_index=0, width=64, height=32)
    inputs = prepare_vace_inputs(plan, media)

    ids = ref_frame_ids(12, 9)
    assert inputs.num_frames == 9 and inputs.size == (64, 32)
    half = torch.cat([torch.ones(32, 32), torch.zeros(32, 32)], dim=1)
    for t, i in enumerate(ids):
        assert torch.equal(inputs.masks[t], half)
        assert torch.allclose(inputs.frames[t, :, :32], torch.full((32, 32, 3), 128 / 255))
        assert torch.allclose(inputs.frames[t, :, 32:], torch.full((32, 32, 3), 10 * i / 255))


def test_video_editing_with_a_mask_video_reads_both_at_the_same_frame_ids():
    frames = np.stack([np.full((16, 16, 3), 200, np.uint8)] * 10)
    masks = np.zeros((10, 16, 16, 3), np.uint8)
    for i in range(10):
        masks[i, :, i] = 255  # column i regenerates in frame i
    media = [video("clip.mp4", frames), video("mask.mp4", masks)]
    plan = plan_for(Task.VIDEO_EDITING, media, mask_index=1, source_index=0, width=16, height=16)
    inputs = prepare_vace_inputs(plan, media)
    for t, i in enumerate(ref_frame_ids(10, 9)):
        assert torch.nonzero(inputs.masks[t].sum(0)).flatten().tolist() == [i]

    short = [video("clip.mp4", frames), video("mask.mp4", masks[:3])]
    with pytest.raises(MediaError, match="fewer than the source"):
        prepare_vace_inputs(plan_for(Task.VIDEO_EDITING, short, mask_index=1, source_index=0), short)


def test_video_editing_without_mask_uses_the_salient_annotator_on_the_first_frame():
    frames = np.stack([np.full((32, 32, 3), 50 + i, np.uint8) for i in range(5)])
    seen = []

    def salient(frame: np.ndarray) -> np.ndarray:
        seen.append(frame.copy())
        out = np.zeros(frame.shape[:2], np.uint8)
        out[8:24, 8:24] = 1  # the smallest non-zero saliency still counts
        return out

    media = [video("clip.mp4", frames)]
    plan = plan_for(Task.VIDEO_EDITING, media, source_index=0, width=32, height=32)
    inputs = prepare_vace_inputs(plan, media, salient=salient)
    assert len(seen) == 1 and np.array_equal(seen[0], frames[0])
    box = torch.zeros(32, 32)
    box[8:24, 8:24] = 1
    assert torch.equal(inputs.masks, box.expand(5, 32, 32))
    assert torch.allclose(inputs.frames[:, 8:24, 8:24], torch.full((5, 16, 16, 3), 128 / 255))
    assert any("salient annotator" in n and "as Unison does" in n for n in inputs.notes)


def test_video_editing_without_mask_or_annotator_keeps_the_source_and_says_it_is_not_unison():
    frames = np.stack([np.full((16, 16, 3), 77, np.uint8)] * 5)
    media = [video("clip.mp4", frames)]
    inputs = prepare_vace_inputs(plan_for(Task.VIDEO_EDITING, media, source_index=0, width=16, height=16), media)
    assert torch.equal(inputs.masks, torch.ones(5, 16, 16))
    assert torch.allclose(inputs.frames, torch.full((5, 16, 16, 3), 77 / 255))
    assert NO_SALIENT_NOTE in inputs.notes and "not Unison's behaviour" in NO_SALIENT_NOTE


# --------------------------------------------------------------------------- controllable


def test_image_controllable_keeps_a_tall_condition_map_whole():
    ctrl = bands(64, 32, [GREEN, RED, BLUE, GREEN], axis=0)  # 32 wide, 64 tall
    media = [image("depth.png", ctrl)]
    plan = plan_for(Task.IMAGE_CONTROLLABLE, media, width=32, height=32)
    inputs = prepare_vace_inputs(plan, media)
    w, h, _ = ref_size(32, 64, 32, 32)
    assert inputs.size == (w, h) == (16, 48)
    np.testing.assert_array_equal(inputs.frames.numpy(), ref_resize_crop(ctrl[None], w, h))
    assert float(inputs.frames[0, :4, :, 1].min()) > 0.9  # the green top band is kept, not cropped away
    assert torch.equal(inputs.masks, torch.ones(1, h, w))


# --------------------------------------------------------------------------- reference


def ref_contain(pixels: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Unison's prepare_source for a reference image, written out: bilinear, int() size, white canvas."""
    h, w = pixels.shape[:2]
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 * 2 - 1
    scale = min(out_h / h, out_w / w)
    nh, nw = int(h * scale), int(w * scale)
    resized = torch.nn.functional.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, out_h, out_w)
    top, left = (out_h - nh) // 2, (out_w - nw) // 2
    canvas[:, top : top + nh, left : left + nw] = resized
    return ((canvas + 1) / 2).permute(1, 2, 0).numpy()


@pytest.mark.parametrize(("size", "placed"), [((131, 100), (64, 48)), ((13, 60), (13, 64)), ((50, 29), (64, 37))])
def test_reference_images_use_bilinear_and_truncated_sizes_on_white(size, placed):
    w, h = size
    pixels = np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    media = [image("face.png", pixels)]
    plan = plan_for(Task.IMAGE_REFERENCE, media, width=64, height=64)
    inputs = prepare_vace_inputs(plan, media)
    scale = min(64 / h, 64 / w)
    assert (int(w * scale), int(h * scale)) == placed  # int(), not round(): 131x100 → 64x48 (48.85), not 64x49
    np.testing.assert_allclose(inputs.references[0].numpy(), ref_contain(pixels, 64, 64), atol=1e-6)
    assert inputs.size == (64, 64)  # references never change the output size


def test_video_reference_with_two_references_in_order():
    tall = bands(16, 8, [GREEN, RED], axis=0)
    square = solid(20, 20, BLUE)[0]
    media = [image("a.png", tall), image("b.png", square)]
    plan = plan_for(Task.VIDEO_REFERENCE, media, width=64, height=32, num_frames=5)
    inputs = prepare_vace_inputs(plan, media)

    assert_shapes(inputs, 5, 32, 64, refs=2)
    first, second = inputs.references
    np.testing.assert_allclose(first.numpy(), ref_contain(tall, 64, 32), atol=1e-6)
    np.testing.assert_allclose(second.numpy(), ref_contain(square, 64, 32), atol=1e-6)
    assert torch.equal(first[:, :24], torch.ones(32, 24, 3))
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
    keep = comfy_mask == 0  # kept pixels round-trip; masked ones are painted grey 128 as VACE's annotator does
    assert (control_video - comfy_video)[keep].abs().max() <= 0.5 / 255.0 + ATOL
    assert torch.equal(control_video[~keep], torch.full_like(control_video[~keep], 128 / 255))
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
