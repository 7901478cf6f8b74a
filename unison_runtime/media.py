"""Reading and writing images, videos and masks as plain uint8 frame arrays.

Kept free of torch so planning and the CLI stay light; the engine and the nodes convert.
Sizes are checked from headers before anything large is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MediaError
from .instruction import media_kind

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_VIDEO_FRAMES = 1025
DEFAULT_VIDEO_FRAME_CAP = MAX_VIDEO_FRAMES


@dataclass(frozen=True)
class Medium:
    """One decoded medium: ``frames`` is uint8 ``[T, H, W, 3]`` (T == 1 for an image)."""

    name: str
    kind: str
    frames: np.ndarray
    fps: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])


def read_image(path: str | Path, name: str | None = None) -> Medium:
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise MediaError(
                    f"image {path.name} is {im.width}x{im.height}; at most {MAX_IMAGE_PIXELS} pixels are accepted"
                )
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except MediaError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise MediaError(f"cannot read image {path.name}: {exc}") from None
    return Medium(name=name or path.name, kind="image", frames=rgb[None].copy())


def read_video(path: str | Path, name: str | None = None, max_frames: int = DEFAULT_VIDEO_FRAME_CAP) -> Medium:
    import av

    path = Path(path)
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"video {path.name} has no video stream")
            stream = container.streams.video[0]
            if stream.width * stream.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"video {path.name} is {stream.width}x{stream.height}; too large")
            fps = float(stream.average_rate) if stream.average_rate else None
            for frame in container.decode(stream):
                if len(frames) >= max_frames:
                    raise MediaError(f"video {path.name} has more than {max_frames} frames")
                frames.append(frame.to_ndarray(format="rgb24"))
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot read video {path.name}: {exc}") from None
    if not frames:
        raise MediaError(f"video {path.name} has no frames")
    return Medium(name=name or path.name, kind="video", frames=np.stack(frames), fps=fps)


def read_medium(path: str | Path, name: str | None = None) -> Medium:
    """An image or a video, by extension."""
    kind = media_kind(str(path))
    return read_image(path, name) if kind == "image" else read_video(path, name)


def write_image(frame: np.ndarray, path: str | Path) -> Path:
    """Write one float [H, W, 3] frame in 0..1 (or uint8) as PNG."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(to_uint8(frame)).save(path)
    return path


def write_video(frames: np.ndarray, path: str | Path, fps: float = 24) -> Path:
    """Write [T, H, W, 3] frames (float 0..1 or uint8) as an H.264 mp4 at ``fps``."""
    import av

    path = Path(path)
    data = to_uint8(frames)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = data.shape[2] - data.shape[2] % 2, data.shape[1] - data.shape[1] % 2
        stream.pix_fmt = "yuv420p"
        for frame in data:
            video_frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frame[: stream.height, : stream.width]), format="rgb24"
            )
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path


def to_uint8(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
