"""What a Wan / umT5 weights file is, told from its tensor names and shapes alone.

Users drop whatever they have into ComfyUI's folders: Wan's own files, Comfy-Org's repackaged
single files, diffusers folders, the wrong model of the family. Everything here works on a
``{name: (dtype, shape)}`` table (a safetensors header, or a loaded state dict), so a wrong file
is refused with a clear message before gigabytes are read, and the model config (dimensions,
layer counts) is read from the weights instead of being assumed.

Key names follow the real layouts: Wan's ``wan/modules/model.py`` / ``vae.py`` (the same names
ComfyUI's ``comfy/ldm/wan`` uses and Comfy-Org's files store, sometimes behind the
``model.diffusion_model.`` prefix), and transformers' umT5 names for the text encoder.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TRANSFORMER_CONFIG_DIRS = {
    "1.3B": CONFIG_DIR / "wan2.1-vace-1.3b-transformer",
    "14B": CONFIG_DIR / "wan2.1-vace-14b-transformer",
}
VAE_CONFIG_DIR = CONFIG_DIR / "wan2.1-vae"
UMT5_CONFIG_DIR = CONFIG_DIR / "umt5-xxl-encoder"
SCHEDULER_CONFIG_DIR = CONFIG_DIR / "wan2.1-scheduler"

#: Prefix of full ComfyUI checkpoints (and some Comfy-Org repackaged files).
COMFY_PREFIX = "model.diffusion_model."
#: Every Wan 2.x transformer uses 128-wide attention heads (1.3B: 1536/12, 14B: 5120/40).
WAN_HEAD_DIM = 128
#: Model sizes by hidden width, as ComfyUI and diffusers tell them apart.
WAN_SIZES = {1536: "1.3B", 3072: "5B", 5120: "14B"}
#: Keys ComfyUI's scaled-fp8 files add: a dtype marker and per-layer scales.
QUANT_MARKER_KEY = "scaled_fp8"
QUANT_SUFFIXES = (".scale_weight", ".scale_input")

Shapes = Mapping[str, tuple[str, tuple[int, ...]]]

# safetensors header dtype names, and torch's for tensors loaded from pickles.
_TORCH_TO_ST = {
    "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
    "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2", "torch.uint8": "U8", "torch.int8": "I8",
    "torch.int32": "I32", "torch.int64": "I64", "torch.bool": "BOOL",
}


def shapes_from_header(header: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors header (``__metadata__`` dropped)."""
    return {
        name: (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
        for name, info in header.items()
        if name != "__metadata__"
    }


def shapes_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from loaded tensors, with safetensors dtype names."""
    return {
        name: (_TORCH_TO_ST.get(str(t.dtype), str(t.dtype)), tuple(t.shape)) for name, t in state_dict.items()
    }


def count_indexed(names: Any, stem: str) -> int:
    """Number of ``{stem}{i}.`` groups, i.e. the layer count of a ModuleList named ``stem``."""
    pattern = re.compile(re.escape(stem) + r"(\d+)\.")
    found = {int(m.group(1)) for name in names if (m := pattern.match(name))}
    return max(found) + 1 if found else 0


def dominant_dtype(shapes: Shapes) -> str:
    """The floating dtype holding most parameters (what a file "is": fp16, bf16, fp8...).

    Integer tensors (ComfyUI's embedded tokenizer bytes) do not count.
    """
    totals: dict[str, int] = {}
    for dtype, shape in shapes.values():
        if not dtype.startswith(("F", "BF")):
            continue
        n = 1
        for d in shape:
            n *= d
        totals[dtype] = totals.get(dtype, 0) + n
    return max(totals, key=lambda k: totals[k]) if totals else "?"


def load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --------------------------------------------------------------------------- identification


@dataclass(frozen=True)
class FileIdentity:
    """What a weights file holds, in words a user recognises.

    ``kind`` is one of: ``wan-vace`` (a full Wan2.1-VACE transformer in Wan's key names),
    ``wan-vace-module`` (only the VACE blocks, as some repackagers ship them), ``wan-video``
    (a Wan transformer without VACE: T2V, I2V, ...), ``wan-transformer-diffusers``,
    ``wan-vae``, ``wan-vae-diffusers``, ``umt5`` (transformers / ComfyUI key names),
    ``umt5-wan`` (Wan's own T5 key names), ``t5`` (plain T5-XXL, not umT5), ``unknown``.
    """

    kind: str
    summary: str
    prefix: str = ""
    size: str | None = None
    dtype: str = "?"
    details: dict[str, Any] = field(default_factory=dict)


def _strip(shapes: Shapes, prefix: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)} if prefix else dict(shapes)


def _wan_size(dim: int, layers: int) -> str:
    label = WAN_SIZES.get(dim)
    return label if label else f"custom size (width {dim}, {layers} layers)"


def identify(shapes: Shapes) -> FileIdentity:
    """Tell which model of the Wan / umT5 family a ``{name: (dtype, shape)}`` table holds."""
    names = set(shapes)
    dtype = dominant_dtype(shapes)
    prefix = COMFY_PREFIX if any(n.startswith(COMFY_PREFIX) for n in names) else ""
    bare = _strip(shapes, prefix)

    if "head.modulation" in bare and "patch_embedding.weight" in bare:
        dim = bare["head.modulation"][1][-1]
        layers = count_indexed(bare, "blocks.")
        size = _wan_size(dim, layers)
        in_dim = bare["patch_embedding.weight"][1][1]
        details = {"dim": dim, "num_layers": layers, "in_dim": in_dim}
        if "vace_patch_embedding.weight" in bare:
            vace = count_indexed(bare, "vace_blocks.")
            details["vace_layers"] = vace
            return FileIdentity("wan-vace", f"Wan2.1-VACE {size} transformer", prefix, size, dtype, details)
        variant = "image-to-video" if ("img_emb.proj.0.weight" in bare or in_dim == 36) else (
            "text-to-video" if in_dim == 16 else f"{in_dim}-channel input")
        return FileIdentity(
            "wan-video", f"plain Wan {size} {variant} transformer (no VACE blocks)", prefix, size, dtype, details
        )
    has_vace = "vace_patch_embedding.weight" in bare or any(n.startswith("vace_blocks.") for n in bare)
    if has_vace and not any(n.startswith("blocks.") for n in bare):
        return FileIdentity(
            "wan-vace-module", "VACE module only (vace_blocks without the Wan transformer it plugs into)",
            prefix, None, dtype,
        )
    if "condition_embedder.time_embedder.linear_1.weight" in names:
        vace = "VACE " if "vace_patch_embedding.weight" in names else ""
        summary = f"Wan {vace}transformer in the diffusers layout"
        return FileIdentity("wan-transformer-diffusers", summary, "", None, dtype)
    if "decoder.middle.0.residual.0.gamma" in names or ("encoder.conv1.weight" in names and "conv2.weight" in names):
        z_dim = shapes["conv2.weight"][1][0] if "conv2.weight" in shapes else None
        label = "Wan 2.2 VAE (48 latent channels)" if z_dim == 48 else "Wan VAE"
        return FileIdentity("wan-vae", label, "", None, dtype, {"z_dim": z_dim})
    if "decoder.mid_block.resnets.0.norm1.gamma" in names and "post_quant_conv.weight" in names:
        return FileIdentity("wan-vae-diffusers", "Wan VAE in the diffusers layout", "", None, dtype)
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in names:
        layers = count_indexed(names, "encoder.block.")
        per_layer_bias = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in names
        if layers > 1 and not per_layer_bias:
            return FileIdentity("t5", "T5-XXL text encoder (as used by Flux/SD3), not umT5-XXL", "", None, dtype)
        scaled = QUANT_MARKER_KEY in names
        label = "umT5-XXL text encoder" + (" (scaled fp8)" if scaled else "")
        return FileIdentity("umt5", label, "", None, dtype, {"num_layers": layers, "scaled_fp8": scaled})
    if "token_embedding.weight" in names and "blocks.0.attn.q.weight" in names:
        layers = count_indexed(names, "blocks.")
        return FileIdentity("umt5-wan", "umT5-XXL text encoder in Wan's own key names", "", None, dtype,
                            {"num_layers": layers})
    shown = ", ".join(sorted(names)[:4]) or "(no tensors)"
    return FileIdentity("unknown", f"not a Wan / umT5 model file (first tensors: {shown})", prefix, None, dtype)


# --------------------------------------------------------------------------- transformer


def transformer_config(
    shapes: Shapes, *, num_heads: int | None = None, vace_layers: list[int] | None = None
) -> dict[str, Any]:
    """The diffusers ``WanVACETransformer3DModel`` config for a Wan-named VACE state dict.

    Starts from the shipped config of the matching size (so constants such as ``eps`` and
    ``rope_max_seq_len`` are the released ones) and reads every dimension from the shapes.
    ``num_heads`` and ``vace_layers`` cannot be seen in the weights: they come from the caller
    (Wan's own ``config.json``), else Wan's rules (128-wide heads; VACE blocks evenly spread
    over the main blocks, as ComfyUI maps them).
    """
    s = shapes
    dim = s["head.modulation"][1][-1]
    layers = count_indexed(s, "blocks.")
    n_vace = count_indexed(s, "vace_blocks.")
    base_dir = TRANSFORMER_CONFIG_DIRS.get(WAN_SIZES.get(dim, ""), TRANSFORMER_CONFIG_DIRS["1.3B"])
    config = load_json(base_dir / "config.json")
    patch = list(s["patch_embedding.weight"][1][2:])
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise ValueError(f"width {dim} is not a multiple of Wan's head size {WAN_HEAD_DIM}; give num_heads")
        num_heads = dim // WAN_HEAD_DIM
    if dim % num_heads:
        raise ValueError(f"width {dim} does not split into {num_heads} heads")
    if vace_layers is None:
        if not 0 < n_vace <= layers:
            raise ValueError(f"{n_vace} VACE blocks cannot be spread over {layers} blocks")
        vace_layers = list(range(0, layers, layers // n_vace))[:n_vace]
    if len(vace_layers) != n_vace:
        raise ValueError(f"config names {len(vace_layers)} VACE layers, the weights hold {n_vace}")
    config.update(
        num_attention_heads=num_heads,
        attention_head_dim=dim // num_heads,
        in_channels=s["patch_embedding.weight"][1][1],
        out_channels=s["head.head.weight"][1][0] // (patch[0] * patch[1] * patch[2]),
        patch_size=patch,
        text_dim=s["text_embedding.0.weight"][1][1],
        freq_dim=s["time_embedding.0.weight"][1][1],
        ffn_dim=s["blocks.0.ffn.0.weight"][1][0],
        num_layers=layers,
        cross_attn_norm="blocks.0.norm3.weight" in s,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in s else None,
        vace_layers=list(vace_layers),
        vace_in_channels=s["vace_patch_embedding.weight"][1][1],
    )
    return config


def _block_shapes(prefix: str, dim: int, ffn: int, cross_norm: bool, qk_norm: bool) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {f"{prefix}modulation": (1, 6, dim)}
    for attn in ("self_attn", "cross_attn"):
        for proj in ("q", "k", "v", "o"):
            out[f"{prefix}{attn}.{proj}.weight"] = (dim, dim)
            out[f"{prefix}{attn}.{proj}.bias"] = (dim,)
        if qk_norm:
            out[f"{prefix}{attn}.norm_q.weight"] = (dim,)
            out[f"{prefix}{attn}.norm_k.weight"] = (dim,)
    if cross_norm:
        out[f"{prefix}norm3.weight"] = (dim,)
        out[f"{prefix}norm3.bias"] = (dim,)
    out[f"{prefix}ffn.0.weight"] = (ffn, dim)
    out[f"{prefix}ffn.0.bias"] = (ffn,)
    out[f"{prefix}ffn.2.weight"] = (dim, ffn)
    out[f"{prefix}ffn.2.bias"] = (dim,)
    return out


def expected_transformer_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Wan2.1-VACE transformer in Wan's key names, with its shape.

    Written from Wan's ``VaceWanModel`` (the layout ComfyUI's ``comfy/ldm/wan/model.py``
    mirrors): ``norm1``/``norm2`` carry no weights, ``norm3`` is the cross-attention norm.
    """
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn, patch = config["ffn_dim"], tuple(config["patch_size"])
    cross_norm, qk_norm = bool(config["cross_attn_norm"]), config["qk_norm"] is not None
    patch_volume = patch[0] * patch[1] * patch[2]
    out: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (dim, config["in_channels"], *patch),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, config["text_dim"]),
        "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim),
        "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, config["freq_dim"]),
        "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim),
        "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (dim * 6, dim),
        "time_projection.1.bias": (dim * 6,),
        "head.head.weight": (config["out_channels"] * patch_volume, dim),
        "head.head.bias": (config["out_channels"] * patch_volume,),
        "head.modulation": (1, 2, dim),
        "vace_patch_embedding.weight": (dim, config["vace_in_channels"], *patch),
        "vace_patch_embedding.bias": (dim,),
    }
    for i in range(config["num_layers"]):
        out.update(_block_shapes(f"blocks.{i}.", dim, ffn, cross_norm, qk_norm))
    for i in range(len(config["vace_layers"])):
        out.update(_block_shapes(f"vace_blocks.{i}.", dim, ffn, cross_norm, qk_norm))
        if i == 0:
            out["vace_blocks.0.before_proj.weight"] = (dim, dim)
            out["vace_blocks.0.before_proj.bias"] = (dim,)
        out[f"vace_blocks.{i}.after_proj.weight"] = (dim, dim)
        out[f"vace_blocks.{i}.after_proj.bias"] = (dim,)
    return out


# --------------------------------------------------------------------------- VAE


def vae_config(shapes: Shapes) -> dict[str, Any]:
    """The diffusers ``AutoencoderKLWan`` config for a VAE in Wan's key names.

    The Wan 2.1 layout (4 levels, 2 residual blocks each, no attention outside the middle) is
    what diffusers' converter handles; widths come from the weights.
    """
    config = load_json(VAE_CONFIG_DIR / "config.json")
    config.update(base_dim=shapes["encoder.conv1.weight"][1][0], z_dim=shapes["conv2.weight"][1][0])
    return config


def _resblock(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    out = {
        f"{prefix}residual.0.gamma": (cin, 1, 1, 1),
        f"{prefix}residual.2.weight": (cout, cin, 3, 3, 3),
        f"{prefix}residual.2.bias": (cout,),
        f"{prefix}residual.3.gamma": (cout, 1, 1, 1),
        f"{prefix}residual.6.weight": (cout, cout, 3, 3, 3),
        f"{prefix}residual.6.bias": (cout,),
    }
    if cin != cout:
        out[f"{prefix}shortcut.weight"] = (cout, cin, 1, 1, 1)
        out[f"{prefix}shortcut.bias"] = (cout,)
    return out


def _middle(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    out = _resblock(f"{prefix}middle.0.", dim, dim)
    out.update({
        f"{prefix}middle.1.norm.gamma": (dim, 1, 1),
        f"{prefix}middle.1.to_qkv.weight": (dim * 3, dim, 1, 1),
        f"{prefix}middle.1.to_qkv.bias": (dim * 3,),
        f"{prefix}middle.1.proj.weight": (dim, dim, 1, 1),
        f"{prefix}middle.1.proj.bias": (dim,),
    })
    out.update(_resblock(f"{prefix}middle.2.", dim, dim))
    return out


def expected_vae_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Wan 2.1 VAE in Wan's key names (``wan/modules/vae.py``), with shapes."""
    base, z = config["base_dim"], config["z_dim"]
    mult, n_res = list(config["dim_mult"]), config["num_res_blocks"]
    down_t = list(config["temperal_downsample"])
    out: dict[str, tuple[int, ...]] = {
        "encoder.conv1.weight": (base, 3, 3, 3, 3),
        "encoder.conv1.bias": (base,),
    }
    dims = [base * u for u in [1, *mult]]
    index = 0
    for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
        for _ in range(n_res):
            out.update(_resblock(f"encoder.downsamples.{index}.", cin, cout))
            cin, index = cout, index + 1
        if i != len(mult) - 1:
            out[f"encoder.downsamples.{index}.resample.1.weight"] = (cout, cout, 3, 3)
            out[f"encoder.downsamples.{index}.resample.1.bias"] = (cout,)
            if down_t[i]:
                out[f"encoder.downsamples.{index}.time_conv.weight"] = (cout, cout, 3, 1, 1)
                out[f"encoder.downsamples.{index}.time_conv.bias"] = (cout,)
            index += 1
    top = dims[-1]
    out.update(_middle("encoder.", top))
    out.update({
        "encoder.head.0.gamma": (top, 1, 1, 1),
        "encoder.head.2.weight": (z * 2, top, 3, 3, 3),
        "encoder.head.2.bias": (z * 2,),
        "conv1.weight": (z * 2, z * 2, 1, 1, 1),
        "conv1.bias": (z * 2,),
        "conv2.weight": (z, z, 1, 1, 1),
        "conv2.bias": (z,),
        "decoder.conv1.weight": (top, z, 3, 3, 3),
        "decoder.conv1.bias": (top,),
    })
    out.update(_middle("decoder.", top))
    up_t = down_t[::-1]
    dims = [base * u for u in [mult[-1], *mult[::-1]]]
    index = 0
    for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
        if i in (1, 2, 3):
            cin = cin // 2
        for _ in range(n_res + 1):
            out.update(_resblock(f"decoder.upsamples.{index}.", cin, cout))
            cin, index = cout, index + 1
        if i != len(mult) - 1:
            out[f"decoder.upsamples.{index}.resample.1.weight"] = (cout // 2, cout, 3, 3)
            out[f"decoder.upsamples.{index}.resample.1.bias"] = (cout // 2,)
            if up_t[i]:
                out[f"decoder.upsamples.{index}.time_conv.weight"] = (cout * 2, cout, 3, 1, 1)
                out[f"decoder.upsamples.{index}.time_conv.bias"] = (cout * 2,)
            index += 1
    last = dims[-1]
    out.update({
        "decoder.head.0.gamma": (last, 1, 1, 1),
        "decoder.head.2.weight": (3, last, 3, 3, 3),
        "decoder.head.2.bias": (3,),
    })
    return out


def compare_layout(
    found: Shapes, expected: Mapping[str, tuple[int, ...]], *, ignore: tuple[str, ...] = ()
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) tensor names of ``found`` against ``expected``."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not k.endswith(ignore))
    wrong = sorted(
        f"{k} {list(found[k][1])} (expected {list(shape)})"
        for k, shape in expected.items()
        if k in found and tuple(found[k][1]) != tuple(shape)
    )
    return missing, unexpected, wrong
