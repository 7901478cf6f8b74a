"""A tiny random Wan2.1-VACE model in the real ``Wan2.1-VACE-1.3B-diffusers`` directory layout.

The directory is written by diffusers' and transformers' own ``save_pretrained`` (model_index.json,
transformer/, vae/, text_encoder/, tokenizer/, scheduler/), so the loaders read exactly what they
would read from the released repository. Only the sizes are shrunk, keeping the geometry that the
engine depends on: the VAE still compresses 8x in space and 4x in time, the transformer still
patches 1x2x2, the VACE control input still has ``2 * z_dim + 64`` channels, and umT5's ``d_model``
equals the transformer's ``text_dim`` (which the projector's ``t5_dim`` must match too).

The tokenizer is a real SentencePiece Unigram model trained in a few milliseconds on a small
corpus (with umT5's special-token ids: pad 0, eos 1, unk 2), saved as a T5 tokenizer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

#: Wan's default negative prompt is in the tokenizer corpus, so it tokenizes to real pieces.
_CORPUS = (
    "a lion walking around in its habitat on a sunny day",
    "please create a video of a cat playing with a red ball in the garden",
    "generate an image of a small house by the lake at night with stars",
    "draw a portrait of a woman, oil painting, warm light",
    "what is in this picture? describe the video and explain what happens",
    "edit the photo: replace the sky with a sunset and change the car colour",
    "follow the pose skeleton, depth map, canny edges and sketch",
    "the quick brown fox jumps over the lazy dog 0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "abcdefghijklmnopqrstuvwxyz .,;:!?'\"()-_/",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走",
)


@dataclass(frozen=True)
class TinyVaceDims:
    """The sizes of the tiny model; ``text_dim`` is what a tiny projector's ``t5_dim`` must be."""

    text_dim: int = 32  # umT5 d_model == transformer text_dim == projector t5_dim
    z_dim: int = 4  # VAE latent channels == transformer in/out channels
    heads: int = 2
    head_dim: int = 16  # transformer inner dim = heads * head_dim
    ffn_dim: int = 64
    num_layers: int = 2
    vace_layers: tuple[int, ...] = (0,)
    vae_base_dim: int = 8
    text_layers: int = 1
    text_heads: int = 4
    text_ff: int = 64
    vocab_pieces: int = 160
    flow_shift: float = 3.0  # what the released scheduler config says; the sampler overrides it

    @property
    def vace_in_channels(self) -> int:
        """Inactive + reactive latents (2 * z_dim) + the 8x8 pixel-unshuffled mask (64)."""
        return 2 * self.z_dim + 64


TINY_VACE = TinyVaceDims()


def build_tiny_tokenizer(directory: str | Path, *, pieces: int = TINY_VACE.vocab_pieces) -> Path:
    """Train a tiny SentencePiece Unigram model and save it as a T5 (umT5-style) tokenizer."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5Tokenizer

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=buffer,
        vocab_size=pieces,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    vocab = [(p.piece, p.score) for p in proto.pieces]
    tokenizer = T5Tokenizer(
        vocab=vocab, extra_ids=0, _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap
    )
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    (directory / "spiece.model").write_bytes(buffer.getvalue())  # the released folder ships it too
    return directory


def tiny_transformer_config(dims: TinyVaceDims = TINY_VACE) -> dict:
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": dims.heads,
        "attention_head_dim": dims.head_dim,
        "in_channels": dims.z_dim,
        "out_channels": dims.z_dim,
        "text_dim": dims.text_dim,
        "freq_dim": 32,
        "ffn_dim": dims.ffn_dim,
        "num_layers": dims.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
        "vace_layers": list(dims.vace_layers),
        "vace_in_channels": dims.vace_in_channels,
    }


def tiny_vae_config(dims: TinyVaceDims = TINY_VACE) -> dict:
    # Non-trivial latent statistics, so a missed (de)normalisation changes the output.
    return {
        "base_dim": dims.vae_base_dim,
        "z_dim": dims.z_dim,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        "latents_mean": [round(0.1 * (i - dims.z_dim / 2), 3) for i in range(dims.z_dim)],
        "latents_std": [round(1.0 + 0.25 * i, 3) for i in range(dims.z_dim)],
    }


def build_tiny_vace_diffusers(directory: str | Path, *, seed: int = 0, dims: TinyVaceDims = TINY_VACE) -> Path:
    """Write a random tiny VACE model in the ``Wan2.1-VACE-1.3B-diffusers`` layout; returns ``directory``."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACEPipeline, WanVACETransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = build_tiny_tokenizer(directory / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)

    torch.manual_seed(seed)
    transformer = WanVACETransformer3DModel(**tiny_transformer_config(dims))
    vae = AutoencoderKLWan(**tiny_vae_config(dims))
    text_config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=dims.text_dim,
        d_kv=dims.text_dim // dims.text_heads,
        d_ff=dims.text_ff,
        num_layers=dims.text_layers,
        num_heads=dims.text_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    text_encoder = UMT5EncoderModel(text_config).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=dims.flow_shift
    )
    pipeline = WanVACEPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory
