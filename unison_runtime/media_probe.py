"""What a planner may know about a medium without decoding it for stage two: shape, length, mask-likeness.

The rule planner reads words first; where they are silent it looks at the media (DESIGN section 6):
a two-level single-channel image or video is a mask candidate, an image's shape sets the frame's
aspect, a video's length and rate set the plan's. Two sources, both cheap:

* :func:`probe_file` - headers plus one small thumbnail, with Pillow (images) or PyAV (videos),
  imported only when a file is probed, so ``python -m unison_runtime plan`` stays light;
* :func:`info_from_medium` - the same facts from an already decoded :class:`~unison_runtime.media.Medium`.

Nothing here raises for an unreadable file: the planner then simply knows less (``None``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .instruction import Instruction
    from .media import Medium

#: Side of the thumbnail the two-level test looks at (enough to tell a mask from a photo).
_THUMB = 64
#: Pixels within this distance of black or white count as "a level" (JPEG noise around a mask's edge).
_LEVEL_TOLERANCE = 24
#: Share of thumbnail pixels that must sit on the two levels.
_LEVEL_SHARE = 0.97


@dataclass(frozen=True)
class MediaInfo:
    """Shape and look of one medium: ``frames`` is 1 for an image; ``fps`` None when unknown."""

    width: int
    height: int
    frames: int = 1
    fps: float | None = None
    two_level: bool = False

    @property
    def portrait(self) -> bool:
        return self.height > self.width


def _two_level(values: Any, count: int) -> bool:
    """Whether ``count`` grey values (0..255) sit on black and white, both present: a binary mask."""
    dark = sum(1 for v in values if v <= _LEVEL_TOLERANCE)
    light = sum(1 for v in values if v >= 255 - _LEVEL_TOLERANCE)
    return dark > 0 and light > 0 and dark + light >= _LEVEL_SHARE * count


def _image_two_level(image: Any) -> bool:
    """Single channel (or R == G == B everywhere) and two levels, on a small thumbnail of a PIL image."""
    from PIL import Image

    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        grey = image.convert("L")
    else:
        rgb = image.convert("RGB")
        rgb.thumbnail((_THUMB, _THUMB), Image.Resampling.NEAREST)
        r, g, b = rgb.split()
        if r.tobytes() != g.tobytes() or g.tobytes() != b.tobytes():
            return False
        grey = r
    grey = grey.copy()
    grey.thumbnail((_THUMB, _THUMB), Image.Resampling.NEAREST)
    data = grey.tobytes()
    return _two_level(data, len(data))


def probe_file(path: str | Path, kind: str) -> MediaInfo | None:
    """Shape, length and mask-likeness of an image or video file; ``None`` when it cannot be read."""
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(path) as image:
                width, height = image.size
                if image.mode in ("RGB", "L"):
                    image.draft(image.mode, (_THUMB * 2, _THUMB * 2))  # JPEG: decode at a reduced scale
                return MediaInfo(width=width, height=height, two_level=_image_two_level(image))
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = int(stream.frames or 0)
            rate = float(stream.average_rate) if stream.average_rate else None
            if not frames and stream.duration and stream.time_base and rate:
                frames = round(float(stream.duration * stream.time_base) * rate)
            first = next(container.decode(stream), None)
            two_level = first is not None and _image_two_level(first.to_image())
            return MediaInfo(
                width=int(stream.codec_context.width), height=int(stream.codec_context.height),
                frames=max(frames, 1), fps=rate, two_level=two_level,
            )  # fmt: skip
    except Exception:  # any unreadable file means "nothing known", never a planning failure
        return None


def info_from_medium(medium: Medium) -> MediaInfo:
    """The same facts from a decoded medium (uint8 ``[T, H, W, 3]``); only its first frame is inspected."""
    frames = medium.frames
    first = frames[0, :: max(1, frames.shape[1] // _THUMB), :: max(1, frames.shape[2] // _THUMB)]
    channels_equal = bool((first[..., 0] == first[..., 1]).all() and (first[..., 1] == first[..., 2]).all())
    values = first[..., 0].ravel().tolist()
    return MediaInfo(
        width=int(frames.shape[2]),
        height=int(frames.shape[1]),
        frames=int(frames.shape[0]),
        fps=medium.fps,
        two_level=channels_equal and _two_level(values, len(values)),
    )


def with_media_info(instruction: Instruction, decoded: Sequence[Medium]) -> Instruction:
    """``instruction`` carrying what its decoded media show (size, length, rate, mask look), for planners
    that look at the media where the words are silent; kept as is when it already carries them.

    Every caller that decodes the media before planning (the CLI and ``UnisonPipeline``, the Planner
    node with media wired from the graph) goes through here, so a wired video informs the plan as the
    same video named by file does.
    """
    if instruction.media_info or not decoded:
        return instruction
    return dataclasses.replace(instruction, media_info=tuple(info_from_medium(medium) for medium in decoded))
