"""Which frames of a source clip stage two reads, and at what size: VACE's video processor rules.

Unison hands every source (an edited image or video, a control clip, an image-to-video frame) to
``WanVace.prepare_source``, whose ``VaceVideoProcessor`` (ali-vilab/VACE
``vace/models/utils/preprocessor.py``, ``_get_frameid_bbox_adjust_last``, ``load_video_batch``)

* sizes the output by the **source's own aspect ratio** at the plan's area, counted in 16x16
  latent patches and never above the source's own patch count (a small source is not upscaled);
* keeps the **whole clip**, resampled into the token budget: ``(L - 1) // 4 + 1`` latent frames
  at most, as many as the budget holds at the output's area, read at evenly spaced timestamps
  over the clip's duration. A small source therefore gives more frames than a large one.

The reference's budget is 81 frames at the plan's area; a plan of another length scales it
(so an asked-for length still counts), see the fidelity table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import MediaError
from ..plan import MAX_FRAMES, MAX_SIDE

#: Pixels per latent patch side (Wan's VAE stride 8 x the transformer's patch 2) and frames per latent frame.
PATCH = 16
TEMPORAL = 4
#: The frame rate assumed for a clip that carries none (a ComfyUI image batch); the ids barely depend on it.
DEFAULT_FPS = 24.0
#: The reference budgets tokens for 81 frames (21 latent frames) at the plan's area.
REFERENCE_LATENT_FRAMES = 21


def reference_seq_len(area: int) -> int:
    """The token budget Unison's ``WanVaceProj.prepare_source`` sets for a plan of ``area`` pixels."""
    if area == 720 * 1280:
        return 75600
    if area == 480 * 832:
        return 32760
    return area // 12


def token_budget(area: int, frames: int) -> int:
    """The reference's token budget, scaled to a plan of ``frames`` frames (81, the default, is the reference's)."""
    latent = (frames - 1) // TEMPORAL + 1
    seq_len = reference_seq_len(area)
    return seq_len if latent == REFERENCE_LATENT_FRAMES else seq_len * latent // REFERENCE_LATENT_FRAMES


@dataclass(frozen=True)
class ClipFit:
    """How a source is read: output ``width`` x ``height`` and the source ``frame_ids`` to use, in order."""

    width: int
    height: int
    frame_ids: tuple[int, ...]

    @property
    def num_frames(self) -> int:
        return len(self.frame_ids)


def frame_ids(source_frames: int, count: int, fps: float | None = None) -> tuple[int, ...]:
    """The ``count`` frame ids ``_get_frameid_bbox_adjust_last`` reads from a clip of ``source_frames``.

    Frame ``i`` spans ``[i / fps, (i + 1) / fps]`` (decord's timestamps, kept in float32 as there);
    ``count`` timestamps evenly spaced from 0 to the middle of the last frame each take the first
    frame whose span holds them.
    """
    fps = float(fps or DEFAULT_FPS)
    index = np.arange(source_frames, dtype=np.float64)
    spans = np.stack([index / fps, (index + 1) / fps], axis=1).astype(np.float32)
    duration = spans[-1].mean()
    timestamps = np.linspace(0.0, duration, count)
    inside = np.logical_and(timestamps[:, None] >= spans[None, :, 0], timestamps[:, None] <= spans[None, :, 1])
    return tuple(int(i) for i in np.argmax(inside, axis=1))


def fit_clip(
    width: int,
    height: int,
    source_frames: int,
    *,
    plan_width: int,
    plan_height: int,
    plan_frames: int,
    fixed_size: bool = False,
    fps: float | None = None,
    label: str = "the source",
) -> ClipFit:
    """The size and frames a ``width`` x ``height`` clip of ``source_frames`` is read at.

    ``_get_frameid_bbox_adjust_last`` line by line: the area in patches is the smallest of the
    token budget, the plan's area and the source's own patches; the latent frames are the clip's,
    at most what the budget holds at that area; the height in patches is
    ``round(sqrt(area * h / w))`` and the width ``int(area / height)``. ``fixed_size`` keeps the
    plan's width and height (the clip then covers them) and only the frames follow the rule.
    """
    area = plan_width * plan_height
    seq_len = token_budget(area, plan_frames)
    if fixed_size:
        area_z = area / (PATCH * PATCH)
    else:
        area_z = min(seq_len, area / (PATCH * PATCH), (height // PATCH) * (width // PATCH))
        if area_z < 1:
            raise MediaError(f"{label} is {width}x{height}: at least {PATCH}x{PATCH} pixels are needed to size the "
                             "output by its aspect ratio (ask for a size, e.g. 832x480, to use it anyway)")
    latent = min((source_frames - 1) // TEMPORAL + 1, int(seq_len / area_z))
    if fixed_size:
        out_w, out_h = plan_width, plan_height
    else:
        target_area_z = min(area_z, int(seq_len / latent))
        oh = round(math.sqrt(target_area_z * (height / width)))
        ow = int(target_area_z / oh) if oh else 0
        out_w, out_h = ow * PATCH, oh * PATCH
        if not (PATCH <= out_w <= MAX_SIDE and PATCH <= out_h <= MAX_SIDE):
            raise MediaError(f"{label} is {width}x{height}: keeping its aspect ratio at the plan's area needs "
                             f"{out_w}x{out_h}, outside [{PATCH}, {MAX_SIDE}] (ask for a size, e.g. 832x480)")
    count = min((latent - 1) * TEMPORAL + 1, MAX_FRAMES)
    return ClipFit(out_w, out_h, frame_ids(source_frames, count, fps))
