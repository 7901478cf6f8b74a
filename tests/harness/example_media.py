"""The example media the shipped family workflows name (no pytest: the live harness uses it too)."""

from __future__ import annotations

from pathlib import Path


def write_example_media(input_dir: Path) -> None:
    """The example media the family workflows load, under their names: a photo, a photo whose alpha
    channel is a painted mask (transparent square = regenerate), and a short video."""
    import numpy as np
    from PIL import Image

    from unison_runtime.media import write_video

    from . import build_workflows

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(input_dir / build_workflows.EXAMPLE_IMAGE)
    rgba = rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[8:24, 8:24, 3] = 0
    Image.fromarray(rgba, "RGBA").save(input_dir / build_workflows.EXAMPLE_MASKED)
    write_video(rng.random((7, 32, 32, 3)), input_dir / build_workflows.EXAMPLE_VIDEO, fps=8)
