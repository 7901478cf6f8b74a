"""The loaded stage-two models, as one object every loader returns and the sampler takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class VaceModels:
    """Wan2.1-VACE transformer, Wan VAE, umT5 encoder + tokenizer, and the scheduler config.

    ``text_device`` may differ from ``device`` (umT5-XXL on the CPU, transformer on the GPU).
    ``origin`` records where each part came from, for error messages and the node display.
    """

    transformer: Any  # diffusers.WanVACETransformer3DModel
    vae: Any  # diffusers.AutoencoderKLWan
    text_encoder: Any  # transformers.UMT5EncoderModel
    tokenizer: Any  # a transformers tokenizer for umT5
    device: str = "cpu"
    text_device: str = "cpu"
    dtype: Any = None  # torch.dtype of the transformer
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    def release(self) -> None:
        """Drop the references so the memory can be reclaimed (the caller empties caches)."""
        self.transformer = self.vae = self.text_encoder = self.tokenizer = None
