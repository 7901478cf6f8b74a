"""Random Wan2.1-VACE models with the released structure, scaled to what a CPU benchmark can run.

The configs start from the released ones shipped in ``unison_runtime/configs`` (Wan2.1-VACE-1.3B
transformer, Wan2.1 VAE, umT5-XXL) and change only sizes: width, depth, FFN width, the VAE's base
width, umT5's width and depth. Everything structural stays: VACE blocks on every other layer,
1x2x2 patches, 16 latent channels with the real latent statistics, a VAE with the real channel
multipliers, residual blocks and 4x/8x compression, umT5 with gated-GELU and relative buckets.

Models are written with diffusers' / transformers' own ``save_pretrained`` in the
``Wan2.1-VACE-1.3B-diffusers`` layout (as ``unison_runtime.testing.tiny_wan`` does) and cached
under the temp folder, so each benchmark loads them through the loader users run.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "unison_runtime" / "configs"


@dataclass(frozen=True)
class ScaledVace:
    """Sizes of a scaled model; the released 1.3B is heads=12, head_dim=128, ffn=8960, layers=30."""

    name: str
    heads: int
    head_dim: int
    ffn_dim: int
    num_layers: int
    text_dim: int  # umT5 d_model == transformer text_dim
    text_layers: int
    text_heads: int
    text_ff: int
    vae_base_dim: int  # released: 96
    vae_res_blocks: int = 2

    @property
    def vace_layers(self) -> list[int]:
        """Every other layer, as in the released 1.3B model (0, 2, ..., 28)."""
        return list(range(0, self.num_layers, 2))


#: For the sampler benchmarks: width 256 (2 heads of the released 128), 6 layers (3 with VACE).
SAMPLER_MODEL = ScaledVace("sampler", heads=2, head_dim=128, ffn_dim=1536, num_layers=6, text_dim=512,
                           text_layers=2, text_heads=8, text_ff=1024, vae_base_dim=16)
#: Tiny, for ``--quick`` smoke runs (one 128-wide head: the width single-file loaders can read).
QUICK_MODEL = ScaledVace("quick", heads=1, head_dim=128, ffn_dim=64, num_layers=2, text_dim=32, text_layers=1,
                         text_heads=4, text_ff=64, vae_base_dim=8)


def _released(name: str) -> dict:
    data = json.loads((CONFIGS / name).read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def transformer_config(spec: ScaledVace) -> dict:
    config = _released("wan2.1-vace-1.3b-transformer/config.json")
    config.update(num_attention_heads=spec.heads, attention_head_dim=spec.head_dim, ffn_dim=spec.ffn_dim,
                  num_layers=spec.num_layers, vace_layers=spec.vace_layers, text_dim=spec.text_dim)
    return config


def vae_config(spec: ScaledVace) -> dict:
    config = _released("wan2.1-vae/config.json")
    config.update(base_dim=spec.vae_base_dim, num_res_blocks=spec.vae_res_blocks)
    return config


def text_config(spec: ScaledVace, vocab_size: int) -> dict:
    config = _released("umt5-xxl-encoder/config.json")
    config.update(d_model=spec.text_dim, d_kv=spec.text_dim // spec.text_heads, num_heads=spec.text_heads,
                  d_ff=spec.text_ff, num_layers=spec.text_layers, num_decoder_layers=spec.text_layers,
                  vocab_size=vocab_size)
    return config


def cache_root() -> Path:
    """Where built models are kept between runs (``UNISON_BENCH_CACHE`` or the temp folder)."""
    root = Path(os.environ.get("UNISON_BENCH_CACHE") or Path(tempfile.gettempdir()) / "unison-bench-models")
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_scaled_vace(spec: ScaledVace, directory: str | Path | None = None, *, seed: int = 0) -> Path:
    """Write (once) a random model of ``spec`` in the diffusers layout; returns its directory."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACEPipeline, WanVACETransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from unison_runtime.testing.tiny_wan import build_tiny_tokenizer

    directory = Path(directory) if directory is not None else cache_root() / f"vace-{spec.name}-{seed}"
    stamp = directory / "bench_spec.json"
    wanted = json.dumps({**asdict(spec), "seed": seed}, sort_keys=True)
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(directory / "tokenizer"), local_files_only=True)
    torch.manual_seed(seed)
    transformer = WanVACETransformer3DModel(**transformer_config(spec))
    vae = AutoencoderKLWan(**vae_config(spec))
    text_encoder = UMT5EncoderModel(UMT5Config(**text_config(spec, len(tokenizer)))).eval()
    scheduler = UniPCMultistepScheduler.from_config(_released("wan2.1-scheduler/scheduler_config.json"))
    pipeline = WanVACEPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                               transformer=transformer)
    pipeline.save_pretrained(directory, safe_serialization=True)
    stamp.write_text(wanted, encoding="utf-8")
    return directory


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Geometry:
    """One generation's shape: pixels, frames, steps, and the text context length both branches use."""

    width: int
    height: int
    frames: int
    steps: int
    context_length: int

    def video_tokens(self, patch: int = 2, spatial: int = 8, temporal: int = 4) -> int:
        """Transformer sequence length: latent frames x (h / 2) x (w / 2) (1x2x2 patches)."""
        latent_frames = (self.frames - 1) // temporal + 1
        return latent_frames * (self.height // spatial // patch) * (self.width // spatial // patch)

    def describe(self) -> str:
        return (f"{self.width}x{self.height}x{self.frames}, {self.steps} steps, {self.video_tokens()} video tokens, "
                f"context {self.context_length}")


#: The released default is 832x480x81, 50 steps: 21 x 30 x 52 = 32,760 video tokens, context 2048.
RELEASED_GEOMETRY = Geometry(832, 480, 81, 50, 2048)


def pick_device(requested: str | None = None) -> str:
    """``cuda`` when a GPU is usable (the GPU path of issue 9, item 6), else ``cpu``; or what was asked."""
    import torch

    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock time covers it."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_label(device: str, transformer=None) -> str:
    """The device for the machine column; on a GPU also its attention backend (issue 9, item 6)."""
    import torch

    if not device.startswith("cuda"):
        return f"cpu ({torch.get_num_threads()} torch threads)"
    from unison_runtime.attention import flash_attention_available

    backend = attention_backend(transformer) if transformer is not None else "?"
    flash = "installed" if flash_attention_available() else "not installed"
    return f"{torch.cuda.get_device_name(device)} (attention: {backend}; flash-attn {flash})"


def attention_backend(transformer) -> str:
    """The backend the transformer's attention processors use; unset means diffusers' default (native SDPA)."""
    import os

    names = set()
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend
            names.add(str(getattr(backend, "value", backend)) if backend is not None else None)
    default = os.environ.get("DIFFUSERS_ATTN_BACKEND", "native")
    resolved = sorted({name or default for name in names})
    return "/".join(resolved) if resolved else "unknown"


def materialize(models) -> None:
    """Copy every weight of the loaded models into private memory (benchmark setup, shared by all arms).

    The loaders map safetensors files zero-copy, so weights live in the page cache. On this VM the
    kernel pages such file pages out proactively (DAMON ``pageout``; see BENCHMARKS.md) and a later
    step stalls for seconds re-reading them, which would land on whichever arm was running. Private
    copies cannot be paged out (no swap), so timings measure the engines, not the page cache.
    """
    import torch

    with torch.no_grad():
        for part in (models.transformer, models.vae, models.text_encoder):
            if part is None:
                continue
            for tensor in [*part.parameters(), *part.buffers()]:
                tensor.data = tensor.data.clone()
