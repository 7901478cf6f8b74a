"""Fitting user media to the output size the way Unison's stage two does it.

Two geometries, both centred:

* **cover** (source, control and mask frames, image-to-video frames): VACE's
  ``VaceVideoProcessor.resize_crop`` (ali-vilab/VACE ``vace/models/utils/preprocessor.py``): scale
  by ``max(out_w / w, out_h / h)`` to ``round(scale * h) x round(scale * w)`` with antialiased
  bicubic **on the uint8 frames** (so the result is rounded and clamped to 0..255 as there), then
  crop the centre at ``(size - out) // 2``. Masks go through the same resize, so their edges come
  out soft exactly as the reference's mask clip does.
* **contain** (reference images): Unison's ``WanVaceProj.prepare_source``: the whole image scaled
  by ``min(out_h / h, out_w / w)`` to ``int(h * scale) x int(w * scale)`` (truncated) with plain
  bilinear (no antialiasing), pasted at ``(out - size) // 2`` on a white canvas.

Frames are converted in small chunks so a long, large uint8 video never exists as one float copy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MediaError

#: Frames resized at a time; bounds peak memory for long high-resolution videos.
CHUNK_FRAMES = 8


def _rgb_u8(frames: np.ndarray) -> np.ndarray:
    """[T,H,W,C] uint8 with C in (1, 3, 4) → [T,H,W,3] (grey replicated, alpha dropped)."""
    channels = frames.shape[-1]
    if channels == 1:
        return np.repeat(frames, 3, axis=-1)
    return frames[..., :3]


def cover_size(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """(width, height) a ``width`` x ``height`` frame is resized to before the centre crop."""
    scale = max(target_width / width, target_height / height)
    return round(scale * width), round(scale * height)


def _resize_crop_u8(chunk: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 ``[T,h,w,C]`` → uint8 ``[T,C,height,width]``: VACE's ``resize_crop`` before normalising."""
    # Same layout as the reference ([T,H,W,C] permuted, i.e. channels-last), so the same kernel runs.
    video = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2)
    ih, iw = video.shape[2:]
    if (ih, iw) != (height, width):
        new_w, new_h = cover_size(iw, ih, width, height)
        video = F.interpolate(video, size=(new_h, new_w), mode="bicubic", antialias=True)
        x1, y1 = (video.shape[3] - width) // 2, (video.shape[2] - height) // 2
        video = video[:, :, y1 : y1 + height, x1 : x1 + width]
    return video


def cover_frames(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 ``[T,h,w,C]`` → float32 ``[T,height,width,3]`` in 0..1: VACE's resize and centre crop."""
    out = torch.empty((frames.shape[0], height, width, 3), dtype=torch.float32)
    for start in range(0, frames.shape[0], CHUNK_FRAMES):
        resized = _resize_crop_u8(_rgb_u8(frames[start : start + CHUNK_FRAMES]), width, height)
        out[start : start + resized.shape[0]] = resized.permute(0, 2, 3, 1).float().div_(255.0)
    return out


def cover_mask(masks: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Binary uint8 masks ``[T,h,w]`` (0 / 255) → float32 ``[T,height,width]`` in 0..1.

    Resized like the frames (the reference saves its mask as a video and reads it back through
    the same ``resize_crop``), so edges between 0 and 1 come out soft; the sampler thresholds
    them at 0.5 where VACE does and keeps them soft where VACE does.
    """
    out = torch.empty((masks.shape[0], height, width), dtype=torch.float32)
    for start in range(0, masks.shape[0], CHUNK_FRAMES):
        chunk = np.repeat(masks[start : start + CHUNK_FRAMES, :, :, None], 3, axis=-1)  # the reference's 3 channels
        resized = _resize_crop_u8(chunk, width, height)[:, 0]
        out[start : start + resized.shape[0]] = resized.float().div_(255.0)
    return out


def luma_u8(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[...,C]`` → uint8 ``[...]``: Pillow's ``convert("L")`` (ITU-R 601-2, its integer rounding).

    VACE reads a mask file with ``Image.open(path).convert("L")``; an RGB frame is reduced the same way.
    """
    if frames.shape[-1] == 1:
        return frames[..., 0]
    rgb = frames[..., :3].astype(np.uint32)
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def contain_size(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """(width, height) of a reference image on the canvas: ``int()`` of the scaled sides, as the reference."""
    scale = min(target_height / height, target_width / width)
    return int(width * scale), int(height * scale)


def contain_on_white(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """One uint8 ``[h,w,C]`` image → float32 ``[height,width,3]``: aspect kept, centred on white.

    Unison's ``prepare_source``: bilinear without antialiasing, truncated size, offsets
    ``(target - size) // 2``; an image already at the target size is used as it is.
    """
    h, w = image.shape[:2]
    x = torch.tensor(_rgb_u8(image[None]), dtype=torch.float32).div_(255.0).permute(0, 3, 1, 2)
    if (h, w) == (height, width):
        return x[0].permute(1, 2, 0).contiguous()
    new_w, new_h = contain_size(w, h, width, height)
    canvas = torch.ones((height, width, 3), dtype=torch.float32)
    if new_w < 1 or new_h < 1:
        raise MediaError(f"a {w}x{h} reference image shrinks to {new_w}x{new_h} on the {width}x{height} canvas; "
                         "crop it to a less extreme aspect ratio")
    resized = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def nearest_resize(masks: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 ``[T,h,w]`` → ``[T,height,width]`` by nearest neighbour (``cv2.INTER_NEAREST``'s floor rule).

    What VACE's inpainting annotator means to do with a mask of another size than the source.
    """
    x = torch.from_numpy(np.ascontiguousarray(masks))[:, None]
    return F.interpolate(x, size=(height, width), mode="nearest")[:, 0].numpy()
