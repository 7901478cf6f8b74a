"""What stage one reads: chat messages for the planning prompt and for the understanding pass.

The planning prompt is the reference's: one user turn holding the instruction with each media
reference replaced by ``<IMGPAD>``/``<VIDPAD>``; no pixels. The understanding pass differs from
the reference on purpose: the reference attached only the first visual, always as an image;
here every referenced image goes in as an image and every video as a video, each at the place
the instruction referenced it (Qwen's chat content list), so "compare ###a.png### with
###b.mp4###" shows the model both, in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MediaError
from ..instruction import REFERENCE_PATTERN

if TYPE_CHECKING:
    from ..instruction import Instruction
    from ..media import Medium

#: Frames a video contributes to the understanding pass: sampled uniformly over the whole clip.
#: Qwen2.5-VL pairs frames (temporal patch 2), so 16 frames are 8 temporal steps; with the
#: processor's per-frame pixel cap this keeps a clip at a few thousand tokens on the 3B model.
DEFAULT_MAX_VIDEO_FRAMES = 16
#: Frame rate assumed for media without one (image sequences): the pack's video default.
DEFAULT_VIDEO_FPS = 24.0


def planning_messages(instruction: Instruction) -> list[dict[str, Any]]:
    """The reference's planning prompt: the ``<IMGPAD>``/``<VIDPAD>`` text as one user turn."""
    return [{"role": "user", "content": [{"type": "text", "text": instruction.planning_text}]}]


def understanding_messages(instruction: Instruction) -> list[dict[str, Any]]:
    """One user turn with text pieces and an image/video item where each reference was written."""
    pieces = REFERENCE_PATTERN.split(instruction.text)
    texts, references = pieces[0::2], pieces[1::2]
    if len(references) != len(instruction.media):
        raise MediaError(
            f"instruction text has {len(references)} media references but the instruction lists "
            f"{len(instruction.media)}; parse it with parse_instruction"
        )
    content: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        if text.strip():
            content.append({"type": "text", "text": text})
        if index < len(references):
            content.append({"type": instruction.media[index].kind})
    if not content:
        content.append({"type": "text", "text": ""})
    return [{"role": "user", "content": content}]


def sample_frame_indices(total: int, cap: int) -> list[int]:
    """Uniformly spread indices over ``total`` frames, at most ``cap``, first and last included."""
    if total < 1:
        raise MediaError("a video with no frames cannot be shown to stage one")
    if cap < 1:
        raise MediaError(f"max_video_frames must be at least 1, got {cap}")
    if total <= cap:
        return list(range(total))
    return [round(float(i)) for i in np.linspace(0, total - 1, cap)]


def check_media(instruction: Instruction, media: Sequence[Medium]) -> None:
    """The decoded media must be the instruction's references, in order and of the same kinds."""
    if len(media) != len(instruction.media):
        raise MediaError(
            f"the instruction references {len(instruction.media)} media but {len(media)} were given; "
            "pass one decoded medium per ###reference###, in order"
        )
    for index, (ref, medium) in enumerate(zip(instruction.media, media, strict=True)):
        if medium.kind != ref.kind:
            raise MediaError(f"medium {index} ({ref.path}) is referenced as a {ref.kind} but a {medium.kind} was given")
        frames = medium.frames
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
            raise MediaError(
                f"medium {index} ({ref.path}) has frames {frames.dtype} {list(frames.shape)}; "
                "expected uint8 [T, H, W, 3]"
            )


def visual_inputs(
    media: Sequence[Medium], *, max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES
) -> tuple[list[Any], list[list[Any]], list[Any]]:
    """Images, sampled video frames (as PIL images) and video metadata for the Qwen processor."""
    from PIL import Image
    from transformers.video_utils import VideoMetadata

    images: list[Any] = []
    videos: list[list[Any]] = []
    metadata: list[Any] = []
    for medium in media:
        if medium.kind == "image":
            images.append(Image.fromarray(np.ascontiguousarray(medium.frames[0])))
            continue
        total = int(medium.frames.shape[0])
        indices = sample_frame_indices(total, max_video_frames)
        videos.append([Image.fromarray(np.ascontiguousarray(medium.frames[i])) for i in indices])
        width, height = medium.size
        metadata.append(
            VideoMetadata(
                total_num_frames=total,
                fps=float(medium.fps or DEFAULT_VIDEO_FPS),
                frames_indices=indices,
                width=width,
                height=height,
            )
        )
    return images, videos, metadata
