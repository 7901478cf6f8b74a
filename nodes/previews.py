"""Live previews for the Unison VACE Sampler, the way ComfyUI's KSampler shows them.

ComfyUI's ``latent_preview.get_previewer`` decides from the server's ``--preview-method``
(none / auto / latent2rgb / taesd) and the latent format; Wan 2.1's format
(``comfy.latent_formats.Wan21``) carries the latent-to-RGB factors core uses for its own Wan
previews (and no TAESD decoder, so "auto" and "taesd" fall back to those factors). The picture goes
to the node through ``ProgressBar.update_absolute(step, total, preview)``, as in
``latent_preview.prepare_callback``. With previews off (ComfyUI's default) or outside ComfyUI,
:func:`previewer` returns ``None`` and the sampler computes nothing for them.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("unison")

PREVIEW_FORMAT = "JPEG"
Preview = tuple[str, Any, int | None]  # ("JPEG", PIL.Image, max size): what ProgressBar sends


def _wan21_previewer() -> Any | None:
    """ComfyUI's previewer for Wan 2.1 latents, or ``None`` (previews off, or not inside ComfyUI)."""
    try:
        latent_preview = importlib.import_module("latent_preview")
        latent_formats = importlib.import_module("comfy.latent_formats")
        model_management = importlib.import_module("comfy.model_management")
    except ImportError:
        return None
    return latent_preview.get_previewer(model_management.get_torch_device(), latent_formats.Wan21())


def previewer(num_references: int) -> Callable[[Any], Preview] | None:
    """``x0 -> preview`` for the sampler's predicted clean latents ``[1, 16, R + T, h, w]``, or ``None``.

    The first ``num_references`` latent frames are the reference images VACE prepends; the preview
    shows the first generated frame after them.
    """
    found = _wan21_previewer()
    if found is None:
        return None

    def preview(x0: Any) -> Preview:
        frame = x0[:, :, num_references:num_references + 1].float()
        return found.decode_latent_to_preview_image(PREVIEW_FORMAT, frame)

    return preview
