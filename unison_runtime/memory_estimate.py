"""How much memory a plan will take, before anything heavy is loaded or run.

A 2048x2048, 121-frame video asks for hundreds of GB; without a check the OOM killer ends the
process after a minute of loading, with no word. :func:`estimate_run` adds up the peak of a job
from what is known up front — the weights in the dtypes they will run in (read from the file
headers), the latent tokens, the transformer's working set for the attention backend, the VACE
hint tensors, batched or two-pass guidance, and the VAE encode/decode of N frames at WxH (tiled
or not) — and :func:`check_fits` compares it with what the device has free, raising
:class:`MemoryWontFit` with one line: the estimate, what is free, and concrete ways out.

The numbers are an accounting, not a simulation: each part is a count of the tensors that are
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
#: Single-frame (image) VAE work. 6.0 was fitted on one 256x256 image run (0.97x); repeated runs of
#: the same job on the merged engine measured 136-164 MiB of peak RSS against 120 MiB estimated, so
#: 8.0 (167 MiB): an over-count refuses little that fits, an under-count lets the OOM killer in. At
#: the released VAE's shapes this counts ~31 KB per output pixel against ~22 KB measured on the CPU.
VAE_WORK_FACTOR = 8.0
#: Videos go through the VAE in 4-frame chunks, and a fresh process pays the causal 3D convolutions'
#: workspaces for each new shape on top: measured 3.5-5.5x the single-frame accounting at the old
#: 6.0 on the CPU (bench_memory_estimate). The product with VAE_WORK_FACTOR stays the fitted 6.0 x 5.5 = 33.
VAE_VIDEO_FACTOR = 33.0 / VAE_WORK_FACTOR
OUTPUT_COPIES = 3.0  # decoded video: torch.cat of the chunks, then scaling/clamping, then the CPU copy
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


@dataclass(frozen=True)
class RunSettings:
    """The choices that change the peak. ``device`` holds the transformer and VAE, ``text_device``
    umT5 (``None``: ``device``), ``stage_one_device`` the Qwen planner (``None``: ``device``).

    ``attention``: ``"math"`` (eager / SDPA's math kernel) keeps the L x L scores; ``"sdpa"`` and
    ``"flash"`` work in blocks. ``low_memory``: stage one and umT5 are released before sampling.
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


def weight_bytes(paths: Iterable[str | Path | None], dtype: str | None) -> int:
    """Bytes the weights in ``paths`` (files or folders) take once loaded in ``dtype``.

    safetensors files are counted from their headers (each floating tensor at ``dtype``'s width,
    integer tensors as stored); other files (``.pth``, ``.bin``) by their size on disk.
    ``dtype`` ``None`` keeps the stored widths.
    """
    width = DTYPE_BYTES.get(str(dtype).lower()) if dtype is not None else None
    total = 0
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
            count = math.prod(int(n) for n in info.get("shape", []))
            floating = stored.startswith(("F", "BF"))
            total += count * (width if floating and width else _SAFETENSORS_BYTES.get(stored, 4))
    return total


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
    stage_one: Iterable[str | Path | None] = (), stage_one_dtype: str | None = None,
) -> ModelFootprint:
    """A footprint from the files :func:`unison_runtime.models_dir.find_models` found (``ModelPaths``).

    A diffusers folder gives its own configs; single files use the shipped Wan2.1-VACE-1.3B and
    Wan VAE configs (the files' layout was already identified as those by the search).
    """
    text_dtype = text_dtype or transformer_dtype
    folder = getattr(paths, "diffusers_dir", None)
    if folder is not None:
        folder = Path(folder)
        parts = {name: [folder / name] for name in ("transformer", "vae", "text_encoder")}
        configs = (_json_config(folder / "transformer", "wan2.1-vace-1.3b-transformer"),
                   _json_config(folder / "vae", "wan2.1-vae"))
    else:
        parts = {name: [getattr(paths, name, None)] for name in ("transformer", "vae", "text_encoder")}
        configs = (_json_config(None, "wan2.1-vace-1.3b-transformer"), _json_config(None, "wan2.1-vae"))
    return ModelFootprint(
        transformer=weight_bytes(parts["transformer"], transformer_dtype),
        vae=weight_bytes(parts["vae"], vae_dtype),
        text_encoder=weight_bytes(parts["text_encoder"], text_dtype),
        transformer_config=configs[0], vae_config=configs[1],
        stage_one=weight_bytes(stage_one, stage_one_dtype),
        projector=weight_bytes([getattr(paths, "projector", None)], None),
    )


def footprint_from_models(models: Any, *, stage_one: int = 0) -> ModelFootprint:
    """A footprint from loaded :class:`~unison_runtime.vace.models.VaceModels` (the Sampler node)."""

    def size(module: Any) -> int:
        if module is None:
            return 0
        tensors = [*module.parameters(), *module.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    return ModelFootprint(transformer=size(models.transformer), vae=size(models.vae),
                          text_encoder=size(models.text_encoder),
                          transformer_config=dict(models.transformer.config), vae_config=dict(models.vae.config),
                          stage_one=stage_one)


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


def vae_work(width: int, height: int, vae_config: Mapping[str, Any], dtype_bytes: int, tiled: bool,
             video: bool = False) -> int:
    """Working set of decoding one latent frame (4 output frames) with diffusers' AutoencoderKLWan.

    The decoder upsamples level by level; each level's activations (channels x frames x area) and
    its causal-conv caches (2 frames per conv) are alive together. Tiling decodes 256x256 tiles.
    """
    if tiled:
        width, height = min(width, VAE_TILE), min(height, VAE_TILE)
    base = int(vae_config.get("base_dim", 96))
    mults = list(vae_config.get("dim_mult", [1, 2, 4, 4]))
    up_time = list(reversed(vae_config.get("temperal_downsample", [False, True, True])))
    levels = len(mults)
    frames, total = 1, 0
    for level in range(levels):
        channels = base * mults[levels - 1 - level]
        scale = 2 ** (levels - 1 - level)
        total += channels * (height // scale) * (width // scale) * (frames + 2)
        if level < len(up_time) and up_time[level]:
            frames *= 2
    return int(total * dtype_bytes * VAE_WORK_FACTOR * (VAE_VIDEO_FACTOR if video else 1.0))


def estimate_run(plan: Any, models: ModelFootprint, settings: RunSettings | None = None, *,
                 runtime: bool = True) -> MemoryEstimate:
    """The peak memory of generating ``plan`` (its width, height, num_frames) with these models.

    Phases on ``settings.device``: ``loading`` (every weight resident as the pipeline holds
    them), ``encoding`` (weights + the VAE encoding the source frames), ``sampling`` (weights +
    the transformer's working set; stage one and umT5 are gone with ``low_memory``) and
    ``decoding`` (the VAE's working set and the decoded frames). Weights on another device
    (umT5 or stage one kept on the CPU) are counted in ``other_devices``. ``runtime``: add the
    fixed cost of the libraries and kernels a first job loads (off for a process already warm).
    """
    settings = settings or RunSettings()
    width, height, frames = int(plan.width), int(plan.height), int(plan.num_frames)
    device = settings.device
    t_bytes = DTYPE_BYTES.get(settings.transformer_dtype, 4)
    v_bytes = DTYPE_BYTES.get(settings.vae_dtype, 4)

    parts: dict[str, int] = {"weights: transformer": models.transformer, "weights: VAE": models.vae}
    other: dict[str, int] = {}
    resident_after_encoding = models.transformer + models.vae + models.projector

    def place(name: str, size: int, where: str | None, released: bool) -> int:
        """Count a model's weights on its device; return what stays on ``device`` through sampling."""
        if not size:
            return 0
        if where is not None and not same_device(where, device):
            other[where] = other.get(where, 0) + size
            return 0
        parts[name] = size
        return 0 if released else size

    text_kept = place("weights: umT5 text encoder", models.text_encoder, settings.text_device, settings.low_memory)
    stage_kept = place("weights: stage one (Qwen2.5-VL)", models.stage_one, settings.stage_one_device,
                       settings.low_memory)
    if models.projector:
        parts["weights: projector"] = models.projector
    all_weights = sum(size for name, size in parts.items() if name.startswith("weights"))
    sampling_weights = resident_after_encoding + text_kept + stage_kept

    tokens = latent_tokens(width, height, frames, models.transformer_config, models.vae_config,
                           settings.num_references)
    batch = 2 if settings.guidance > 1.0 and settings.batch_cfg else 1
    sampling = transformer_parts(tokens, models.transformer_config, batch=batch, dtype_bytes=t_bytes,
                                 attention=settings.attention)
    z = int(models.transformer_config.get("in_channels", 16))
    latent = tokens * 4 * z * 4  # patch 2x2 of z channels, float32
    sampling["sampling: latents and control"] = latent * (6 + (2 * z + 64) // z)
    parts.update(sampling)

    pixels = 3 * frames * width * height
    work = vae_work(width, height, models.vae_config, v_bytes, settings.vae_tiling, video=frames > 1)
    parts["encoding: source frames"] = int(pixels * 4 * SOURCE_COPIES)
    parts["encoding: VAE"] = work
    parts["decoding: VAE"] = work
    parts["decoding: frames"] = int(pixels * 4 * OUTPUT_COPIES)

    overhead = RUNTIME_OVERHEAD.get(str(device).split(":")[0], 0) if runtime else 0
    if overhead:
        parts["runtime: libraries and kernels"] = overhead
        all_weights += overhead
        sampling_weights += overhead
    phases = {
        "loading": all_weights,
        "encoding": all_weights + parts["encoding: source frames"] + work,
        "sampling": sampling_weights + sum(sampling.values()),
        "decoding": sampling_weights + work + parts["decoding: frames"],
    }
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


@dataclass(frozen=True)
class Preflight:
    """What :func:`check_fits` decided: the estimate it kept and whether it turned VAE tiling on."""

    estimate: MemoryEstimate
    free: int | None
    tiling_switched_on: bool = False


def check_fits(plan: Any, models: ModelFootprint, settings: RunSettings, *, free: int | None = None,
               resident: int = 0, margin: float = 0.9, where: str = "cli", runtime: bool = True) -> Preflight:
    """Estimate the plan and compare with what the device has free (``free``: measured if ``None``).

    Fits: returns the estimate. Fits only with a tiled VAE decode: tiling is switched on (the
    returned settings say so). Does not fit: :class:`MemoryWontFit` with one line naming the
    estimate, what is free and the ways out. Only ``margin`` of the free memory is counted on
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
    if not settings.vae_tiling:
        tiled = estimate_run(plan, models, replace(settings, vae_tiling=True), runtime=runtime)
        if tiled.peak <= budget:
            return Preflight(tiled, free, tiling_switched_on=True)
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
