"""umT5 text encoding and stage two's two text contexts (DESIGN section 8).

Wan (and diffusers' port) encodes a prompt as: clean it (ftfy, HTML entities, whitespace), tokenize
with the end-of-sequence token, truncate to 512 tokens, run umT5, and keep the **real tokens
only**. We run the encoder on exactly those tokens (no padding): with umT5's relative position
bias and attention mask, padded and unpadded runs give the same vectors for the real tokens, and
the unpadded run costs a fraction of the 512-token one.

The conditional context is that embedding, then the projector's tokens, then zeros up to the
model's text length; the reference raises it to 2048 positions. The negative context is the
embedding of the negative prompt (Wan's default unless one is given) zero-padded the same way.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from ..errors import UnisonError
from ..projector import REFERENCE_CONTEXT_LENGTH, build_context
from .models import VaceModels
from .stored_precision import give_back_ram

#: Wan's ``sample_neg_prompt`` (wan/configs/shared_config.py), which the reference uses by default.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
#: Wan's ``text_len``: prompts are truncated to this many umT5 tokens (end-of-sequence included).
MAX_TEXT_TOKENS = 512
#: Positions in each context: the reference raises Wan's text length from 512 to 2048.
CONTEXT_LENGTH = REFERENCE_CONTEXT_LENGTH


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: fix mojibake (ftfy), unescape HTML twice, collapse whitespace.

    Wan2.1 ``wan/modules/tokenizers.py`` (``clean='whitespace'``: ``basic_clean`` then
    ``whitespace_clean``), with the third-party ``regex`` module as Wan uses it: its ``\\s`` is not
    the standard library's (``\\x1c``-``\\x1f`` are not whitespace to it).
    """
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


def encode_text(models: VaceModels, text: str, *, max_tokens: int = MAX_TEXT_TOKENS) -> Any:
    """umT5 embedding of ``text``: ``[1, L, D]`` for its L real tokens (L <= ``max_tokens``).

    The tensor stays on ``models.text_device`` in the encoder's dtype; the sampler moves it.
    """
    import torch

    if models.text_encoder is None or models.tokenizer is None:
        raise UnisonError("the umT5 text encoder was released (release_text_encoder, or the models were released) "
                          "or never loaded; load the VACE models again")
    if not isinstance(text, str):
        raise UnisonError(f"text to encode must be a string, got {type(text).__name__}")
    tokens = models.tokenizer(
        [clean_prompt(text)],
        padding=False,
        truncation=True,
        max_length=max_tokens,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids = tokens.input_ids.to(models.text_device)
    mask = tokens.attention_mask.to(models.text_device)
    with torch.no_grad():
        hidden = models.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    length = int(mask[0].sum())
    return hidden[:, :length]


@dataclass
class TextContexts:
    """The two contexts the transformer cross-attends to, each ``[1, length, D]``.

    ``text_tokens`` / ``projector_tokens`` / ``negative_tokens`` say how many leading positions
    are real (the rest are zeros), for displays and tests.
    """

    cond: Any
    neg: Any
    text_tokens: int
    projector_tokens: int
    negative_tokens: int


def assemble_contexts(
    text: Any, projector_tokens: Any | None, negative_text: Any, *, total_length: int | None = CONTEXT_LENGTH
) -> TextContexts:
    """Both contexts from unpadded umT5 embeddings (``[1, L, D]``) and the projector's tokens (or ``None``)."""
    return TextContexts(
        cond=build_context(text, projector_tokens, total_length),
        neg=build_context(negative_text, None, total_length),
        text_tokens=int(text.shape[1]),
        projector_tokens=0 if projector_tokens is None else int(projector_tokens.shape[-2]),
        negative_tokens=int(negative_text.shape[1]),
    )


def encode_negative(models: VaceModels, negative_prompt: str | None = None) -> Any:
    """umT5 embedding of the negative prompt; ``None`` means Wan's default negative prompt."""
    return encode_text(models, WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt)


def text_contexts(
    models: VaceModels,
    prompt: str,
    projector_tokens: Any | None = None,
    *,
    negative_prompt: str | None = None,
    total_length: int | None = CONTEXT_LENGTH,
) -> TextContexts:
    """Both contexts for one generation, as the reference builds them.

    conditional = umT5(prompt) + ``projector_tokens`` (``[1, N, D]``; ``None``: umT5 alone) + zeros;
    negative = umT5(``negative_prompt`` or Wan's default) + zeros; both ``total_length`` long.
    """
    return assemble_contexts(
        encode_text(models, prompt), projector_tokens, encode_negative(models, negative_prompt),
        total_length=total_length,
    )


def release_encoder_pages(models: VaceModels) -> int:
    """After encoding on the CPU, give back umT5's pages mapped from its file; returns the bytes given back.

    umT5 stays loaded (a host may keep it for the next prompt, as ComfyUI does), but its stored
    weights (6.3 GiB of scaled fp8 at released size) need not stay resident beside the transformer
    while it samples, nor its reused cast buffers: both come back on the next encode.
    """
    if models.text_encoder is None or not str(models.text_device).startswith("cpu"):
        return 0
    return give_back_ram("umT5", models.text_encoder, after="after encoding")
