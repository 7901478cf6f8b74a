"""Memory: peak resident memory while loading each model kind, and what unloading gives back (issue 9, item 4).

Each load runs in a fresh process (``--child KIND``), after everything it needs is imported and a
tiny model of the same kind was loaded once (so import-time allocations are not counted). The
figure is the peak RSS reached during the load and the first read of every weight (what the first
forward does), above the RSS just before it, divided by the size of the loaded weights in the
dtype they are loaded to (parameters + buffers). Target: <= 1.15x, i.e. no full fp32 copy of fp16
weights, no duplicate state dict. RSS includes the pages of a safetensors file while it is mapped
(zero-copy loads are paid on first use, hence the read); the private (anonymous) part, memory
really allocated, is shown next to it.

The models are random, written in the real formats by the pack's own builders (diffusers folders,
Comfy-Org / Wan single files, fp16 and scaled fp8, Qwen2.5-VL folders, ``projector.pth``), and
big enough (100-400 MB) for the ratio to mean something: released widths where the CPU allows
(VACE transformer 1536 wide with 12 heads of 128 and text_dim 4096; Qwen text width 2048; the
projector at its released 2048 -> 2048 -> 4096), fewer layers.

``--child offload`` loads stage one and stage two together, then unloads the Qwen planner
(``QwenPlanner.unload``) and the umT5 encoder (``VaceModels.release_text_encoder``), measuring the
RSS after each step.

    python -m bench.bench_memory            # builds ~2 GB of model files once (cached), then 5-12 min
    python -m bench.bench_memory --quick    # smoke run on tiny models
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    MALLOC_TUNING,
    MIB,
    PeakMemory,
    Row,
    base_parser,
    command_line,
    machine_summary,
    median,
    print_table,
    rss_bytes,
)
from bench.scaled_models import ScaledVace, cache_root, transformer_config

TARGET_RATIO = 1.15


# --------------------------------------------------------------------------- model files


@dataclass(frozen=True)
class MemoryScale:
    """Sizes of the memory-benchmark models (see the module docstring)."""

    name: str
    transformer: ScaledVace
    vae_base_dim: int
    umt5: dict
    qwen_text_hidden: int
    projector: dict


FULL = MemoryScale(
    "full",
    ScaledVace("memory", heads=12, head_dim=128, ffn_dim=8960, num_layers=1, text_dim=4096, text_layers=0,
               text_heads=1, text_ff=0, vae_base_dim=0),
    vae_base_dim=48,
    umt5={"d_model": 1024, "d_kv": 64, "num_heads": 16, "d_ff": 2816, "num_layers": 4, "vocab_size": 32000},
    qwen_text_hidden=2048,
    projector={"input_dim": 2048, "hidden_dim": 2048, "t5_dim": 4096},
)
QUICK = MemoryScale(
    "quick",
    ScaledVace("memory-quick", heads=1, head_dim=128, ffn_dim=128, num_layers=1, text_dim=64, text_layers=0,
               text_heads=1, text_ff=0, vae_base_dim=0),
    vae_base_dim=8,
    umt5={"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 1, "vocab_size": 512},
    qwen_text_hidden=64,
    projector={"input_dim": 64, "hidden_dim": 32, "t5_dim": 64},
)
SCALES = {scale.name: scale for scale in (FULL, QUICK)}

FILES = {
    "transformer_dir": "vace/transformer",
    "vace_dir": "vace",
    "transformer_fp16": "diffusion_models/wan2.1_vace_fp16.safetensors",
    "transformer_fp8": "diffusion_models/wan2.1_vace_fp8_e4m3fn_scaled.safetensors",
    "vae_dir": "vace/vae",
    "vae_safetensors": "vae/wan_2.1_vae.safetensors",
    "vae_pth": "vae/Wan2.1_VAE.pth",
    "umt5_dir": "vace/text_encoder",
    "umt5_fp16": "text_encoders/umt5_xxl_fp16.safetensors",
    "umt5_fp8": "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "umt5_pth": "text_encoders/wan/models_t5_umt5-xxl-enc-bf16.pth",
    "qwen_dir": "unison/Qwen2.5-VL",
    "qwen_bf16_dir": "unison/Qwen2.5-VL-bf16",
    "projector_pth": "unison/projector.pth",
    "projector_safetensors": "unison/projector.safetensors",
}


def build_memory_models(scale: MemoryScale, *, seed: int = 0) -> Path:
    """Write (once) every model file of ``scale`` under the bench cache; returns the folder."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACEPipeline, WanVACETransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from unison_runtime.projector import UnisonProjector
    from unison_runtime.testing import tiny_wan_files as files
    from unison_runtime.testing.tiny_projector import build_tiny_projector
    from unison_runtime.testing.tiny_qwen import build_tiny_qwen
    from unison_runtime.testing.tiny_wan import build_tiny_tokenizer
    from unison_runtime.weights import save_safetensors

    root = cache_root() / f"memory-{scale.name}-{seed}"
    stamp = root / "bench_scale.json"
    wanted = json.dumps({**asdict(scale), "seed": seed}, sort_keys=True, default=str)
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
        write_derived_files(root)
        return root
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    transformer = WanVACETransformer3DModel(**transformer_config(scale.transformer)).eval()
    vae = AutoencoderKLWan(**{**json.loads((Path(__file__).resolve().parents[1] / "unison_runtime" / "configs" /
                                            "wan2.1-vae" / "config.json").read_text()),
                              "base_dim": scale.vae_base_dim}).eval()
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(root / "vace" / "tokenizer"), local_files_only=True)
    proto = (root / "vace" / "tokenizer" / "spiece.model").read_bytes()
    umt5 = UMT5EncoderModel(UMT5Config(
        **scale.umt5, num_decoder_layers=scale.umt5["num_layers"], feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    WanVACEPipeline(tokenizer=tokenizer, text_encoder=umt5, vae=vae, scheduler=scheduler,
                    transformer=transformer).save_pretrained(root / "vace", safe_serialization=True)

    files.write_wan_transformer(transformer, root / FILES["transformer_fp16"], layout="comfy", precision="fp16")
    files.write_wan_transformer(transformer, root / FILES["transformer_fp8"], layout="comfy",
                                precision="fp8_scaled")
    del transformer
    files.write_wan_vae(vae, root / FILES["vae_safetensors"])
    files.write_wan_vae(vae, root / FILES["vae_pth"])
    del vae
    files.write_umt5_comfy(umt5, proto, root / FILES["umt5_fp16"], precision="fp16")
    files.write_umt5_comfy(umt5, proto, root / FILES["umt5_fp8"], precision="fp8_scaled")
    del umt5
    gc.collect()
    build_tiny_qwen(root / FILES["qwen_dir"], seed=seed, text_hidden=scale.qwen_text_hidden)
    build_tiny_projector(root / FILES["projector_pth"], **scale.projector, seed=seed)
    from unison_runtime.projector import load_projector

    projector: UnisonProjector = load_projector(root / FILES["projector_pth"])
    save_safetensors(projector.state_dict(), root / FILES["projector_safetensors"])
    write_derived_files(root)
    stamp.write_text(wanted, encoding="utf-8")
    return root


def write_derived_files(root: Path) -> None:
    """Files made from the ones above, written when missing: the releases' bf16 storage of umT5 and Qwen.

    Wan ships umT5 as a bf16 ``.pth`` and Qwen2.5-VL-3B-Instruct is stored in bf16; on the CPU
    both are computed in fp32, i.e. converted while loading.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, UMT5EncoderModel

    from unison_runtime.testing import tiny_wan_files as files

    pth = root / FILES["umt5_pth"]
    if not pth.is_file():
        umt5 = UMT5EncoderModel.from_pretrained(root / "vace" / "text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(root / "vace" / "tokenizer", local_files_only=True)
        files.write_umt5_wan(umt5, tokenizer, pth.parent, precision="bf16")
    qwen_bf16 = root / FILES["qwen_bf16_dir"]
    if not (qwen_bf16 / "model.safetensors").is_file():
        shutil.copytree(root / FILES["qwen_dir"], qwen_bf16, dirs_exist_ok=True)
        state = load_file(qwen_bf16 / "model.safetensors")
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v.clone() for k, v in state.items()}
        save_file(state, qwen_bf16 / "model.safetensors", metadata={"format": "pt"})


# --------------------------------------------------------------------------- what each kind loads


def _modules_bytes(*modules: Any) -> int:
    """Bytes of the distinct tensors (parameters and buffers) of ``modules``, in their loaded dtypes."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            key = tensor.untyped_storage().data_ptr()
            if key in seen or tensor.device.type == "meta":
                continue
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def _dtypes(*modules: Any) -> str:
    names: dict[str, int] = {}
    for module in modules:
        for tensor in module.parameters():
            name = str(tensor.dtype).removeprefix("torch.")
            names[name] = names.get(name, 0) + tensor.numel()
    return "/".join(name for name, _ in sorted(names.items(), key=lambda item: -item[1]))


def _loaders(root: Path) -> dict[str, tuple[str, Callable[[], Any]]]:
    """KIND -> (description, loader returning the loaded module(s)) for the files under ``root``."""
    import torch

    from unison_runtime.planner.qwen import load_planner
    from unison_runtime.projector import load_projector
    from unison_runtime.vace import files, loading

    f = {key: root / value for key, value in FILES.items()}
    cpu = "cpu"
    return {
        "transformer-diffusers-fp32": ("VACE transformer, diffusers folder (fp32) -> fp32",
                                       lambda: loading.load_transformer(f["transformer_dir"], dtype=torch.float32,
                                                                        device=cpu)),
        "transformer-diffusers-bf16": ("VACE transformer, diffusers folder (fp32) -> bf16 (the GPU default)",
                                       lambda: loading.load_transformer(f["transformer_dir"], dtype=torch.bfloat16,
                                                                        device=cpu)),
        "transformer-fp16-file": ("VACE transformer, Comfy-Org single file fp16 -> fp16",
                                  lambda: files.load_transformer_file(f["transformer_fp16"], dtype="fp16",
                                                                      device=cpu)),
        "transformer-fp16-file-cpu-default": ("VACE transformer, Comfy-Org single file fp16 -> CPU default dtype",
                                              lambda: files.load_transformer_file(f["transformer_fp16"],
                                                                                  device=cpu)),
        "transformer-fp8-scaled-file": ("VACE transformer, single file scaled fp8 -> bf16",
                                        lambda: files.load_transformer_file(f["transformer_fp8"], dtype="bf16",
                                                                            device=cpu)),
        "vae-diffusers": ("Wan VAE, diffusers folder -> fp32",
                          lambda: loading.load_vae(f["vae_dir"], dtype=torch.float32, device=cpu)),
        "vae-safetensors-file": ("Wan VAE, ComfyUI wan_2.1_vae.safetensors -> fp32",
                                 lambda: files.load_vae_file(f["vae_safetensors"], device=cpu)),
        "vae-pth-file": ("Wan VAE, Wan2.1_VAE.pth -> fp32", lambda: files.load_vae_file(f["vae_pth"], device=cpu)),
        "umt5-diffusers": ("umT5 encoder, transformers folder (fp32) -> fp32",
                           lambda: loading.load_text_encoder(f["umt5_dir"], dtype=torch.float32, device=cpu)),
        "umt5-diffusers-bf16": ("umT5 encoder, transformers folder (fp32) -> bf16 (the GPU default)",
                                lambda: loading.load_text_encoder(f["umt5_dir"], dtype=torch.bfloat16, device=cpu)),
        "umt5-wan-pth-cpu-default": ("umT5 encoder, Wan's bf16 .pth -> CPU default dtype",
                                     lambda: files.load_text_encoder(f["umt5_pth"], device=cpu)[0]),
        "umt5-fp16-file": ("umT5 encoder, ComfyUI umt5_xxl_fp16.safetensors -> fp16",
                           lambda: files.load_text_encoder(f["umt5_fp16"], dtype="fp16", device=cpu)[0]),
        "umt5-fp8-scaled-file": ("umT5 encoder, ComfyUI scaled fp8 -> bf16",
                                 lambda: files.load_text_encoder(f["umt5_fp8"], dtype="bf16", device=cpu)[0]),
        "qwen-planner": ("Qwen2.5-VL planner folder (fp32) -> fp32",
                         lambda: load_planner(f["qwen_dir"], device=cpu, dtype="fp32").model),
        "qwen-planner-bf16-cpu-default": ("Qwen2.5-VL planner folder stored bf16 (as released) -> CPU default dtype",
                                          lambda: load_planner(f["qwen_bf16_dir"], device=cpu).model),
        "projector-pth": ("projector.pth (fp32) -> fp32", lambda: load_projector(f["projector_pth"])),
        "projector-safetensors": ("projector.safetensors (fp32) -> fp32",
                                  lambda: load_projector(f["projector_safetensors"])),
    }


KINDS = (
    "transformer-diffusers-fp32", "transformer-diffusers-bf16", "transformer-fp16-file",
    "transformer-fp16-file-cpu-default", "transformer-fp8-scaled-file", "vae-diffusers", "vae-safetensors-file",
    "vae-pth-file", "umt5-diffusers", "umt5-diffusers-bf16", "umt5-wan-pth-cpu-default", "umt5-fp16-file",
    "umt5-fp8-scaled-file", "qwen-planner", "qwen-planner-bf16-cpu-default", "projector-pth", "projector-safetensors",
)


# --------------------------------------------------------------------------- child processes


def child_load(kind: str, scale: MemoryScale) -> dict[str, Any]:
    """In a fresh process: warm up on the quick model of ``kind``, then measure the load of ``scale``'s."""
    warm = _loaders(build_memory_models(QUICK))[kind][1]
    warm_module = warm()
    del warm_module
    gc.collect()
    description, load = _loaders(build_memory_models(scale))[kind]
    with PeakMemory() as peak:
        start = time.perf_counter()
        module = load()
        seconds = time.perf_counter() - start
        loaded_rss = rss_bytes()
        touch(module)
    gc.collect()
    weights = _modules_bytes(module)
    return {"kind": kind, "description": description, "weights": weights, "dtype": _dtypes(module),
            "seconds": seconds, "loaded_rss": loaded_rss, "after_gc_rss": rss_bytes(), **peak.as_dict()}


def touch(*modules: Any) -> None:
    """Read every weight once, as the first forward does.

    Loaders that map safetensors files leave the weights on disk until used (RSS grows only when
    a page is read): without this, a zero-copy load would look free and a load that keeps the
    file mapped would look cheaper than it is in use.
    """
    import torch

    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.numel() and tensor.device.type != "meta":
                    tensor.view(-1)[:: max(1, 4096 // tensor.element_size())].float().sum()


def child_offload(scale: MemoryScale) -> dict[str, Any]:
    """Stage one and stage two loaded together; RSS after unloading the planner, then after dropping umT5."""
    import torch

    from unison_runtime.planner.qwen import load_planner
    from unison_runtime.vace.loading import load_vace_diffusers
    from unison_runtime.vace.text import text_contexts

    root = build_memory_models(scale)
    base = rss_bytes()
    planner = load_planner(root / FILES["qwen_dir"], device="cpu", dtype="fp32")
    models = load_vace_diffusers(root / "vace", device="cpu", dtype=torch.float32)
    sizes = {"planner": _modules_bytes(planner.model), "umt5": _modules_bytes(models.text_encoder),
             "transformer": _modules_bytes(models.transformer), "vae": _modules_bytes(models.vae)}
    text_contexts(models, "a lion walking around in its habitat", total_length=None)
    touch(planner.model, models.text_encoder, models.transformer, models.vae)  # as after planning + sampling
    gc.collect()
    loaded = rss_bytes()
    planner.unload()
    gc.collect()
    after_planner = rss_bytes()
    models.release_text_encoder()  # what UnisonPipeline(release_text_encoder=True) does before sampling
    gc.collect()
    after_umt5 = rss_bytes()
    return {"base": base, "loaded": loaded, "after_planner": after_planner, "after_umt5": after_umt5, **sizes}


def _spawn(args: list[str]) -> dict[str, Any]:
    """A fresh process per measurement, without the glibc tuning (memory runs must see what users see)."""
    env = {key: value for key, value in os.environ.items() if key not in MALLOC_TUNING}
    done = subprocess.run([sys.executable, "-m", "bench.bench_memory", *args], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench_memory {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.strip()][-1])


# --------------------------------------------------------------------------- rows


def load_row(results: list[dict[str, Any]]) -> Row:
    first = results[0]
    ratios = [(r["peak_rss"] - r["start_rss"]) / r["weights"] for r in results]
    anon = median([(r["peak_anon"] - r["start_anon"]) / r["weights"] for r in results])
    steady = median([(r["after_gc_rss"] - r["start_rss"]) / r["weights"] for r in results])
    value = median(ratios)
    peak = median([r["peak_rss"] - r["start_rss"] for r in results])
    seconds = median([r["seconds"] for r in results])
    mapped = median([(r["loaded_rss"] - r["start_rss"]) / r["weights"] for r in results])
    note = (f"weights {first['weights'] / MIB:.0f} MiB {first['dtype']}; peak +{peak / MIB:.0f} MiB; "
            f"private (anon) peak {anon:.2f}x; RSS right after load {mapped:.2f}x, after first use {steady:.2f}x; "
            f"load {seconds:.2f} s")
    return Row(f"peak RSS during load / weights: {first['description']}", value, "x", len(results),
               f"<= {TARGET_RATIO}", value <= TARGET_RATIO, note)


def offload_rows(result: dict[str, Any]) -> list[Row]:
    rows = []
    for step, before, after, size in (("unloading the Qwen planner", "loaded", "after_planner", "planner"),
                                      ("dropping the umT5 encoder", "after_planner", "after_umt5", "umt5")):
        drop = result[before] - result[after]
        share = drop / result[size]
        rows.append(Row(f"RSS given back by {step} / its weights", share, "x", 1, ">= 0.9", share >= 0.9,
                        f"RSS {result[before] / MIB:.0f} -> {result[after] / MIB:.0f} MiB (-{drop / MIB:.0f} MiB; "
                        f"weights {result[size] / MIB:.0f} MiB)"))
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse_hidden())
    parser.add_argument("--scale", default=None, help=argparse_hidden())
    parser.add_argument("--kinds", nargs="*", default=None, help=f"only these kinds (of {', '.join(KINDS)})")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale] if args.scale else (QUICK if args.quick else FULL)
    if args.child:
        result = child_offload(scale) if args.child == "offload" else child_load(args.child, scale)
        print(json.dumps(result))
        return []
    build_memory_models(QUICK)
    build_memory_models(scale)
    repeats = args.repeats or (1 if args.quick else 3)
    rows = []
    for kind in args.kinds or KINDS:
        rows.append(load_row([_spawn(["--child", kind, "--scale", scale.name]) for _ in range(repeats)]))
    rows += offload_rows(_spawn(["--child", "offload", "--scale", scale.name]))
    print_table("Memory: peak RSS while loading, and unloading", rows,
                machine=machine_summary() + f", models {scale.name}", command=command_line("bench.bench_memory", argv))
    return rows


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
