"""How much memory a plan will take, before anything heavy is loaded or run.

A 2048x2048, 121-frame video asks for hundreds of GB; without a check the OOM killer ends the
process after a minute of loading, with no word. :func:`estimate_run` adds up the peak of a job
from what is known up front — the weights in the dtypes they will run in (read from the file
headers), the latent tokens, the transformer's working set for the attention backend, the VACE
hint tensors, batched or two-pass guidance, and the VAE encode/decode of N frames at WxH (tiled
or not) — and :func:`check_fits` compares it with what the device has free, raising
:class:`MemoryWontFit` with one line: the estimate, what is free, and concrete ways out.

This is the pack's one memory accounting: the CLI's preflight, its choice of staging and guidance
batching (:func:`choose_memory_mode`), the pipeline and the ComfyUI nodes (``nodes/vram_estimate.py``)
all ask it. The numbers are an accounting, not a simulation: each part is a count of the tensors that are
alive together at that part's peak (from diffusers' ``WanVACETransformer3DModel`` forward and
``AutoencoderKLWan`` decode), times a small factor fitted on measured peaks of tiny models
(``tests/test_memory_estimate.py`` compares them; BENCHMARKS.md shows the table). Only the
standard library, psutil and (for CUDA) torch are used, so the check runs in well under a second.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import OutOfMemory, UnisonError
from .progress import human_size

CONFIGS = Path(__file__).with_name("configs")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                      "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER = 100 * 1024 * 1024

# Fitted on measured peaks (see the module docstring): live copies of each part's unit tensor.
TRANSFORMER_FACTOR = 1.0
#: Frames a causal convolution of the Wan VAE keeps from the previous chunk (diffusers' ``CACHE_T``).
VAE_CACHE_FRAMES = 2
#: Chunk-sized tensors the CPU's 3D convolutions and allocator add beside the counted ones (fitted on
#: the released-shape VAE decoding 128-256 pixel frames: bench_memory_vae, BENCHMARKS.md section 7).
CPU_CONV_COPIES = 8
#: PyTorch runs a batch-1 3x3x3 convolution through oneDNN only when N x C x T x H exceeds this
#: (aten/native/Convolution.cpp, ``use_mkldnn``); below, ``slow_conv3d`` unfolds its input (small VAEs).
ONEDNN_MIN_ROWS = 20480
#: Unfold-sized buffers alive at a ``slow_conv3d`` peak (fitted on the tiny VAEs of bench_memory_estimate:
#: 1.09-1.64x of their measured peaks; with 2 the 128x128x9 case measured 0.78x).
SLOW_CONV_COPIES = 3
OUTPUT_COPIES = 3.0  # decoded video: torch.cat of the chunks, then scaling/clamping, then the CPU copy
#: A tiled decode keeps every tile's decoded clip until they are blended: 256-pixel tiles every
#: 192 pixels (diffusers' tile_sample_min / tile_sample_stride) hold (256/192)^2 of the output.
TILE_OVERLAP = (256 / 192) ** 2
SOURCE_COPIES = 5.0  # source video in [-1, 1], its mask, the two masked copies, and the float input frames
#: Libraries, kernels and allocator pools a first job adds to the process (measured: bench_memory_estimate).
RUNTIME_OVERHEAD = {"cpu": 448 * 1024**2, "cuda": 512 * 1024**2}  # CUDA: the context and cuBLAS/cuDNN workspaces
CONTEXT_TOKENS = 2048  # both branches are zero-padded to this (DESIGN section 8)
#: The tile diffusers' AutoencoderKLWan decodes at a time with tiling on (tile_sample_min_height/width).
VAE_TILE = 256


class MemoryWontFit(OutOfMemory):
    """The plan's estimated peak is larger than what the device has free; raised before any work."""

    def __init__(self, message: str, estimate: MemoryEstimate) -> None:
        self.estimate = estimate
        super().__init__(message, stage="memory check before loading")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ModelFootprint:
    """What the estimate needs to know about the models: weight bytes as they will sit in memory
    (in the dtype each runs in) and the transformer and VAE configs (for the activation sizes).

    ``stage_one`` is the Qwen planner (0 for the rule planner); ``projector`` is small but counted.
    """

    transformer: int
    vae: int
    text_encoder: int
    transformer_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]
    stage_one: int = 0
    projector: int = 0
    text_config: Mapping[str, Any] = field(default_factory=dict)
    text_dtype: str = "fp32"
    #: Stage one's largest transient beside its weights: the LM head cast for the logits (see :func:`lm_head_bytes`).
    stage_one_work: int = 0
    #: Bytes of the transformer's weights that are views of its file (stored fp16 / fp8 kept): on the CPU the
    #: sampler gives their pages back before decoding (:mod:`unison_runtime.mapped_pages`).
    transformer_mapped: int = 0


@dataclass(frozen=True)
class RunSettings:
    """The choices that change the peak. ``device`` holds the transformer and VAE, ``text_device``
    umT5 (``None``: ``device``), ``stage_one_device`` the Qwen planner (``None``: ``device``).

    ``attention``: ``"math"`` (eager / SDPA's math kernel) keeps the L x L scores; ``"sdpa"`` and
    ``"flash"`` work in blocks. ``low_memory``: staged, one model at a time (stage one plans and
    is released, umT5 encodes and is released, then the transformer and VAE load).
    ``text_kv_cache``: the sampler keeps each context's text keys and values for the whole run
    (:mod:`.vace.text_kv`, on by default), counted while sampling.
    """

    device: str = "cpu"
    text_device: str | None = None
    stage_one_device: str | None = None
    transformer_dtype: str = "fp32"
    vae_dtype: str = "fp32"
    attention: str = "sdpa"
    batch_cfg: bool = True
    guidance: float = 5.0
    vae_tiling: bool = False
    low_memory: bool = False
    num_references: int = 0
    text_kv_cache: bool = True


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak of a job, per device, with the parts that make it up (bytes).

    ``parts`` names every counted piece (``weights: transformer``, ``sampling: VACE hints``, ...);
    ``phases`` the total in use at each phase's peak on ``device`` (``loading``, ``encoding``,
    ``sampling``, ``decoding``); ``peak`` is the largest. ``other_devices`` holds the peak on
    another device (umT5 or stage one kept on the CPU while the rest runs on a GPU).
    """

    device: str
    peak: int
    phases: dict[str, int]
    parts: dict[str, int]
    settings: RunSettings
    other_devices: dict[str, int] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    def largest_parts(self, count: int = 3) -> list[tuple[str, int]]:
        return sorted(self.parts.items(), key=lambda item: -item[1])[:count]

    def summary(self) -> str:
        """``about 312 GB on cpu (peak while sampling: ...)`` for messages and logs."""
        parts = ", ".join(f"{name} {human_size(size)}" for name, size in self.largest_parts())
        return f"about {human_size(self.peak)} on {self.device} (peak while {self.peak_phase}; {parts})"


# --------------------------------------------------------------------------- weights from files


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes), read without the tensors."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise UnisonError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER:
            raise UnisonError(f"{path}: safetensors header of {length} bytes is not plausible")
        return json.loads(handle.read(length))


def weight_bytes(paths: Iterable[str | Path | None], dtype: str | None, *, keep_narrower: bool = False) -> int:
    """Bytes the weights in ``paths`` (files or folders) take once loaded to compute in ``dtype``.

    safetensors files are counted from their headers (each floating tensor at ``dtype``'s width,
    integer tensors as stored); other files (``.pth``, ``.bin``) by their size on disk.
    ``dtype`` ``None`` keeps the stored widths. ``keep_narrower``: matrices stored narrower than
    ``dtype`` stay as stored (:mod:`unison_runtime.vace.stored_precision` casts them layer by
    layer), so they count at their stored width; vectors (norms, biases) are converted.
    """
    return _held_and_kept(paths, dtype, keep_narrower)[0]


def _held_and_kept(paths: Iterable[str | Path | None], dtype: str | None, keep_narrower: bool) -> tuple[int, int]:
    """(:func:`weight_bytes`, bytes of the matrices kept as stored). Kept matrices of a single file are views of
    it, whose pages the CPU sampler gives back while the VAE works (:mod:`unison_runtime.mapped_pages`); a
    little high: the few embedder matrices the loader converts all the same count (~50 MB at 1.3B)."""
    width = DTYPE_BYTES.get(str(dtype).lower()) if dtype is not None else None
    total = kept = 0
    for path in _weight_files(paths):
        if path.suffix != ".safetensors":
            total += path.stat().st_size
            continue
        try:
            header = safetensors_header(path)
        except (OSError, ValueError, UnisonError):
            total += path.stat().st_size
            continue
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            stored = str(info.get("dtype", "F32"))
            shape = [int(n) for n in info.get("shape", [])]
            count = math.prod(shape)
            floating = stored.startswith(("F", "BF"))
            size = _SAFETENSORS_BYTES.get(stored, 4)
            if floating and width and keep_narrower and len(shape) == 2 and size < width:
                kept += count * size
            elif floating and width:
                size = width
            total += count * size
    return total, kept


def _weight_files(paths: Iterable[str | Path | None]) -> list[Path]:
    files = []
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.suffix in (".safetensors", ".pth", ".pt", ".bin",
                                                                               ".ckpt") and p.is_file())
        elif path.is_file():
            files.append(path)
    return files


def _json_config(folder: Path | None, fallback: str) -> dict[str, Any]:
    if folder is not None and (folder / "config.json").is_file():
        try:
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    return json.loads((CONFIGS / fallback / "config.json").read_text(encoding="utf-8"))


def footprint_from_paths(
    paths: Any, *, transformer_dtype: str, vae_dtype: str = "fp32", text_dtype: str | None = None,
    stage_one: Iterable[str | Path | None] = (), stage_one_dtype: str | None = None, cast_per_layer: bool = True,
    stage_one_lora: str | Path | None = None,
) -> ModelFootprint:
    """A footprint from the files :func:`unison_runtime.models_dir.find_models` found (``ModelPaths``).

    Each dtype is the one the part computes in; ``cast_per_layer`` (the loaders' default) keeps
    matrices stored narrower than that as stored (fp8 umT5, fp16 transformer, the bf16 Qwen
    release on a CPU computing in fp32). A diffusers folder gives its own configs; single files
    use the shipped Wan2.1-VACE-1.3B, Wan VAE and umT5-XXL configs (the files' layout was already
    identified as those by the search).
    """
    text_dtype = text_dtype or transformer_dtype
    folder = getattr(paths, "diffusers_dir", None)
    if folder is not None:
        folder = Path(folder)
        parts = {name: [folder / name] for name in ("transformer", "vae", "text_encoder")}
        configs = (_json_config(folder / "transformer", "wan2.1-vace-1.3b-transformer"),
                   _json_config(folder / "vae", "wan2.1-vae"),
                   _json_config(folder / "text_encoder", "umt5-xxl-encoder"))
    else:
        parts = {name: [getattr(paths, name, None)] for name in ("transformer", "vae", "text_encoder")}
        configs = (_transformer_config_from_file(getattr(paths, "transformer", None)), _json_config(None, "wan2.1-vae"),
                   _umt5_config_from_file(getattr(paths, "text_encoder", None)))
    keep = {"keep_narrower": cast_per_layer}
    stage_one = list(stage_one)
    untied, cast = lm_head_bytes(stage_one, stage_one_lora, stage_one_dtype, **keep)
    stage_one_bytes = weight_bytes(stage_one, stage_one_dtype, **keep)
    single_file = folder is None and str(parts["transformer"][0] or "").endswith(".safetensors")
    transformer, transformer_kept = _held_and_kept(parts["transformer"], transformer_dtype, cast_per_layer)
    return ModelFootprint(
        transformer_mapped=transformer_kept if single_file else 0,  # kept matrices of a single file are mapped
        transformer=transformer,
        vae=weight_bytes(parts["vae"], vae_dtype),
        text_encoder=weight_bytes(parts["text_encoder"], text_dtype, **keep),
        transformer_config=configs[0], vae_config=configs[1],
        stage_one=stage_one_bytes + untied if stage_one_bytes else 0,
        projector=weight_bytes([getattr(paths, "projector", None)], None),
        text_config=configs[2], text_dtype=text_dtype,
        stage_one_work=cast if stage_one_bytes else 0,
    )


def lm_head_bytes(stage_one: Iterable[str | Path | None], lora: str | Path | None, dtype: str | None, *,
                  keep_narrower: bool = True) -> tuple[int, int]:
    """(held, work): stage one's LM head beyond the base folder's weights, from the files' headers.

    ``held``: a base that ties its LM head to the token embedding (Qwen2.5-VL-3B) gets a matrix of its
    own when the LoRA saves ``lm_head`` (Unison's saves it beside ``embed_tokens``): one more
    vocab x hidden matrix at the stored width once merged (0.58 GiB in bf16 at 3B). ``work``: with the
    matrices kept narrower than the compute dtype, the LM head is cast whole for the logits, the
    largest per-layer cast (vocab x hidden at the compute width: 1.16 GiB in fp32 at 3B). Measured at
    released size: 7.55 GiB held after the merge, a peak of 8.72 GiB in the first forward
    (BENCHMARKS.md section 8). (0, 0) when the files do not say.
    """
    embedding = head = None
    for path in _weight_files(stage_one):
        if path.suffix != ".safetensors":
            continue
        try:
            header = safetensors_header(path)
        except (OSError, ValueError, UnisonError):
            continue
        for name, info in header.items():
            if isinstance(info, dict) and name.endswith("embed_tokens.weight"):
                embedding = info
            elif isinstance(info, dict) and name.endswith("lm_head.weight"):
                head = info
    if embedding is None or len(embedding.get("shape", [])) != 2:
        return 0, 0
    count = math.prod(int(n) for n in embedding["shape"])
    stored = _SAFETENSORS_BYTES.get(str(embedding.get("dtype", "F32")), 4)
    held = count * stored if head is None and _lora_saves_lm_head(lora) else 0
    width = DTYPE_BYTES.get(str(dtype).lower()) if dtype is not None else None
    work = count * width if keep_narrower and width and width > stored else 0
    return held, work


def _lora_saves_lm_head(lora: str | Path | None) -> bool:
    """Whether the adapter at ``lora`` saves a whole ``lm_head`` (peft's ``modules_to_save``)."""
    config = Path(lora) / "adapter_config.json" if lora is not None else None
    if config is None or not config.is_file():
        return False
    try:
        saved = json.loads(config.read_text(encoding="utf-8")).get("modules_to_save") or []
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(saved, list) and "lm_head" in saved


def _transformer_config_from_file(path: str | Path | None) -> dict[str, Any]:
    """The VACE transformer's dimensions read from a single file's header (width, blocks, VACE blocks,
    FFN), so a smaller transformer is not costed as the 1.3B release (its text K/V alone is 2.1 GiB in
    fp32); the shipped 1.3B config when the header cannot be read. Heads as the loader decides them
    (Wan's ``config.json`` beside the file, else 128-wide heads; one head for a width that does not
    split so, which changes nothing counted but the math-attention scores)."""
    config = _json_config(None, "wan2.1-vace-1.3b-transformer")
    if path is None or Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return config
    from .vace.files import wan_model_config
    from .vace.wan_keys import identify, shapes_from_header, transformer_config

    try:
        shapes = shapes_from_header(safetensors_header(path))
        identity = identify(shapes)
        if identity.kind != "wan-vace":
            return config
        bare = {k[len(identity.prefix):]: v for k, v in shapes.items() if k.startswith(identity.prefix)}
        wan = wan_model_config(Path(path).parent, identity.details["dim"])  # as the loader reads it
        try:
            return transformer_config(bare, num_heads=wan.get("num_heads"), vace_layers=wan.get("vace_layers"))
        except ValueError:
            return transformer_config(bare, num_heads=1)
    except (OSError, ValueError, KeyError, IndexError, TypeError, UnisonError):
        return config


def _umt5_config_from_file(path: str | Path | None) -> dict[str, Any]:
    """umT5's widths read from a single file's header (``shared.weight``, the gated FFN, the relative
    bias), so a smaller encoder is not costed as umT5-XXL; the shipped XXL config otherwise."""
    config = _json_config(None, "umt5-xxl-encoder")
    if path is None or Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return config
    try:
        header = safetensors_header(path)
    except (OSError, ValueError, UnisonError):
        return config
    shapes = {name.split("encoder.")[-1]: info.get("shape") for name, info in header.items() if isinstance(info, dict)}
    for key, field_name, axis in (("shared.weight", "d_model", 1), ("block.0.layer.1.DenseReluDense.wi_0.weight",
                                                                    "d_ff", 0),
                                  ("block.0.layer.0.SelfAttention.relative_attention_bias.weight", "num_heads", 1)):
        shape = shapes.get(key)
        if isinstance(shape, list) and len(shape) > axis:
            config[field_name] = int(shape[axis])
    return config


def footprint_from_models(models: Any, *, stage_one: int = 0) -> ModelFootprint:
    """A footprint from loaded :class:`~unison_runtime.vace.models.VaceModels` (the Sampler node).

    Each distinct tensor counts once (umT5's tied embedding), at the size it is held in (stored
    fp8 / fp16 weights at their stored size).
    """

    def size(module: Any) -> int:
        if module is None:
            return 0
        seen: set[int] = set()
        total = 0
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_meta or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
        return total

    text = models.text_encoder
    text_config = text.config.to_dict() if text is not None and hasattr(text.config, "to_dict") else {}
    # The compute dtype: a norm's (vectors are converted at load; stored fp8 / fp16 matrices are not).
    vectors = [p.dtype for p in (text.parameters() if text is not None else []) if p.ndim == 1]
    text_dtype = dtype_name(vectors[0]) if vectors else "fp32"
    return ModelFootprint(transformer=size(models.transformer), vae=size(models.vae),
                          text_encoder=size(text),
                          transformer_config=dict(models.transformer.config), vae_config=dict(models.vae.config),
                          stage_one=stage_one, text_config=text_config, text_dtype=text_dtype,
                          transformer_mapped=_mapped_on_cpu(models.transformer, models.device))


def _mapped_on_cpu(module: Any, device: Any) -> int:
    """Bytes of ``module``'s weights that are views of its file, when it computes on the CPU (else 0)."""
    if module is None or not same_device(str(device), "cpu"):
        return 0
    from . import mapped_pages

    return mapped_pages.mapped_bytes(mapped_pages.tensors_of(module))


_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def dtype_name(dtype: Any) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for a torch dtype (or its name); fp32 for anything else."""
    return _DTYPE_NAMES.get(str(dtype), str(dtype) if str(dtype) in DTYPE_BYTES else "fp32")


def text_encoding_bytes(text_config: Mapping[str, Any], dtype: str = "fp32", *, tokens: int = 512) -> int:
    """umT5 encoding one prompt of up to ``tokens`` tokens, beside its weights.

    A few [tokens, d_ff] / [tokens, d_model] activations and the [heads, tokens, tokens] float32
    scores, plus the feed-forward's three matrices cast to the compute dtype while that layer
    runs (weights kept stored, :mod:`unison_runtime.vace.stored_precision`).
    """
    if not text_config:
        return 0
    size = DTYPE_BYTES.get(dtype, 4)
    d_ff, d_model = int(text_config.get("d_ff", 10240)), int(text_config.get("d_model", 4096))
    return (tokens * (3 * d_ff + 6 * d_model) * size + int(text_config.get("num_heads", 64)) * tokens * tokens * 4
            + 3 * d_ff * d_model * size)


# --------------------------------------------------------------------------- the accounting


def _scales(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    down = list(vae_config.get("temperal_downsample", [False, True, True]))
    return 2 ** sum(bool(d) for d in down), 2 ** len(down)


def latent_tokens(width: int, height: int, num_frames: int, transformer_config: Mapping[str, Any],
                  vae_config: Mapping[str, Any], num_references: int = 0) -> int:
    """Tokens the transformer attends over: latent frames (+ references) x (H / 16) x (W / 16) for Wan."""
    temporal, spatial = _scales(vae_config)
    patch = list(transformer_config.get("patch_size", [1, 2, 2]))
    frames = (num_frames - 1) // temporal + 1 + num_references
    return (frames // patch[0]) * (height // spatial // patch[1]) * (width // spatial // patch[2])


def transformer_parts(tokens: int, config: Mapping[str, Any], *, batch: int, dtype_bytes: int,
                      attention: str) -> dict[str, int]:
    """The transformer's working set for one forward of ``batch`` x ``tokens`` (bytes, per part).

    diffusers' WanVACETransformer3DModel runs every VACE block first and keeps each block's hint
    (``len(vace_layers)`` tensors of [B, L, D]) for the main blocks; inside a block the peak is
    the feed-forward (the [B, L, ffn] projection and its GELU) next to the residual stream and its
    float32 norm, or the q/k/v/output of self-attention, whichever is larger.
    """
    heads = int(config.get("num_attention_heads", 12))
    dim = heads * int(config.get("attention_head_dim", 128))
    ffn = int(config.get("ffn_dim", 4 * dim))
    hints = len(config.get("vace_layers", []))
    unit = batch * tokens
    stream = unit * dim * (2 * dtype_bytes + 2 * 4)  # hidden states, VACE control stream, fp32 norm + modulation
    block = max(unit * ffn * dtype_bytes * 2, unit * dim * dtype_bytes * 5)
    parts = {"sampling: VACE hints": int(hints * unit * dim * dtype_bytes * TRANSFORMER_FACTOR),
             "sampling: block activations": int((stream + block) * TRANSFORMER_FACTOR),
             "sampling: rotary tables": tokens * int(config.get("attention_head_dim", 128)) * 8}
    if attention in ("math", "eager"):
        parts["sampling: attention scores"] = batch * heads * tokens * (tokens + CONTEXT_TOKENS) * dtype_bytes * 2
    return parts


def text_kv_bytes(config: Mapping[str, Any], *, contexts: int, dtype_bytes: int,
                  context_tokens: int = CONTEXT_TOKENS) -> int:
    """What :mod:`.vace.text_kv` holds while sampling: per context row, the text embedding plus the
    keys and values of every cross-attention (main and VACE blocks), each ``[L, dim]``.

    The same count as ``text_kv.cache_bytes`` on a loaded model, from the config alone (1.3B, fp32,
    guidance: 91 x 2 x 2048 x 1536 x 4 bytes = 2.1 GiB).
    """
    dim = int(config.get("num_attention_heads", 12)) * int(config.get("attention_head_dim", 128))
    attentions = int(config.get("num_layers", 30)) + len(config.get("vace_layers", []))
    return (2 * attentions + 1) * contexts * context_tokens * dim * dtype_bytes


def _decoder_levels(vae_config: Mapping[str, Any]) -> list[dict[str, int]]:
    """The Wan 2.1 decoder level by level (diffusers' ``WanDecoder3d``): per level its scale, the
    channels its residual blocks carry, the output frames of one chunk there, and the input
    channels of every causal convolution that keeps a feature cache at that level."""
    base = int(vae_config.get("base_dim", 96))
    mults = list(vae_config.get("dim_mult", [1, 2, 4, 4]))
    blocks = int(vae_config.get("num_res_blocks", 2)) + 1
    up_time = list(reversed(vae_config.get("temperal_downsample", [False, True, True])))
    dims = [base * m for m in [mults[-1], *reversed(mults)]]
    count = len(mults)
    levels, frames = [], 1
    for i in range(count):
        into, out = (dims[i] // 2 if i else dims[i]), dims[i + 1]
        cached = [into] + [out] * (2 * blocks - 1)  # conv1/conv2 of each residual block
        if i == 0:
            cached += [int(vae_config.get("z_dim", 16))] + [dims[0]] * 4  # conv_in, the middle block's two blocks
        upsample = i < count - 1
        if upsample and i < len(up_time) and up_time[i]:
            cached.append(out)  # the upsampler's time_conv
        if i == count - 1:
            cached.append(out)  # conv_out
        levels.append({"scale": 2 ** (count - 1 - i), "channels": out, "into": into, "frames": frames,
                       "cached": sum(cached), "upsample": int(upsample)})
        if upsample and i < len(up_time) and up_time[i]:
            frames *= 2
    return levels


def vae_decode_bytes(width: int, height: int, num_frames: int, vae_config: Mapping[str, Any], dtype_bytes: int, *,
                     tiled: bool = False, device: str = "cuda") -> int:
    """Working set of a Wan VAE decode (or encode) beside its weights, decoded frames not included.

    diffusers' ``AutoencoderKLWan`` decodes one latent frame at a time (1 output frame, then 4 per
    chunk) and keeps, for every causal 3D convolution, the last ``VAE_CACHE_FRAMES`` frames of its
    input for the next chunk: that feature cache plus one chunk's activations is the working set,
    so it grows with the frame size, not the frame count (``num_frames`` only says whether later
    4-frame chunks exist). One chunk's peak sits in a residual block of the level it runs at: the
    block's input (kept for the shortcut), its normalised input, the causally padded copy
    (frames + 2) and the convolution's output, plus the cache clone (2 frames); or in an
    upsampler (the nearest-upsampled input and the 2D convolution's output at the next scale).
    On the CPU, oneDNN's 3D convolutions and the allocator add ``CPU_CONV_COPIES`` chunk-sized
    tensors (fitted: ``bench/bench_memory_vae.py``, BENCHMARKS.md section 7), and narrow layers that
    PyTorch sends to ``slow_conv3d`` instead unfold their input (27 values per input channel); cuDNN's
    implicit GEMM needs little beyond the tensors. ``tiled``: diffusers'
    tiled decode works on 256 x 256 tiles (the tiles' outputs are counted with the frames).
    """
    if tiled:
        width, height = min(width, VAE_TILE), min(height, VAE_TILE)
    video = num_frames > 1
    cache_frames = VAE_CACHE_FRAMES if video else 1
    levels = _decoder_levels(vae_config)
    cache = chunk = 0
    for i, level in enumerate(levels):
        area = (height // level["scale"]) * (width // level["scale"])
        frames = level["frames"] if video else 1
        cache += level["cached"] * cache_frames * area
        work = level["channels"] * area * (4 * frames + 2 + 2)
        if level["upsample"]:
            ahead = levels[i + 1]
            area_next = (height // ahead["scale"]) * (width // ahead["scale"])
            frames_next = ahead["frames"] if video else 1
            work = max(work, level["channels"] * area_next * frames_next * 3 // 2 + level["channels"] * area * frames)
        if str(device).startswith("cpu"):
            rows = max(level["into"], level["channels"]) * (frames + 2) * (height // level["scale"] + 2)
            if rows > ONEDNN_MIN_ROWS:  # oneDNN: reordered copies and allocator slack
                work += CPU_CONV_COPIES * level["channels"] * frames * area
            else:  # slow_conv3d: unfolded inputs, 27 values per input channel and output value
                work += SLOW_CONV_COPIES * 27 * max(level["into"], level["channels"]) * frames * area
        chunk = max(chunk, work)
    return int((cache + chunk) * dtype_bytes)


def estimate_run(plan: Any, models: ModelFootprint, settings: RunSettings | None = None, *,
                 runtime: bool = True) -> MemoryEstimate:
    """The peak memory of generating ``plan`` (its width, height, num_frames) with these models.

    Phases on ``settings.device``: ``planning`` (the Qwen stage one, held alone when staged),
    ``encoding the prompt`` (umT5 and its activations), ``loading`` (the weights the pipeline
    holds together), ``encoding`` (+ the VAE encoding the source frames), ``sampling`` (+ the
    transformer's working set) and ``decoding`` (+ the VAE's working set and the decoded frames).
    Staged (``low_memory``), stage one and umT5 are released before the transformer and VAE load,
    so each phase holds only its own models; all-resident, every phase holds every weight.
    Weights on another device (umT5 or stage one kept on the CPU) are counted in
    ``other_devices``. ``runtime``: add the fixed cost of the libraries and kernels a first job
    loads (off for a process already warm).
    """
    settings = settings or RunSettings()
    width, height, frames = int(plan.width), int(plan.height), int(plan.num_frames)
    device = settings.device
    t_bytes = DTYPE_BYTES.get(settings.transformer_dtype, 4)
    v_bytes = DTYPE_BYTES.get(settings.vae_dtype, 4)

    parts: dict[str, int] = {"weights: transformer": models.transformer, "weights: VAE": models.vae}
    other: dict[str, int] = {}
    sampler_weights = models.transformer + models.vae + models.projector

    def place(name: str, size: int, where: str | None) -> int:
        """Count a model's weights on its device; return what it holds on ``device``."""
        if not size:
            return 0
        if where is not None and not same_device(where, device):
            other[where] = max(other.get(where, 0), size) if settings.low_memory else other.get(where, 0) + size
            return 0
        parts[name] = size
        return size

    text_here = place("weights: umT5 text encoder", models.text_encoder, settings.text_device)
    stage_here = place("weights: stage one (Qwen2.5-VL)", models.stage_one, settings.stage_one_device)
    stage_work = models.stage_one_work if models.stage_one else 0
    if stage_work and stage_here:
        parts["planning: LM head cast for the logits"] = stage_work
    elif stage_work:  # beside stage one on its own device
        where = str(settings.stage_one_device)
        alone = models.stage_one + stage_work
        other[where] = max(other[where], alone) if settings.low_memory else other[where] + stage_work
    if models.projector:
        parts["weights: projector"] = models.projector
    encode_text = text_encoding_bytes(models.text_config, models.text_dtype) if text_here else 0
    if encode_text:
        parts["encoding the prompt: umT5"] = encode_text
    kept = 0 if settings.low_memory else text_here + stage_here  # beside the transformer and VAE

    tokens = latent_tokens(width, height, frames, models.transformer_config, models.vae_config,
                           settings.num_references)
    batch = 2 if settings.guidance > 1.0 and settings.batch_cfg else 1
    sampling = transformer_parts(tokens, models.transformer_config, batch=batch, dtype_bytes=t_bytes,
                                 attention=settings.attention)
    if settings.text_kv_cache:
        sampling["sampling: text K/V (computed once)"] = text_kv_bytes(
            models.transformer_config, contexts=2 if settings.guidance > 1.0 else 1, dtype_bytes=t_bytes)
    z = int(models.transformer_config.get("in_channels", 16))
    latent = tokens * 4 * z * 4  # patch 2x2 of z channels, float32
    sampling["sampling: latents and control"] = latent * (6 + (2 * z + 64) // z)
    parts.update(sampling)

    pixels = 3 * frames * width * height
    work = vae_decode_bytes(width, height, frames, models.vae_config, v_bytes, tiled=settings.vae_tiling,
                            device=device)
    parts["encoding: source frames"] = int(pixels * 4 * SOURCE_COPIES)
    parts["encoding: VAE"] = work
    parts["decoding: VAE"] = work
    parts["decoding: frames"] = int(pixels * 4 * (OUTPUT_COPIES + (TILE_OVERLAP if settings.vae_tiling else 0)))

    overhead = RUNTIME_OVERHEAD.get(str(device).split(":")[0], 0) if runtime else 0
    if overhead:
        parts["runtime: libraries and kernels"] = overhead
    held = sampler_weights + kept + overhead
    # On the CPU the transformer's mapped pages are given back while the VAE encodes and decodes (vace/sampler.py).
    vae_held = held - (models.transformer_mapped if same_device(device, "cpu") else 0)
    phases = {
        "loading": held,
        "encoding": vae_held + parts["encoding: source frames"] + work,
        "sampling": held + sum(sampling.values()),
        "decoding": vae_held + work + parts["decoding: frames"],
    }
    if stage_here:
        phases["planning"] = overhead + stage_work + (stage_here if settings.low_memory else stage_here + text_here)
    if text_here:
        phases["encoding the prompt"] = overhead + encode_text + (
            text_here if settings.low_memory else text_here + stage_here + sampler_weights)
    return MemoryEstimate(device=device, peak=max(phases.values()), phases=phases, parts=parts,
                          settings=settings, other_devices=other)


def same_device(a: str, b: str) -> bool:
    """``cuda`` and ``cuda:0`` are one device; every ``cpu`` is the same RAM."""

    def norm(name: str) -> str:
        kind, _, index = str(name).partition(":")
        return "cpu" if kind == "cpu" else f"{kind}:{index or 0}"

    return norm(a) == norm(b)


# --------------------------------------------------------------------------- free memory and the check


def free_memory(device: str) -> int | None:
    """Bytes free for this job on ``device``: available RAM for the CPU, the CUDA driver's free
    memory for a GPU; ``None`` where it cannot be told (MPS, unknown)."""
    kind = str(device).split(":")[0]
    if kind == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        index = int(str(device).split(":")[1]) if ":" in str(device) else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return int(free)
    return None


GIB = 1024**3
#: Kept free beyond the estimate when choosing staging and guidance batching: the allocator, the OS.
HEADROOM_BYTES = int(1.5 * GIB)


@dataclass(frozen=True)
class MemoryChoice:
    """Staging and guidance batching chosen for a job, and why (the ``reason`` is printed and noted)."""

    staged: bool
    batch_cfg: bool
    reason: str


def choose_memory_mode(plan: Any, models: ModelFootprint, settings: RunSettings, *, available: int | None,
                       staged: bool | None = None, batch_cfg: bool | None = None, single_job: bool = False,
                       runtime: bool = True) -> MemoryChoice:
    """Staging (one model at a time) and guidance batching for ``plan``, from the same estimate as the check.

    Staged when everything resident would not fit in ``available`` (with ``HEADROOM_BYTES`` to
    spare); ``single_job`` (the CLI: each model is loaded once either way, so staging only lowers
    the peak) always stages. Batched guidance (both branches in one forward, a little faster) only
    when its peak fits too. ``available`` ``None`` (unknown): staged, two passes. An explicit
    ``staged`` / ``batch_cfg`` wins.
    """

    def peak(staging: bool, batched: bool) -> int:
        return estimate_run(plan, models, replace(settings, low_memory=staging, batch_cfg=batched),
                            runtime=runtime).peak

    if available is None:
        auto_staged, auto_batched, free = True, False, "unknown free memory"
    else:
        free = f"{available / GIB:.1f} GiB free"
        auto_staged = single_job or peak(False, False) + HEADROOM_BYTES > available
        auto_batched = peak(auto_staged if staged is None else staged, True) + HEADROOM_BYTES <= available
    chosen_staged = auto_staged if staged is None else staged
    chosen_batched = auto_batched if batch_cfg is None else batch_cfg
    how = "staged (one model at a time: stage one, umT5, then transformer + VAE)" if chosen_staged \
        else "all models resident"
    guidance = "batched guidance" if chosen_batched else "two-pass guidance"
    said = []
    if staged is None:
        everything = models.stage_one + models.text_encoder + models.transformer + models.vae + models.projector
        said.append(f"models {everything / GIB:.1f} GiB as held" + (", one job: staging costs no extra loading"
                                                                    if single_job else ""))
    if batch_cfg is None:
        said.append(f"estimated peak {peak(chosen_staged, chosen_batched) / GIB:.1f} GiB")
    basis = f" (chosen from {free}; {', '.join(said)})" if said else " (as asked)"
    return MemoryChoice(chosen_staged, chosen_batched, f"memory: {how}, {guidance}{basis}")


@dataclass(frozen=True)
class Preflight:
    """What :func:`check_fits` decided: the estimate it kept and whether it turned VAE tiling on."""

    estimate: MemoryEstimate
    free: int | None
    tiling_switched_on: bool = False
    text_kv_switched_off: bool = False


def check_fits(plan: Any, models: ModelFootprint, settings: RunSettings, *, free: int | None = None,
               resident: int = 0, margin: float = 0.9, where: str = "cli", runtime: bool = True) -> Preflight:
    """Estimate the plan and compare with what the device has free (``free``: measured if ``None``).

    Fits: returns the estimate. Fits only without keeping the text K/V for the run (exact either
    way, only slower), or only with a tiled VAE decode, or with both: those are switched (the
    returned settings and flags say so), the exact one first. Does not fit: :class:`MemoryWontFit`
    with one line naming the estimate, what is free and the ways out. Only ``margin`` of the free memory is counted on
    (the allocator, the OS and other processes need some). ``resident``: bytes of the estimate
    already in use (models loaded before the check), which the free figure no longer includes.
    ``where`` picks the wording of the advice: ``"cli"`` flags, ``"comfyui"`` node inputs.
    ``runtime``: count the libraries' fixed cost (off in a long-running server that paid it).
    """
    estimate = estimate_run(plan, models, settings, runtime=runtime)
    free = free_memory(settings.device) if free is None else free
    if free is None:
        return Preflight(estimate, free)
    budget = free * margin + resident
    if estimate.peak <= budget:
        return Preflight(estimate, free)
    switches = [{"text_kv_cache": False}] if settings.text_kv_cache else []
    if not settings.vae_tiling:
        switches.append({"vae_tiling": True})
        if settings.text_kv_cache:
            switches.append({"text_kv_cache": False, "vae_tiling": True})
    for switch in switches:
        lighter = estimate_run(plan, models, replace(settings, **switch), runtime=runtime)
        if lighter.peak <= budget:
            return Preflight(lighter, free, tiling_switched_on="vae_tiling" in switch,
                             text_kv_switched_off="text_kv_cache" in switch)
    raise MemoryWontFit(wont_fit_message(plan, models, estimate, budget, where, runtime), estimate)


def fitting_size(plan: Any, models: ModelFootprint, settings: RunSettings, budget: float,
                 runtime: bool = True) -> tuple[int, int, int] | None:
    """A smaller (width, height, num_frames) with the plan's aspect that fits ``budget``, or ``None``.

    Frames are shortened first (down to 4k+1 >= 1/4 of them), then the sides halved step by step.
    """
    width, height, frames = int(plan.width), int(plan.height), int(plan.num_frames)
    for _ in range(24):
        trial = _Size(width, height, frames)
        if estimate_run(trial, models, settings, runtime=runtime).peak <= budget:
            return width, height, frames
        if frames > 17 and frames > plan.num_frames // 4:
            frames = max(17, (frames - 1) // 2 // 4 * 4 + 1)
        elif width > 128 or height > 128:
            width, height = max(16, int(width * 0.75) // 16 * 16), max(16, int(height * 0.75) // 16 * 16)
        else:
            return None
    return None


@dataclass(frozen=True)
class _Size:
    width: int
    height: int
    num_frames: int


def wont_fit_message(plan: Any, models: ModelFootprint, estimate: MemoryEstimate, budget: float,
                     where: str = "cli", runtime: bool = True) -> str:
    """One line: what the plan needs, what is free, and what to change (with values that fit)."""
    settings = estimate.settings
    frames = f"{plan.num_frames} frame" + ("s" if plan.num_frames != 1 else "")
    ways = []
    smaller = fitting_size(plan, models, replace(settings, vae_tiling=True, low_memory=True), budget, runtime)
    if smaller is not None and smaller != (plan.width, plan.height, plan.num_frames):
        w, h, n = smaller
        ways.append(f"a smaller size or length (e.g. {w}x{h}, {n} frame{'s' if n != 1 else ''})")
    elif smaller is None:
        weights = sum(size for name, size in estimate.parts.items() if name.startswith(("weights", "runtime")))
        ways.append(f"smaller weights: the models alone need {human_size(weights)} here (lower-precision files "
                    "or dtypes, or another device)")
    else:
        ways.append("a smaller size or length")
    cli = where == "cli"
    if not settings.low_memory and (models.stage_one or models.text_encoder):
        ways.append("--low-memory" if cli else "unloading the planner and umT5 before sampling")
    text_with_sampler = settings.text_device is None or same_device(settings.text_device, settings.device)
    if text_with_sampler and not str(settings.device).startswith("cpu"):
        ways.append("--text-device cpu" if cli else "the text encoder on the CPU (VACE Loader)")
    if settings.batch_cfg and settings.guidance > 1.0:
        ways.append("guidance 1 (one pass per step)")
    if not settings.vae_tiling:
        ways.append("--vae-tiling" if cli else "VAE tiling")
    return (f"{plan.width}x{plan.height}, {frames} needs {estimate.summary()}, but only {human_size(budget)} "
            f"is free to use: try {', '.join(ways)}")
