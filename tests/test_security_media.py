"""Hostile media files: each is refused with a MediaError naming the file, before big allocations.

Every hostile input is a real file made here: a PNG whose header claims 100k x 100k pixels, an
mp4 cut in half, a zero-frame AVI, a text file / an mp4 / a JPEG named .png, a PNG named .mp4,
a FIFO and a /dev/zero link named like media.
"""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import unison_runtime.media as media_mod
from unison_runtime.errors import MediaError
from unison_runtime.instruction import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from unison_runtime.media import (
    IMAGE_FORMATS,
    VIDEO_DEMUXERS,
    MediaLimits,
    Medium,
    read_image,
    read_medium,
    read_video,
    sample_indices,
    sniff_family,
    write_image,
    write_video,
)
from unison_runtime.paths import open_reference
from unison_runtime.plan import MediaRef, Task, assign_roles, default_plan
from unison_runtime.vace.sources import prepare_vace_inputs

av.logging.set_level(av.logging.PANIC)  # the hostile files make FFmpeg complain loudly; errors still raise


# --------------------------------------------------------------------------- builders


def noise_frames(count: int, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def gradient_frames(count: int, height: int = 32, width: int = 48) -> np.ndarray:
    """Smooth frames that survive H.264 almost unchanged, each a little brighter than the last."""
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 3 + y * 2).astype(np.int64)
    return np.stack([np.clip(base + 10 * t, 0, 255) for t in range(count)]).astype(np.uint8)[..., None].repeat(3, -1)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with IHDR's width/height patched and its CRC recomputed (a valid header)."""
    assert png[12:16] == b"IHDR"
    data = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + data) & 0xFFFFFFFF)
    return png[:16] + data + crc + png[33:]


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same baseline JPEG with its SOF0 frame size patched."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def faststart_mp4(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """An mp4 with its index (moov) first, so a cut keeps the header and loses frames."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def matroska(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """An mkv: Matroska stores no frame count, so only counting packets reveals the length."""
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def packet_ends(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        return [p.pos + p.size for p in container.demux(container.streams.video[0]) if p.size]


def refused(call, *fragments: str) -> str:
    with pytest.raises(MediaError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture()
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any video frame gets decoded: the refusal must come from headers and packets."""

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a frame was decoded before the refusal")

    monkeypatch.setattr(media_mod, "_decode", forbidden)


# --------------------------------------------------------------------------- sound inputs still work


def test_png_round_trip_is_exact(tmp_path: Path) -> None:
    pixels = noise_frames(1)[0]
    medium = read_image(write_image(pixels, tmp_path / "p.png"))
    assert medium.kind == "image" and medium.name == "p.png"
    assert medium.frames.shape == (1, 32, 48, 3) and medium.frames.dtype == np.uint8
    assert np.array_equal(medium.frames[0], pixels)


def test_mp4_round_trip_keeps_count_fps_and_content(tmp_path: Path) -> None:
    frames = gradient_frames(9)
    medium = read_medium(write_video(frames, tmp_path / "v.mp4", fps=8))
    assert medium.kind == "video" and medium.fps == 8.0
    assert medium.frames.shape == (9, 32, 48, 3)
    assert np.abs(medium.frames.astype(int) - frames.astype(int)).mean() < 4.0
    # Frame order survives: each frame is brighter than the one before.
    means = medium.frames.reshape(9, -1).mean(axis=1)
    assert np.all(np.diff(means) > 5)


@pytest.mark.parametrize(
    ("name", "container_format", "codec"),
    [("v.mp4", "mp4", "libx264"), ("v.mov", "mov", "libx264"), ("v.avi", "avi", "mpeg4"),
     ("v.mkv", "matroska", "libx264"), ("v.webm", "webm", "libvpx-vp9")],
)
def test_every_video_extension_reads_with_its_forced_demuxer(
    tmp_path: Path, name: str, container_format: str, codec: str
) -> None:
    frames = gradient_frames(5)
    with av.open(str(tmp_path / name), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    medium = read_medium(tmp_path / name)
    assert medium.kind == "video" and medium.fps == 8.0 and medium.frames.shape == (5, 32, 48, 3)
    assert np.abs(medium.frames.astype(int) - frames.astype(int)).mean() < 6.0


@pytest.mark.parametrize("name", ["i.png", "i.jpg", "i.jpeg", "i.webp", "i.bmp"])
def test_every_image_extension_reads_with_its_forced_plugin(tmp_path: Path, name: str) -> None:
    pixels = gradient_frames(1)[0]
    lossy = name.endswith(("jpg", "jpeg", "webp"))
    Image.fromarray(pixels).save(tmp_path / name, **({"quality": 95} if lossy else {}))
    medium = read_medium(tmp_path / name)
    assert medium.kind == "image" and medium.frames.shape == (1, 32, 48, 3)
    assert np.abs(medium.frames[0].astype(int) - pixels.astype(int)).mean() < 3.0


def test_extension_tables_match_the_instruction_parser() -> None:
    assert set(IMAGE_FORMATS) == set(IMAGE_EXTENSIONS)
    assert set(VIDEO_DEMUXERS) == set(VIDEO_EXTENSIONS)


def test_open_file_from_open_reference_is_read_by_name(tmp_path: Path) -> None:
    pixels = noise_frames(1, seed=4)[0]
    write_image(pixels, tmp_path / "p.png")
    with open_reference("p.png", [tmp_path]) as fh:
        medium = read_medium(fh, name="p.png")
    assert medium.name == "p.png" and np.array_equal(medium.frames[0], pixels)
    with open(tmp_path / "p.png", "rb") as fh, pytest.raises(TypeError, match="name="):
        read_image(fh)


def test_odd_image_modes_become_rgb(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))  # [8, 16]
    expected = np.repeat(grey[..., None], 3, axis=-1)
    Image.fromarray(grey, mode="L").save(tmp_path / "l.png")
    Image.fromarray(grey, mode="L").convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey, mode="L").convert("P").save(tmp_path / "p.png")
    for name in ("l.png", "rgba.png", "p.png"):
        frames = read_image(tmp_path / name).frames
        assert frames.shape == (1, 8, 16, 3), name
        assert np.array_equal(frames[0], expected), name


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    deep = (np.arange(8 * 16, dtype=np.uint16).reshape(8, 16) * 512 + 300).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode.startswith("I")
    frames = read_image(tmp_path / "depth.png").frames
    assert np.array_equal(frames[0, ..., 0], (deep >> 8).astype(np.uint8))
    assert np.array_equal(frames[0, ..., 0], frames[0, ..., 2])


def test_masks_of_another_size_and_channel_layout_are_fitted_to_the_plan(tmp_path: Path) -> None:
    """A 1-bit / 16-bit / RGBA mask at half the source's size becomes a {0,1} mask at the plan's size."""
    write_image(noise_frames(1, 32, 64)[0], tmp_path / "photo.png")
    half = np.zeros((16, 32), np.uint8)
    half[:, :16] = 255  # left half: regenerate
    Image.fromarray(half).convert("1").save(tmp_path / "m1.png")
    Image.fromarray(half.astype(np.uint16) * 257).save(tmp_path / "m16.png")
    Image.fromarray(half).convert("RGBA").save(tmp_path / "mrgba.png")
    for mask_name in ("m1.png", "m16.png", "mrgba.png"):
        media = [read_image(tmp_path / "photo.png"), read_image(tmp_path / mask_name)]
        assert media[1].frames.shape == (1, 16, 32, 3)
        refs = [MediaRef(m.name, m.kind) for m in media]
        roles = assign_roles(Task.IMAGE_EDITING, refs, mask_index=1, source_index=0)
        plan = default_plan(Task.IMAGE_EDITING, roles, mask_index=1, source_index=0, width=64, height=32)
        masks = prepare_vace_inputs(plan, media).masks
        assert masks.shape == (1, 32, 64), mask_name
        expected = np.zeros((32, 64), np.float32)
        expected[:, :32] = 1.0
        assert np.array_equal(masks[0].numpy(), expected), mask_name


# --------------------------------------------------------------------------- types and content


@pytest.mark.parametrize("name", ["anim.gif", "notes.txt", "noext", "scan.tiff", "doc.pdf", "clip.m3u8"])
def test_unsupported_extensions_are_refused_with_the_accepted_list(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(png_bytes(noise_frames(1)[0]))
    refused(lambda: read_medium(tmp_path / name), name, ".png", ".mp4")


def test_image_reader_refuses_video_extensions_and_back(tmp_path: Path) -> None:
    write_video(noise_frames(3), tmp_path / "v.mp4")
    write_image(noise_frames(1)[0], tmp_path / "p.png")
    refused(lambda: read_image(tmp_path / "v.mp4"), "v.mp4", "not a supported image format", ".png")
    refused(lambda: read_video(tmp_path / "p.png"), "p.png", "not a supported video format", ".mp4")


def test_text_named_png_is_refused(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("<html><script>alert(1)</script></html>\n")
    refused(lambda: read_medium(tmp_path / "fake.png"), "fake.png", "the content is text", "PNG image")


def test_mp4_named_png_is_refused(tmp_path: Path) -> None:
    write_video(noise_frames(3), tmp_path / "v.mp4")
    os.replace(tmp_path / "v.mp4", tmp_path / "still.png")
    refused(lambda: read_medium(tmp_path / "still.png"), "still.png", "MP4/QuickTime video", "a PNG image")


def test_png_named_mp4_is_refused(tmp_path: Path) -> None:
    """FFmpeg would happily play a PNG as a one-frame video; the extension promised an mp4."""
    (tmp_path / "clip.mp4").write_bytes(png_bytes(noise_frames(1)[0]))
    refused(lambda: read_medium(tmp_path / "clip.mp4"), "clip.mp4", "a PNG image", "MP4/QuickTime video")


def test_jpeg_named_png_and_png_named_jpg_are_refused(tmp_path: Path) -> None:
    Image.fromarray(noise_frames(1)[0]).save(tmp_path / "real.jpg", format="JPEG")
    os.replace(tmp_path / "real.jpg", tmp_path / "photo.png")
    refused(lambda: read_medium(tmp_path / "photo.png"), "photo.png", "a JPEG image", "a PNG image")
    (tmp_path / "photo.jpg").write_bytes(png_bytes(noise_frames(1)[0]))
    refused(lambda: read_medium(tmp_path / "photo.jpg"), "photo.jpg", "a PNG image", "a JPEG image")


def test_mp4_named_mkv_and_avi_named_mp4_are_refused(tmp_path: Path) -> None:
    write_video(noise_frames(3), tmp_path / "v.mp4")
    os.replace(tmp_path / "v.mp4", tmp_path / "v.mkv")
    refused(lambda: read_medium(tmp_path / "v.mkv"), "v.mkv", "MP4/QuickTime", "Matroska/WebM")


def test_unrecognised_bytes_are_refused_by_the_one_allowed_decoder(tmp_path: Path) -> None:
    junk = bytes(np.random.default_rng(1).integers(128, 256, 4096, dtype=np.uint8))  # no known signature
    (tmp_path / "junk.png").write_bytes(junk)
    (tmp_path / "junk.mp4").write_bytes(junk)
    refused(lambda: read_medium(tmp_path / "junk.png"), "junk.png", "not a readable PNG image")
    refused(lambda: read_medium(tmp_path / "junk.mp4"), "junk.mp4", "not a readable mp4 video")


def test_empty_files_are_refused(tmp_path: Path) -> None:
    for name in ("e.png", "e.mp4"):
        (tmp_path / name).write_bytes(b"")
        refused(lambda name=name: read_medium(tmp_path / name), name, "empty file")


def test_sniffing_recognises_the_families() -> None:
    assert sniff_family(png_bytes(noise_frames(1)[0])[:64]) == "png"
    assert sniff_family(b"\xff\xd8\xff\xe0\x00\x10JFIF") == "jpeg"
    assert sniff_family(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_family(b"RIFF\x00\x00\x00\x00AVI LIST") == "avi"
    assert sniff_family(b"\x00\x00\x00\x20ftypisom") == "isobmff"
    assert sniff_family(b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81") == "matroska"
    assert sniff_family(b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n") == "text"
    assert sniff_family(b"\x00\x01\x02\x03\x04\x05\x06\x07\x08") is None


# --------------------------------------------------------------------------- not regular files


def test_fifo_named_like_media_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.mp4")
    os.mkfifo(tmp_path / "pipe.png")
    refused(lambda: read_medium(tmp_path / "pipe.mp4"), "pipe.mp4", "named pipe")
    refused(lambda: read_medium(tmp_path / "pipe.png"), "pipe.png", "named pipe")


def test_dev_zero_behind_a_media_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "zero.mp4").symlink_to("/dev/zero")
    refused(lambda: read_medium(tmp_path / "zero.png"), "zero.png", "character device")
    refused(lambda: read_medium(tmp_path / "zero.mp4"), "zero.mp4", "character device")


def test_file_size_cap(tmp_path: Path) -> None:
    path = write_image(noise_frames(1)[0], tmp_path / "p.png")
    size = path.stat().st_size
    refused(lambda: read_image(path, limits=MediaLimits(max_file_bytes=size - 1)), "p.png", f"{size} bytes")
    assert read_image(path, limits=MediaLimits(max_file_bytes=size)).frames.shape == (1, 32, 48, 3)


def test_limits_must_be_positive() -> None:
    for field in ("max_pixels", "max_video_frames", "max_video_seconds", "max_decoded_bytes", "max_file_bytes"):
        with pytest.raises(ValueError, match=field):
            MediaLimits(**{field: 0})
    with pytest.raises(ValueError, match="max_frames"):
        read_video("x.mp4", max_frames=0)
    with pytest.raises(ValueError, match="sample_frames"):
        read_video("x.mp4", sample_frames=0)


# --------------------------------------------------------------------------- broken images


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    data = png_bytes(noise_frames(1, 64, 64)[0])
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    refused(lambda: read_image(tmp_path / "cut.png"), "cut.png", "truncated or corrupt")


def test_png_with_a_damaged_data_chunk_is_refused(tmp_path: Path) -> None:
    data = bytearray(png_bytes(noise_frames(1, 64, 64)[0]))
    at = data.index(b"IDAT") + 200
    data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    (tmp_path / "bad.png").write_bytes(bytes(data))
    refused(lambda: read_image(tmp_path / "bad.png"), "bad.png", "truncated or corrupt")


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(noise_frames(1, 64, 64)[0]).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    refused(lambda: read_image(tmp_path / "cut.jpg"), "cut.jpg", "truncated or corrupt")


def test_png_claiming_100k_by_100k_is_refused_without_allocating(tmp_path: Path) -> None:
    bomb = with_ihdr_size(png_bytes(noise_frames(1, 8, 8)[0]), 100_000, 100_000)
    assert zlib.crc32(bomb[12:29]) & 0xFFFFFFFF == struct.unpack(">I", bomb[29:33])[0]  # a valid header
    (tmp_path / "bomb.png").write_bytes(bomb)
    tracemalloc.start()
    try:
        refused(lambda: read_image(tmp_path / "bomb.png"), "bomb.png", "10000000000 pixels", "at most")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes were allocated while refusing a bomb"


def test_png_just_over_the_cap_names_its_size(tmp_path: Path) -> None:
    """Under Pillow's own bomb limit but over ours: our header check speaks, nothing is decoded."""
    big = with_ihdr_size(png_bytes(noise_frames(1, 8, 8)[0]), 5000, 5000)
    (tmp_path / "big.png").write_bytes(big)
    refused(lambda: read_image(tmp_path / "big.png"), "big.png", "5000x5000", f"at most {media_mod.MAX_IMAGE_PIXELS}")


def test_jpeg_claiming_65535_squared_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(noise_frames(1, 8, 8)[0]).save(buffer, format="JPEG")
    (tmp_path / "bomb.jpg").write_bytes(with_jpeg_size(buffer.getvalue(), 65535, 65535))
    refused(lambda: read_image(tmp_path / "bomb.jpg"), "bomb.jpg", f"{65535 * 65535} pixels")


def test_image_pixel_cap_is_configurable(tmp_path: Path) -> None:
    path = write_image(noise_frames(1, 64, 64)[0], tmp_path / "p.png")
    refused(lambda: read_image(path, limits=MediaLimits(max_pixels=32 * 32)), "64x64", "at most 1024")
    refused(lambda: read_image(path, limits=MediaLimits(max_decoded_bytes=64 * 64)), "p.png", "bytes")


# --------------------------------------------------------------------------- broken videos


def test_mp4_cut_in_half_is_refused(tmp_path: Path) -> None:
    data = write_video(noise_frames(9), tmp_path / "v.mp4", fps=8).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: now gone
    refused(lambda: read_video(tmp_path / "cut.mp4"), "cut.mp4", "not a readable mp4 video")


def test_mp4_cut_between_frames_is_refused_as_truncated(tmp_path: Path) -> None:
    """The index survives and nothing fails to decode; only the missing time gives the cut away."""
    path = faststart_mp4(tmp_path / "fs.mp4", noise_frames(9))
    assert read_video(path).frames.shape[0] == 9
    ends = packet_ends(path)
    (tmp_path / "cut.mp4").write_bytes(path.read_bytes()[: ends[3]])
    refused(lambda: read_video(tmp_path / "cut.mp4"), "cut.mp4", "truncated")


def test_mp4_cut_inside_a_frame_is_refused(tmp_path: Path) -> None:
    path = faststart_mp4(tmp_path / "fs.mp4", noise_frames(9))
    ends = packet_ends(path)
    (tmp_path / "cut.mp4").write_bytes(path.read_bytes()[: ends[3] + 100])
    refused(lambda: read_video(tmp_path / "cut.mp4"), "cut.mp4", "truncated")


def test_edit_list_that_hides_frames_is_not_mistaken_for_truncation(tmp_path: Path) -> None:
    """An mp4 whose edit list skips its first 3 coded frames is whole: 6 frames are shown."""
    frames = noise_frames(9)
    with av.open(str(tmp_path / "el.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts, video_frame.time_base = i - 3, Fraction(1, 8)
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    with av.open(str(tmp_path / "el.mp4")) as container:
        assert container.streams.video[0].frames == 9  # the header counts the hidden frames too
    assert read_video(tmp_path / "el.mp4").frames.shape == (6, 32, 48, 3)


def test_zero_frame_avi_is_refused(tmp_path: Path) -> None:
    with av.open(str(tmp_path / "empty.avi"), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        container.start_encoding()
    with av.open(str(tmp_path / "empty.avi")) as container:
        assert len(container.streams.video) == 1  # a real video stream, with nothing in it
    refused(lambda: read_video(tmp_path / "empty.avi"), "empty.avi", "no frames")


def test_zero_frame_mp4_is_refused(tmp_path: Path) -> None:
    with av.open(str(tmp_path / "empty.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        container.start_encoding()
    refused(lambda: read_video(tmp_path / "empty.mp4"), "empty.mp4", "no video stream")


def test_declared_frame_count_over_the_cap_is_refused_before_decoding(tmp_path: Path, no_decoding: None) -> None:
    path = write_video(noise_frames(9), tmp_path / "v.mp4", fps=8)
    refused(lambda: read_video(path, max_frames=5), "v.mp4", "declares 9 frames", "at most 5")
    refused(lambda: read_video(path, limits=MediaLimits(max_video_frames=5)), "declares 9 frames")


def test_uncounted_frames_over_the_cap_are_refused_before_decoding(tmp_path: Path, no_decoding: None) -> None:
    path = matroska(tmp_path / "v.mkv", noise_frames(9))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # nothing declared: the packets are counted
    refused(lambda: read_video(path, max_frames=5), "v.mkv", "more than 5 frames")


def test_duration_over_the_cap_is_refused_before_decoding(tmp_path: Path, no_decoding: None) -> None:
    path = write_video(noise_frames(9), tmp_path / "v.mp4", fps=1)
    refused(lambda: read_video(path, limits=MediaLimits(max_video_seconds=5)), "v.mp4", "lasts 9.0 s", "at most 5 s")


def test_frame_size_over_the_cap_is_refused_before_decoding(tmp_path: Path, no_decoding: None) -> None:
    path = write_video(noise_frames(3, 64, 64), tmp_path / "v.mp4")
    refused(lambda: read_video(path, limits=MediaLimits(max_pixels=32 * 32)), "v.mp4", "64x64", "at most 1024")


def test_decoded_size_over_the_cap_is_refused_before_decoding_unless_sampled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_video(noise_frames(9), tmp_path / "v.mp4", fps=8)
    limits = MediaLimits(max_decoded_bytes=4 * 32 * 48 * 3)
    real_decode = media_mod._decode
    monkeypatch.setattr(media_mod, "_decode", lambda *a, **k: pytest.fail("decoded before refusing"))
    refused(lambda: read_video(path, limits=limits), "v.mp4", "9 frames of 48x32", "bytes")
    monkeypatch.setattr(media_mod, "_decode", real_decode)
    assert read_video(path, limits=limits, sample_frames=4).frames.shape == (4, 32, 48, 3)


def test_matroska_round_trip(tmp_path: Path) -> None:
    frames = gradient_frames(5)
    medium = read_video(matroska(tmp_path / "v.mkv", frames))
    assert medium.frames.shape == (5, 32, 48, 3)
    assert np.abs(medium.frames.astype(int) - frames.astype(int)).mean() < 4.0


# --------------------------------------------------------------------------- sampling for understanding


def test_sample_indices_spread_evenly() -> None:
    assert sample_indices(9, 3) == [0, 4, 8]
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(5, 10) == [0, 1, 2, 3, 4]
    assert sample_indices(10, 1) == [0]


def test_sampled_frames_are_the_same_frames_a_full_read_gives(tmp_path: Path) -> None:
    path = write_video(gradient_frames(9), tmp_path / "v.mp4", fps=8)
    full = read_video(path)
    sampled = read_medium(path, sample_frames=3)
    assert isinstance(sampled, Medium) and sampled.fps == full.fps
    assert np.array_equal(sampled.frames, full.frames[[0, 4, 8]])
    assert np.array_equal(read_video(path, sample_frames=50).frames, full.frames)


def test_read_reference_reads_inside_the_root_and_refuses_a_link_out(tmp_path):
    """The one entry point for user-named media: resolved and opened without a check-then-use gap."""
    from unison_runtime.errors import PathError
    from unison_runtime.media import read_reference, write_image

    root, outside = tmp_path / "input", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    frame = np.zeros((8, 16, 3), dtype=np.uint8)
    frame[:, 8:] = 255
    write_image(frame, root / "inside.png")
    write_image(frame, outside / "leak.png")
    (root / "link.png").symlink_to(outside / "leak.png")

    medium = read_reference("inside.png", [root])
    assert medium.name == "inside.png" and medium.kind == "image"
    assert np.array_equal(medium.frames[0], frame)
    with pytest.raises(PathError, match=r"link\.png"):
        read_reference("link.png", [root])
