"""Tiny random Wan2.1-VACE / Wan VAE / umT5 models written in the real single-file formats.

Each writer takes a diffusers / transformers module (the reference) and writes its weights the
way the released files store them:

* ``write_wan_transformer``: Wan's key names (``blocks.N.self_attn.q``, ``head.modulation``,
  ``vace_blocks.0.before_proj`` ...), optionally behind ComfyUI's ``model.diffusion_model.``
  prefix, in fp32/fp16/bf16, plain fp8 or ComfyUI's scaled fp8; optionally with Wan's own
  ``config.json`` next to it, as in the Wan-AI release folder;
* ``write_wan_vae``: Wan's VAE names (``encoder.downsamples.N.residual.2``, ``decoder.upsamples``,
  ``conv1``/``conv2``) as ``Wan2.1_VAE.pth`` or ``wan_2.1_vae.safetensors``;
* ``write_umt5_comfy`` / ``write_umt5_wan``: ComfyUI's umT5 file (transformers names + the
  sentencepiece model as a uint8 ``spiece_model`` tensor, fp16 or scaled fp8) and Wan's
  ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's T5 names) with its ``google/umt5-xxl`` tokenizer folder.

The diffusers→Wan renaming here is written from Wan's module definitions, independently of the
Wan→diffusers conversion the loaders use (diffusers' own), so a test that loads these files and
compares outputs with the reference module checks the loaders for real.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

COMFY_PREFIX = "model.diffusion_model."
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# --------------------------------------------------------------------------- shared helpers


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter distinct random values (zero-initialised ones too), so that any key
    mix-up in a conversion changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def round_trip_fp8(tensor: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """What a float32 tensor becomes after being stored as (scaled) fp8 and read back, in float32."""
    if scale is None:
        return tensor.to(FP8).to(torch.float32)
    return (tensor / scale).to(FP8).to(torch.float32) * scale


def fp8_scale(tensor: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale as ComfyUI's scaled-fp8 files store it: float32, shape ``[]``."""
    return (tensor.abs().max().to(torch.float32) / FP8_MAX).clamp(min=1e-12)


def _quantize(
    state: Mapping[str, torch.Tensor], precision: str, *, quantizable: Any
) -> dict[str, torch.Tensor]:
    """Store a float32 state dict at ``precision``: fp32/fp16/bf16, ``fp8`` (plain) or ``fp8_scaled``."""
    out: dict[str, torch.Tensor] = {}
    plain = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision in plain:
        return {k: v.to(plain[precision]) for k, v in state.items()}
    if precision not in ("fp8", "fp8_scaled"):
        raise ValueError(f"precision {precision!r}: expected fp32, fp16, bf16, fp8 or fp8_scaled")
    for name, tensor in state.items():
        if not quantizable(name, tensor):
            out[name] = tensor.to(torch.float16)
        elif precision == "fp8":
            out[name] = tensor.to(FP8)
        else:
            scale = fp8_scale(tensor)
            out[name] = (tensor / scale).to(FP8)
            out[name[: -len("weight")] + "scale_weight"] = scale
    if precision == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def _linear_weight(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.ndim == 2


def _save(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(contiguous, str(path))
    else:
        torch.save(contiguous, path)
    return path


# --------------------------------------------------------------------------- transformer


def tiny_transformer_config(*, dim: int = 128, heads: int | None = None, layers: int = 2,
                            vace_layers: int = 2, text_dim: int = 32) -> dict[str, Any]:
    """A diffusers WanVACETransformer3DModel config a few MB big.

    ``heads`` defaults to Wan's rule (128-wide heads), the only one a file without Wan's
    ``config.json`` (Comfy-Org's) can be read with.
    """
    heads = heads or max(1, dim // 128)
    return {
        "patch_size": [1, 2, 2], "num_attention_heads": heads, "attention_head_dim": dim // heads,
        "in_channels": 16, "out_channels": 16, "text_dim": text_dim, "freq_dim": 32, "ffn_dim": 64,
        "num_layers": layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
        "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
        "vace_layers": list(range(0, layers, layers // vace_layers))[:vace_layers], "vace_in_channels": 96,
    }


def build_tiny_transformer(config: Mapping[str, Any] | None = None, seed: int = 0) -> Any:
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(**dict(config or tiny_transformer_config()))
    return randomize_(model, seed).eval()


# diffusers name piece -> Wan name piece inside a (VACE) block, from Wan's WanAttentionBlock:
# self_attn / cross_attn with q,k,v,o; norm3 is the cross-attention norm (diffusers' norm2);
# ffn is Sequential(Linear, GELU, Linear); modulation is the block's scale/shift table.
_BLOCK_PIECES = [
    (r"attn1\.to_out\.0\.", "self_attn.o."), (r"attn2\.to_out\.0\.", "cross_attn.o."),
    (r"attn1\.to_([qkv])\.", r"self_attn.\1."), (r"attn2\.to_([qkv])\.", r"cross_attn.\1."),
    (r"attn1\.norm_([qk])\.", r"self_attn.norm_\1."), (r"attn2\.norm_([qk])\.", r"cross_attn.norm_\1."),
    (r"norm2\.", "norm3."), (r"ffn\.net\.0\.proj\.", "ffn.0."), (r"ffn\.net\.2\.", "ffn.2."),
    (r"scale_shift_table$", "modulation"), (r"proj_in\.", "before_proj."), (r"proj_out\.", "after_proj."),
]
_TOP_LEVEL = {
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "proj_out.": "head.head.",
    "patch_embedding.": "patch_embedding.",
    "vace_patch_embedding.": "vace_patch_embedding.",
}


def diffusers_to_wan_transformer_key(name: str) -> str:
    """One diffusers ``WanVACETransformer3DModel`` key in Wan's original naming."""
    if name == "scale_shift_table":
        return "head.modulation"
    block = re.fullmatch(r"((?:vace_)?blocks\.\d+\.)(.+)", name)
    if block:
        rest = block.group(2)
        for pattern, replacement in _BLOCK_PIECES:
            renamed = re.sub("^" + pattern, replacement, rest)
            if renamed != rest:
                return block.group(1) + renamed
        raise KeyError(name)
    for old, new in _TOP_LEVEL.items():
        if name.startswith(old):
            return new + name[len(old):]
    raise KeyError(name)


def wan_transformer_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The module's weights in Wan's key names, float32."""
    return {diffusers_to_wan_transformer_key(k): v.detach().float() for k, v in model.state_dict().items()}


def write_wan_transformer(
    model: Any, path: Path, *, layout: str = "wan", precision: str = "fp32", wan_config: bool = False
) -> Path:
    """Write ``model`` as a Wan2.1-VACE single file.

    ``layout``: ``"wan"`` (bare Wan names, as in Wan-AI's release) or ``"comfy"`` (the same names
    behind ``model.diffusion_model.``). ``precision``: fp32, fp16, bf16, ``fp8`` (e4m3fn weight
    matrices, the rest fp16) or ``fp8_scaled`` (ComfyUI's scaled fp8). ``wan_config`` also writes
    Wan's ``config.json`` (dim, num_heads, vace_layers ...) next to the file, as the release has.
    """
    path = Path(path)
    state = _quantize(wan_transformer_state_dict(model), precision, quantizable=_linear_weight)
    if layout == "comfy":
        state = {COMFY_PREFIX + k: v for k, v in state.items()}
    elif layout != "wan":
        raise ValueError(f"layout {layout!r}: expected 'wan' or 'comfy'")
    _save(state, path)
    if wan_config:
        cfg = model.config
        (path.parent / "config.json").write_text(json.dumps({
            "_class_name": "VaceWanModel", "dim": cfg.num_attention_heads * cfg.attention_head_dim,
            "eps": cfg.eps, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_channels,
            "model_type": "vace", "num_heads": cfg.num_attention_heads, "num_layers": cfg.num_layers,
            "out_dim": cfg.out_channels, "text_len": 512, "vace_layers": list(cfg.vace_layers),
            "vace_in_dim": cfg.vace_in_channels,
        }, indent=2))
    return path


def reference_weights(model: Any, precision: str) -> Any:
    """A copy of ``model`` whose weights went through ``precision`` storage (what a correct loader
    must reproduce), in float32."""
    import copy

    ref = copy.deepcopy(model).float()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if precision in ("fp16", "bf16"):
                param.copy_(param.to(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[precision])).float())
            elif precision in ("fp8", "fp8_scaled"):
                if param.ndim == 2 and name.endswith(".weight"):
                    scale = fp8_scale(param) if precision == "fp8_scaled" else None
                    param.copy_(round_trip_fp8(param.detach(), scale))
                else:
                    param.copy_(param.to(torch.float16).float())
    return ref


# --------------------------------------------------------------------------- VAE


def build_tiny_vae(seed: int = 0, base_dim: int = 8) -> Any:
    """A Wan 2.1 VAE with the real structure (4 levels, 16 latent channels), ``base_dim`` wide."""
    from diffusers import AutoencoderKLWan

    return randomize_(AutoencoderKLWan(base_dim=base_dim, z_dim=16), seed, std=0.1).eval()


def diffusers_to_wan_vae_key(name: str) -> str:
    """One diffusers ``AutoencoderKLWan`` key in Wan's ``WanVAE_`` naming.

    Wan's residual block is ``Sequential(RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv)``
    (indices 0, 2, 3, 6) plus ``shortcut``; its middle is ``[res, attention, res]``; its head is
    ``[RMS_norm, SiLU, conv]``; the decoder's upsample list holds 3 residual blocks then the
    resampler per level (indices 4*level + 0..3).
    """
    resnet = {"norm1.gamma": "residual.0.gamma", "conv1.": "residual.2.", "norm2.gamma": "residual.3.gamma",
              "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}

    def res(rest: str) -> str:
        for old, new in resnet.items():
            if rest.startswith(old):
                return new + rest[len(old):]
        raise KeyError(name)

    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
           "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
           "decoder.norm_out.": "decoder.head.0.", "encoder.conv_out.": "encoder.head.2.",
           "decoder.conv_out.": "decoder.head.2."}
    for old, new in top.items():
        if name.startswith(old):
            return new + name[len(old):]
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", name):
        return f"{m.group(1)}.middle.{2 * int(m.group(2))}.{res(m.group(3))}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
        return f"{m.group(1)}.middle.1.{m.group(2)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", name):
        rest = m.group(2)
        kept = rest.startswith(("resample.", "time_conv."))
        return f"encoder.downsamples.{m.group(1)}.{rest if kept else res(rest)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"decoder.upsamples.{4 * int(m.group(1)) + int(m.group(2))}.{res(m.group(3))}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
        return f"decoder.upsamples.{4 * int(m.group(1)) + 3}.{m.group(2)}"
    raise KeyError(name)


def write_wan_vae(model: Any, path: Path, *, precision: str = "fp32") -> Path:
    """Write ``model`` as Wan's VAE file: ``.pth`` (torch.save, like ``Wan2.1_VAE.pth``) or
    ``.safetensors`` (like ComfyUI's ``wan_2.1_vae.safetensors``), same key names."""
    state = {diffusers_to_wan_vae_key(k): v.detach().float() for k, v in model.state_dict().items()}
    return _save(_quantize(state, precision, quantizable=_linear_weight), Path(path))


# --------------------------------------------------------------------------- umT5

_CORPUS = [
    "Please create a video of a lion walking around in its habitat.",
    "Turn this image into a watercolor painting, keep the composition.",
    "A red fox runs through the snow at dawn, cinematic lighting.",
    "Replace the sky with a sunset and make the clouds pink.",
    "What is the dog holding in its mouth? Answer briefly.",
    "Extend the video to the left and right, 480P, 5 seconds long.",
    "Zwei Katzen spielen im Garten. Un chat noir dort sur le canapé.",
    "一只猫在草地上奔跑, 阳光明媚。",
    "Numbers 0123456789, punctuation: !?.,;'\"()[] and width 832 height 480.",
]


def build_tiny_spiece_model() -> bytes:
    """A small sentencepiece unigram model with umT5's special ids (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 8), model_writer=buffer, vocab_size=150, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        minloglevel=2, num_threads=1,
    )
    return buffer.getvalue()


def build_tiny_umt5(seed: int = 0, *, d_model: int = 32, vocab_size: int = 192) -> tuple[Any, Any, bytes]:
    """``(UMT5EncoderModel, T5 tokenizer, sentencepiece bytes)`` in umT5-XXL's structure, tiny."""
    from transformers import UMT5Config, UMT5EncoderModel

    from ..vace.umt5_files import tokenizer_from_spiece

    proto = build_tiny_spiece_model()
    tokenizer = tokenizer_from_spiece(proto)
    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    model = randomize_(UMT5EncoderModel(config), seed).eval()
    return model, tokenizer, proto


def write_umt5_comfy(model: Any, proto: bytes, path: Path, *, precision: str = "fp16") -> Path:
    """ComfyUI's umT5 file: transformers key names, ``spiece_model`` uint8 tensor, fp16 or scaled fp8.

    As in ComfyUI's scaled files, only linear weight matrices are fp8 (with float32 scales);
    the embedding and norms stay in fp16.
    """
    state = {k: v.detach().float() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    state = _quantize(state, precision, quantizable=lambda n, t: _linear_weight(n, t) and n != "shared.weight")
    state["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    return _save(state, Path(path))


_HF_TO_WAN_T5 = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def write_umt5_wan(model: Any, tokenizer: Any, folder: Path, *, precision: str = "bf16") -> Path:
    """Wan's release layout: ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's T5Encoder names, torch.save)
    and the tokenizer in ``google/umt5-xxl/`` beside it. Returns the ``.pth`` path."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "shared.weight":
            state["token_embedding.weight"] = tensor
        elif name == "encoder.final_layer_norm.weight":
            state["norm.weight"] = tensor
        elif m := re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", name):
            state[f"blocks.{m.group(1)}.{_HF_TO_WAN_T5[m.group(2)]}"] = tensor
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder / "google" / "umt5-xxl"))
    state = _quantize({k: v.float() for k, v in state.items()}, precision, quantizable=_linear_weight)
    return _save(state, folder / "models_t5_umt5-xxl-enc-bf16.pth")


# --------------------------------------------------------------------------- a whole models folder


def build_tiny_comfy_models_dir(root: Path, seed: int = 0) -> dict[str, Path]:
    """A ComfyUI-style ``models/`` tree with tiny Comfy-Org-format files:
    ``diffusion_models/wan2.1_vace_1.3B_fp16.safetensors``, ``vae/wan_2.1_vae.safetensors``,
    ``text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (plus an empty ``unison/``)."""
    root = Path(root)
    transformer = build_tiny_transformer(tiny_transformer_config(text_dim=32), seed=seed)
    vae = build_tiny_vae(seed + 1)
    encoder, _, proto = build_tiny_umt5(seed + 2, d_model=32)
    paths = {
        "transformer": write_wan_transformer(
            transformer, root / "diffusion_models" / "wan2.1_vace_1.3B_fp16.safetensors", layout="comfy",
            precision="fp16"),
        "vae": write_wan_vae(vae, root / "vae" / "wan_2.1_vae.safetensors"),
        "text_encoder": write_umt5_comfy(
            encoder, proto, root / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", precision="fp8_scaled"),
    }
    (root / "unison").mkdir(parents=True, exist_ok=True)
    return paths
