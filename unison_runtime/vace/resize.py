"""Fitting user media to the plan's size: one filter, one crop rule, used for every task.

Two geometries, both centred:

* **cover** (source, control, mask and first/last frames): the medium is centre-cropped to the
  target aspect ratio, then resized to exactly the target size. The crop box is the one ComfyUI's
  ``common_upscale(..., crop="center")`` uses (integer, symmetric, Python ``round``), so frames we
  hand to ``WanVaceToVideo`` at the target size pass through its own resize unchanged.
* **contain** (reference images): the whole image, aspect kept, scaled to fit inside the target
  and centred on a white canvas, as Wan-VACE's reference ``prepare_source`` and diffusers'
  ``WanVACEPipeline`` do.

Colour frames are resized with antialiased bicubic (``torch.nn.functional.interpolate(...,
mode="bicubic", antialias=True)``, which matches PIL's BICUBIC when shrinking) and clamped to
0..1 because bicubic overshoots at hard edges. Masks are binarized first and resized with
``nearest-exact``, so they stay exactly 0/1 and their edges do not move by half a pixel.
Frames are converted in small chunks so a long, large uint8 video never exists as one float copy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Frames converted to float at a time; bounds peak memory for long high-resolution videos.
CHUNK_FRAMES = 8
#: A mask pixel is "regenerate" when its brightest channel is at least this (uint8, i.e. > 0.5).
MASK_THRESHOLD_U8 = 128


def center_crop_box(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)`` of the centred crop with the target's aspect ratio.

    Same arithmetic as ComfyUI's ``common_upscale(crop="center")``: only the axis that is too
    long is cropped, by ``round(excess / 2)`` on each side.
    """
    left = top = 0
    if width * target_height > height * target_width:  # too wide
        left = round((width * target_height - height * target_width) / (2 * target_height))
    elif width * target_height < height * target_width:  # too tall
        top = round((height * target_width - width * target_height) / (2 * target_width))
    crop_w = max(1, width - 2 * left)
    crop_h = max(1, height - 2 * top)
    return min(left, width - crop_w), min(top, height - crop_h), crop_w, crop_h


def contain_size(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """``(width, height)`` of the largest aspect-kept size that fits inside the target."""
    scale = min(target_width / width, target_height / height)
    new_w = min(target_width, max(1, round(width * scale)))
    new_h = min(target_height, max(1, round(height * scale)))
    return new_w, new_h


def _rgb_u8(frames: np.ndarray) -> np.ndarray:
    """[T,H,W,C] uint8 with C in (1, 3, 4) → [T,H,W,3] (grey replicated, alpha dropped)."""
    channels = frames.shape[-1]
    if channels == 1:
        return np.repeat(frames, 3, axis=-1)
    return frames[..., :3]


def _resize_chw(x: torch.Tensor, width: int, height: int, *, mask: bool) -> torch.Tensor:
    """Resize ``[N,C,h,w]`` to ``[N,C,height,width]``; identity when the size already matches."""
    if x.shape[-2:] == (height, width):
        return x
    if mask:
        return F.interpolate(x, size=(height, width), mode="nearest-exact")
    out = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def cover_frames(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 ``[T,h,w,C]`` → float32 ``[T,height,width,3]`` in 0..1: centre crop, then bicubic (AA)."""
    _t, h, w, _c = frames.shape
    left, top, cw, ch = center_crop_box(w, h, width, height)
    out = torch.empty((frames.shape[0], height, width, 3), dtype=torch.float32)
    for start in range(0, frames.shape[0], CHUNK_FRAMES):
        chunk = _rgb_u8(frames[start : start + CHUNK_FRAMES, top : top + ch, left : left + cw])
        x = torch.tensor(chunk, dtype=torch.float32).div_(255.0).permute(0, 3, 1, 2)
        out[start : start + x.shape[0]] = _resize_chw(x, width, height, mask=False).permute(0, 2, 3, 1)
    return out


def binarize_mask(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[T,h,w,C]`` → bool ``[T,h,w]``: True (regenerate) where the brightest channel > 0.5.

    The brightest channel rather than luma, so a mask painted in any bright colour (pure red has
    a luma of only 0.3) still counts; for the usual black/white masks every channel agrees.
    """
    return frames.max(axis=-1) >= MASK_THRESHOLD_U8


def cover_mask(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Mask frames (uint8 ``[T,h,w,C]``, any colours) → float32 ``[T,height,width]`` in {0, 1}.

    Same centre crop as :func:`cover_frames`, so a mask of the source's size lines up with it;
    binarized before a ``nearest-exact`` resize, so the result is exactly 0 or 1.
    """
    _t, h, w, _c = frames.shape
    left, top, cw, ch = center_crop_box(w, h, width, height)
    out = torch.empty((frames.shape[0], height, width), dtype=torch.float32)
    for start in range(0, frames.shape[0], CHUNK_FRAMES):
        chunk = binarize_mask(frames[start : start + CHUNK_FRAMES, top : top + ch, left : left + cw])
        x = torch.tensor(chunk, dtype=torch.float32)[:, None]
        out[start : start + x.shape[0]] = _resize_chw(x, width, height, mask=True)[:, 0]
    return out


def contain_on_white(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """One uint8 ``[h,w,C]`` image → float32 ``[height,width,3]``: aspect kept, centred on white.

    Placement as in Wan-VACE's reference: offsets ``(target - size) // 2``; the canvas is 1.0.
    """
    h, w = image.shape[:2]
    new_w, new_h = contain_size(w, h, width, height)
    x = torch.tensor(_rgb_u8(image[None]), dtype=torch.float32).div_(255.0).permute(0, 3, 1, 2)
    resized = _resize_chw(x, new_w, new_h, mask=False)[0].permute(1, 2, 0)
    canvas = torch.ones((height, width, 3), dtype=torch.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas
