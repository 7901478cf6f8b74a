"""umT5-XXL text-encoder files in the layouts users have, turned into transformers' UMT5EncoderModel.

Three layouts hold the same weights:

* transformers / ComfyUI names (``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q.weight``
  ...): HF ``google/umt5-xxl`` folders and ComfyUI's ``umt5_xxl_fp16.safetensors`` /
  ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``. ComfyUI embeds the sentencepiece model as a uint8
  tensor under ``spiece_model`` (``comfy/text_encoders/wan.py``), so those files carry their
  tokenizer with them.
* Wan's own names (``token_embedding.weight``, ``blocks.N.attn.q.weight``, ``blocks.N.ffn.gate.0``
  ... from ``wan/modules/t5.py``): ``models_t5_umt5-xxl-enc-bf16.pth``, whose tokenizer is the
  separate ``google/umt5-xxl`` folder next to it.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .wan_keys import UMT5_CONFIG_DIR, Shapes, count_indexed, load_json

#: The key ComfyUI stores the sentencepiece model proto under.
SPIECE_KEY = "spiece_model"

# Wan's T5Encoder (wan/modules/t5.py) -> transformers' UMT5EncoderModel, per block. Wan's
# feed-forward is ``fc1(x) * gelu(gate(x))``; transformers' gated one is ``gelu(wi_0(x)) * wi_1(x)``.
_WAN_BLOCK_RENAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def wan_t5_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan-named umT5 encoder state dict to transformers' names.

    Raises ``KeyError`` naming the first tensor that has no counterpart, so a file of another
    kind is not half-converted silently.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == "token_embedding.weight":
            out["shared.weight"] = tensor
            out["encoder.embed_tokens.weight"] = tensor
        elif name == "norm.weight":
            out["encoder.final_layer_norm.weight"] = tensor
        elif (m := _WAN_BLOCK.fullmatch(name)) and m.group(2) in _WAN_BLOCK_RENAMES:
            out[f"encoder.block.{m.group(1)}.{_WAN_BLOCK_RENAMES[m.group(2)]}"] = tensor
        else:
            raise KeyError(name)
    return out


def umt5_config(shapes: Shapes) -> dict[str, Any]:
    """transformers ``UMT5Config`` values for a umT5 encoder in transformers' names.

    Starts from the shipped umT5-XXL config and reads every size from the weights, so the
    real 24-layer 4096-wide model and tiny test models load through the same code.
    """
    config = load_json(UMT5_CONFIG_DIR / "config.json")
    embed = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][1]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][1][0]
    layers = count_indexed(shapes, "encoder.block.")
    config.update(
        vocab_size=embed[1][0],
        d_model=embed[1][1],
        num_heads=heads,
        d_kv=inner // heads,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][1][0],
        num_layers=layers,
        num_decoder_layers=layers,
        relative_attention_num_buckets=buckets,
    )
    return config


def expected_umt5_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a umT5 encoder in transformers' names, with its shape."""
    d, inner, ff = config["d_model"], config["num_heads"] * config["d_kv"], config["d_ff"]
    out: dict[str, tuple[int, ...]] = {
        "shared.weight": (config["vocab_size"], d),
        "encoder.embed_tokens.weight": (config["vocab_size"], d),
        "encoder.final_layer_norm.weight": (d,),
    }
    for i in range(config["num_layers"]):
        p = f"encoder.block.{i}.layer."
        out.update({
            f"{p}0.layer_norm.weight": (d,),
            f"{p}0.SelfAttention.q.weight": (inner, d),
            f"{p}0.SelfAttention.k.weight": (inner, d),
            f"{p}0.SelfAttention.v.weight": (inner, d),
            f"{p}0.SelfAttention.o.weight": (d, inner),
            f"{p}0.SelfAttention.relative_attention_bias.weight": (
                config["relative_attention_num_buckets"], config["num_heads"]),
            f"{p}1.layer_norm.weight": (d,),
            f"{p}1.DenseReluDense.wi_0.weight": (ff, d),
            f"{p}1.DenseReluDense.wi_1.weight": (ff, d),
            f"{p}1.DenseReluDense.wo.weight": (d, ff),
        })
    return out


def tokenizer_from_spiece(proto: bytes | torch.Tensor) -> Any:
    """A transformers T5 tokenizer from the sentencepiece model bytes ComfyUI embeds.

    ``extra_ids=0``: the embedded model is used exactly as ComfyUI's SPieceTokenizer uses it
    (no sentinel tokens appended), so ordinary text gets the same ids and the closing ``</s>``.
    """
    from transformers import T5Tokenizer

    data = proto.cpu().numpy().tobytes() if isinstance(proto, torch.Tensor) else bytes(proto)
    with tempfile.TemporaryDirectory(prefix="unison-spiece-") as tmp:
        (Path(tmp) / "spiece.model").write_bytes(data)
        return T5Tokenizer.from_pretrained(tmp, extra_ids=0, local_files_only=True)


def is_tokenizer_dir(path: Path) -> bool:
    """True for a folder transformers can build a umT5 tokenizer from."""
    return path.is_dir() and any((path / name).is_file() for name in ("tokenizer.json", "spiece.model"))


def load_tokenizer_dir(path: Path) -> Any:
    """The tokenizer saved in ``path`` (``tokenizer.json`` or ``spiece.model``), offline."""
    from transformers import AutoTokenizer, T5Tokenizer

    if not (path / "tokenizer_config.json").is_file() and (path / "spiece.model").is_file():
        # A bare sentencepiece model (no config to name the class): umT5's tokenizer is T5's.
        return T5Tokenizer.from_pretrained(str(path), extra_ids=0, local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
