"""Reading and writing images, videos and masks as plain uint8 frame arrays.

Kept free of torch so planning and the CLI stay light; the engine and the nodes convert.

Media files come from strangers, so reading is defensive and every refusal is a
:class:`MediaError` naming the file:

* only regular files are opened (never a FIFO or a device), and only up to a size cap;
* the content must be what the extension says (a text file or a video named ``.png`` is
  refused), and the decoder is forced to that one format, so no other demuxer or image
  plugin ever parses the bytes;
* sizes and frame counts are checked from headers and a demux-only pass *before* anything is
  decoded, then again while decoding (headers can lie), against :class:`MediaLimits`;
* truncated or corrupt files, zero-frame videos and mid-stream size changes are refused
  rather than returned half-decoded.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import BinaryIO

import numpy as np

from .errors import MediaError, PathError
from .instruction import media_kind
from .paths import open_reference, open_regular_file

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_VIDEO_FRAMES = 1025

#: Extension → the one Pillow plugin allowed to parse it.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
#: Extension → the one FFmpeg demuxer allowed to parse it (no probing, so no HLS/concat/image2 tricks).
VIDEO_DEMUXERS = {".mp4": "mp4", ".mov": "mov", ".avi": "avi", ".webm": "webm", ".mkv": "matroska"}

# Content families recognised from a file's first bytes, and what each extension promises.
_FAMILY_NAMES = {
    "png": "a PNG image",
    "jpeg": "a JPEG image",
    "webp": "a WebP image",
    "bmp": "a BMP image",
    "gif": "a GIF image",
    "isobmff": "an MP4/QuickTime video",
    "matroska": "a Matroska/WebM video",
    "avi": "an AVI video",
    "text": "text",
}
_EXTENSION_FAMILY = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".webp": "webp",
    ".bmp": "bmp",
    ".mp4": "isobmff",
    ".mov": "isobmff",
    ".avi": "avi",
    ".webm": "matroska",
    ".mkv": "matroska",
}
_ISOBMFF_BOXES = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
_TRIM = "; trim or downscale it first"
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class MediaLimits:
    """Caps a medium must fit before it is decoded; the defaults suit a 24 GB machine.

    ``max_pixels`` applies to an image and to every video frame; ``max_decoded_bytes`` to the
    whole decoded uint8 RGB array of one medium; ``max_video_seconds`` to the declared
    duration; ``max_file_bytes`` to the file on disk.
    """

    max_pixels: int = MAX_IMAGE_PIXELS
    max_video_frames: int = MAX_VIDEO_FRAMES
    max_video_seconds: float = 600.0
    max_decoded_bytes: int = 4 << 30
    max_file_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        for field in ("max_pixels", "max_video_frames", "max_video_seconds", "max_decoded_bytes", "max_file_bytes"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"MediaLimits.{field} must be a positive number, got {value!r}")


DEFAULT_LIMITS = MediaLimits()


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


# --------------------------------------------------------------------------- opening and sniffing

MediaSource = str | Path | BinaryIO


def _label_and_suffix(source: MediaSource, name: str | None) -> tuple[str, str]:
    """The name shown in errors and the extension that decides the format."""
    if name is None:
        if not isinstance(source, str | Path):
            raise TypeError("reading media from an open file needs name= (its extension decides the format)")
        name = Path(source).name
    return name, PurePath(name).suffix.lower()


@contextlib.contextmanager
def _open_source(source: MediaSource, label: str, limits: MediaLimits) -> Iterator[BinaryIO]:
    """A seekable binary file for ``source``: a regular file not larger than the cap."""
    if isinstance(source, str | Path):
        try:
            fh = open_regular_file(source, what="media file")
        except PathError as exc:
            raise MediaError(f"cannot read {label}: {exc}") from None
        with fh:
            _check_file_size(fh, label, limits)
            yield fh
        return
    if not (hasattr(source, "read") and hasattr(source, "seek")):
        raise TypeError(f"expected a path or a seekable binary file for {label}, got {type(source).__name__}")
    _check_file_size(source, label, limits)
    yield source


def _check_file_size(fh: BinaryIO, label: str, limits: MediaLimits) -> None:
    size = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    if size == 0:
        raise MediaError(f"{label} is an empty file (0 bytes)")
    if size > limits.max_file_bytes:
        raise MediaError(f"{label} is {size} bytes; at most {limits.max_file_bytes} bytes are accepted")


def sniff_family(head: bytes) -> str | None:
    """What a file's first bytes say it is (``"png"``, ``"isobmff"``, ``"text"``...), or ``None``."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if len(head) >= 8 and head[4:8] in _ISOBMFF_BOXES:
        return "isobmff"
    if head.startswith(b"BM") and len(head) >= 14:
        return "bmp"
    if head and all(32 <= b < 127 or b in b"\t\n\r" for b in head):
        return "text"
    return None


def _check_content(fh: BinaryIO, label: str, suffix: str) -> None:
    """Refuse a file whose first bytes are positively something other than its extension says."""
    head = fh.read(64)
    fh.seek(0)
    expected = _EXTENSION_FAMILY[suffix]
    found = sniff_family(head)
    if found is not None and found != expected:
        raise MediaError(
            f"{label}: the content is {_FAMILY_NAMES[found]}, but the extension {suffix} says "
            f"{_FAMILY_NAMES[expected]}; rename or convert the file so both agree"
        )


@contextlib.contextmanager
def _open_checked(
    source: MediaSource, name: str | None, kind: str, limits: MediaLimits
) -> Iterator[tuple[BinaryIO, str, str]]:
    """``(file, label, decoder)`` for a medium of ``kind``, once every check that needs no decoding passed.

    The extension picks the one decoder allowed to parse the file (Pillow plugin or FFmpeg
    demuxer), the file must be a regular one within the size cap, and its first bytes must not
    say it is something else.
    """
    label, suffix = _label_and_suffix(source, name)
    known = IMAGE_FORMATS if kind == "image" else VIDEO_DEMUXERS
    decoder = known.get(suffix)
    if decoder is None:
        raise MediaError(
            f"{label} has the extension {suffix or '(none)'}, which is not a supported {kind} format; "
            f"expected one of {', '.join(sorted(known))}"
        )
    with _open_source(source, label, limits) as fh:
        _check_content(fh, label, suffix)
        yield fh, label, decoder


# --------------------------------------------------------------------------- images


def _to_rgb(im: object) -> np.ndarray:
    """Any Pillow mode → uint8 ``[H, W, 3]``; 16-bit greys are scaled, not clipped at 255."""
    mode = im.mode  # type: ignore[attr-defined]
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
    if mode != "RGB":
        im = im.convert("RGB")  # type: ignore[attr-defined]
    return np.asarray(im, dtype=np.uint8)


def read_image(
    path: MediaSource, name: str | None = None, *, limits: MediaLimits | None = None
) -> Medium:
    """Decode one image after checking its content type and header size against ``limits``.

    ``path`` may be an open binary file (e.g. from :func:`unison_runtime.paths.open_reference`);
    then ``name`` is required. Animated images give their first frame.
    """
    from PIL import Image, UnidentifiedImageError

    limits = limits or DEFAULT_LIMITS
    with _open_checked(path, name, "image", limits) as (fh, label, plugin):
        try:
            im = Image.open(fh, formats=[plugin])  # header only: nothing is decoded yet
        except Image.DecompressionBombError as exc:
            claimed = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{claimed.group(1)} pixels" if claimed else "a huge size"
            raise MediaError(
                f"{label} declares {size} (a decompression bomb?); at most {limits.max_pixels} pixels are accepted"
            ) from None
        except UnidentifiedImageError:
            raise MediaError(f"{label} is not a readable {plugin} image (unrecognised or damaged header)") from None
        except Exception as exc:  # Pillow raises many types for damaged headers
            raise MediaError(f"{label} is not a readable {plugin} image: {exc}") from None
        with im:
            width, height = im.size
            if width <= 0 or height <= 0:
                raise MediaError(f"{label} declares an empty size {width}x{height}")
            if width * height > limits.max_pixels:
                raise MediaError(
                    f"{label} is {width}x{height} = {width * height} pixels; at most {limits.max_pixels} are accepted"
                )
            if width * height * 3 > limits.max_decoded_bytes:
                raise MediaError(
                    f"{label} ({width}x{height}) would decode to more than {limits.max_decoded_bytes} bytes"
                )
            try:
                rgb = _to_rgb(im)
            except Exception as exc:  # truncated data, bad CRC, broken deflate stream...
                raise MediaError(f"{label} is truncated or corrupt and cannot be decoded: {exc}") from None
    return Medium(name=name or label, kind="image", frames=rgb[None].copy())


# --------------------------------------------------------------------------- videos


def _reason(exc: BaseException) -> str:
    """FFmpeg's own words without the file-descriptor name PyAV appends."""
    return str(getattr(exc, "strerror", None) or exc)


@dataclass(frozen=True)
class _VideoProbe:
    width: int
    height: int
    packets: int
    duration: float | None
    duration_is_stream: bool
    fps: float | None


def _open_container(fh: BinaryIO, label: str, demuxer: str) -> object:
    import av

    fh.seek(0)
    try:
        return av.open(fh, mode="r", format=demuxer, options={"protocol_whitelist": "file"})
    except Exception as exc:
        raise MediaError(
            f"{label} is not a readable {demuxer} video (damaged, truncated, or not that format): {_reason(exc)}"
        ) from None


def _declared_seconds(stream: object, container: object) -> tuple[float | None, bool]:
    """The video stream's declared duration in seconds (else the container's), and which it was."""
    duration, time_base = stream.duration, stream.time_base  # type: ignore[attr-defined]
    if duration and time_base:
        return float(duration * time_base), True
    if container.duration:  # type: ignore[attr-defined]
        return container.duration / 1_000_000, False  # type: ignore[attr-defined]
    return None, False


def _probe_video(fh: BinaryIO, label: str, demuxer: str, limits: MediaLimits, cap: int) -> _VideoProbe:
    """Header checks and a demux-only frame count: nothing is decoded here."""
    with _open_container(fh, label, demuxer) as container:  # type: ignore[attr-defined]
        if not container.streams.video:
            raise MediaError(f"{label} has no video stream (zero frames or audio only)")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_pixels:
            raise MediaError(
                f"{label} is {width}x{height} = {width * height} pixels per frame; at most {limits.max_pixels}"
            )
        if stream.frames > cap:
            raise MediaError(f"{label} declares {stream.frames} frames; at most {cap} are accepted{_TRIM}")
        duration, from_stream = _declared_seconds(stream, container)
        if duration is not None and duration > limits.max_video_seconds:
            raise MediaError(
                f"{label} lasts {duration:.1f} s; at most {limits.max_video_seconds:g} s are accepted{_TRIM}"
            )
        fps = float(stream.average_rate) if stream.average_rate else None
        packets = 0
        try:
            for packet in container.demux(stream):
                if packet.size and not packet.is_discard:
                    packets += 1
                    if packets > cap:
                        raise MediaError(f"{label} has more than {cap} frames; at most {cap} are accepted{_TRIM}")
        except MediaError:
            raise
        except Exception as exc:
            raise MediaError(f"{label} is truncated or corrupt (while reading its packets): {_reason(exc)}") from None
    if packets == 0:
        raise MediaError(f"{label} has no frames (a video stream without any picture)")
    return _VideoProbe(width, height, packets, duration, from_stream, fps)


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames, first and last included."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def _check_not_truncated(label: str, probe: _VideoProbe, last_time: float | None, fps: float | None) -> None:
    """Frames that end well before the declared duration mean the file was cut short.

    Only the video stream's own duration is trusted (a container's may include a longer audio
    track); two frame intervals of slack absorb rounding.
    """
    if not probe.duration_is_stream or probe.duration is None or last_time is None or not fps:
        return
    end = last_time + 1.0 / fps
    if end < probe.duration - 2.0 / fps:
        raise MediaError(
            f"{label} is truncated: its frames end at {end:.2f} s but it declares {probe.duration:.2f} s"
        )


def read_video(
    path: MediaSource,
    name: str | None = None,
    max_frames: int | None = None,
    *,
    limits: MediaLimits | None = None,
    sample_frames: int | None = None,
) -> Medium:
    """Decode a video after checking size, duration and frame count without decoding.

    ``max_frames`` overrides ``limits.max_video_frames``. With ``sample_frames=N`` only N frames
    spread evenly over the video are kept (for understanding), so memory stays small; the
    caps still apply to the whole video. ``path`` may be an open binary file with ``name``.
    """
    limits = limits or DEFAULT_LIMITS
    cap = limits.max_video_frames if max_frames is None else max_frames
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"max_frames must be a positive integer, got {cap!r}")
    if sample_frames is not None and (isinstance(sample_frames, bool) or not isinstance(sample_frames, int)
                                      or sample_frames < 1):
        raise ValueError(f"sample_frames must be a positive integer or None, got {sample_frames!r}")
    with _open_checked(path, name, "video", limits) as (fh, label, demuxer):
        probe = _probe_video(fh, label, demuxer, limits, cap)
        keep_count = probe.packets if sample_frames is None else min(sample_frames, probe.packets)
        if keep_count * probe.width * probe.height * 3 > limits.max_decoded_bytes:
            raise MediaError(
                f"{label}: {keep_count} frames of {probe.width}x{probe.height} would decode to more than "
                f"{limits.max_decoded_bytes} bytes{_TRIM}"
            )
        wanted = None if sample_frames is None else set(sample_indices(probe.packets, sample_frames))
        frames, last_time, fps = _decode(fh, label, demuxer, probe, limits, cap, wanted)
    _check_not_truncated(label, probe, last_time, fps)
    return Medium(name=name or label, kind="video", frames=np.stack(frames), fps=fps)


def _decode(
    fh: BinaryIO,
    label: str,
    demuxer: str,
    probe: _VideoProbe,
    limits: MediaLimits,
    cap: int,
    wanted: set[int] | None,
) -> tuple[list[np.ndarray], float | None, float | None]:
    """Decode frame by frame, keeping the wanted ones, stopping at the first broken cap."""
    frames: list[np.ndarray] = []
    kept_bytes = 0
    count = 0
    last_time: float | None = None
    size: tuple[int, int] | None = None
    last_frame = None
    with _open_container(fh, label, demuxer) as container:  # type: ignore[attr-defined]
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else probe.fps
        try:
            for frame in container.decode(stream):
                if count >= cap:
                    raise MediaError(f"{label} has more than {cap} frames; at most {cap} are accepted{_TRIM}")
                if frame.width * frame.height > limits.max_pixels:
                    raise MediaError(f"{label} frame {count} is {frame.width}x{frame.height}; at most "
                                     f"{limits.max_pixels} pixels")
                if size is None:
                    size = (frame.width, frame.height)
                elif size != (frame.width, frame.height):
                    raise MediaError(f"{label} changes size mid-stream, from {size[0]}x{size[1]} to "
                                     f"{frame.width}x{frame.height} at frame {count}")
                if wanted is None or count in wanted:
                    kept_bytes += frame.width * frame.height * 3
                    if kept_bytes > limits.max_decoded_bytes:
                        raise MediaError(f"{label} decodes to more than {limits.max_decoded_bytes} bytes")
                    frames.append(frame.to_ndarray(format="rgb24"))
                last_frame = frame
                if frame.time is not None:
                    last_time = frame.time if last_time is None else max(last_time, frame.time)
                count += 1
        except MediaError:
            raise
        except Exception as exc:
            raise MediaError(
                f"{label} is truncated or corrupt (decoding failed at frame {count}): {_reason(exc)}"
            ) from None
        if wanted is not None and last_frame is not None:
            # Fewer frames decoded than packets counted: the missing samples are the true last frame.
            missing = len(wanted) - len(frames)
            frames.extend(last_frame.to_ndarray(format="rgb24") for _ in range(max(0, missing)))
    if not frames:
        raise MediaError(f"{label} has no decodable frames")
    if fps is not None and (not math.isfinite(fps) or fps <= 0):
        fps = None
    return frames, last_time, fps


def read_medium(
    path: MediaSource,
    name: str | None = None,
    *,
    limits: MediaLimits | None = None,
    sample_frames: int | None = None,
) -> Medium:
    """An image or a video, by the extension of ``name`` (or of ``path``)."""
    label, _ = _label_and_suffix(path, name)
    try:
        kind = media_kind(label)
    except PathError as exc:
        raise MediaError(str(exc)) from None
    if kind == "image":
        return read_image(path, name, limits=limits)
    return read_video(path, name, limits=limits, sample_frames=sample_frames)


def read_reference(
    reference: str,
    roots: Sequence[str | Path],
    *,
    limits: MediaLimits | None = None,
    sample_frames: int | None = None,
) -> Medium:
    """Read a ``###reference###`` from inside ``roots``: resolved, opened and decoded in one step.

    The file is opened through :func:`paths.open_reference`, so a link swapped in after the
    check cannot redirect the read; this is the way to read user-named media.
    """
    with open_reference(reference, roots) as handle:
        return read_medium(handle, name=reference, limits=limits, sample_frames=sample_frames)


# --------------------------------------------------------------------------- writing


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
