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
    attention: str = "native"  # the transformer's diffusers attention backend ("flash" when flash-attn runs)

    def release(self) -> None:
        """Drop the references so the memory can be reclaimed (the caller empties caches)."""
        self.transformer = self.vae = self.text_encoder = self.tokenizer = None

    def release_text_encoder(self) -> None:
        """Drop umT5 once the prompts are encoded: sampling and decoding never use it.

        umT5-XXL is ~11 GB in bf16, more than the 1.3B transformer; letting it go before sampling
        is what makes 480P fit on smaller GPUs. The tokenizer stays (it is small). Encoding again
        afterwards is a clear error; load the models again for a new prompt.
        """
        self.text_encoder = None
        self.origin["text_encoder"] = "released after encoding"

    @property
    def text_encoder_released(self) -> bool:
        return self.text_encoder is None and self.transformer is not None
