"""Real-size memory benchmark: random weights in the released shapes and formats, run through ``run``.

Writes, piece by piece (never a whole model in memory), into ``--dir`` (default
``/work/bigfiles/unison-realsize``, never the repository):

* ``diffusion_models/wan2.1_vace_1.3B_fp16.safetensors``: Comfy-Org's layout (``model.diffusion_model.``
  prefix, Wan key names, every tensor fp16), the released Wan2.1-VACE-1.3B shapes (~4.3 GB);
* ``vae/wan_2.1_vae.safetensors``: the Wan 2.1 VAE in Wan's names, fp16 (~0.25 GB);
* ``text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors``: umT5-XXL encoder as Comfy-Org ships it:
  fp8 e4m3fn linear weights with float32 ``scale_weight`` per tensor, fp16 embedding / norms /
  relative biases, the ``scaled_fp8`` marker and an embedded ``spiece_model`` (~6.7 GB). The
  sentencepiece model is a small one built here (the real one is not downloadable here): the
  embedding still has the released 256,384 rows, only prompts tokenize into fewer ids.

Random values are drawn once into a pool and written cyclically, so writing is disk-bound. Then it
runs ``python -m unison_runtime run`` (with default flags unless ``--extra``) in a fresh child
process per job (a 64x64 image and a 9-frame 64x64 video), recording peak RSS (the kernel's
VmHWM), the RSS after each stage and each stage's time. The Qwen2.5-VL stage one is not written:
without it the rule planner plans and the context is umT5 alone (stage one's memory is measured
by ``bench_planner`` / issue 16's notes).

    python -m bench.bench_realsize                      # write (once) and run both jobs
    python -m bench.bench_realsize --jobs image --steps 2 --extra --no-low-memory
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = Path("/work/bigfiles/unison-realsize")
GIB = 1024**3
JOBS = {
    "image": "Create an image of a red fox in the snow at dawn, 64x64",
    "video": "Create a video of a red fox running in the snow, 64x64, 9 frames",
}
_POOL_ELEMENTS = 8 * 1024 * 1024
_DTYPE_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8"}


# --------------------------------------------------------------------------- piecewise safetensors writer


class _Pool:
    """Random bytes per dtype, drawn once; tensors are written as cyclic slices of them."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(_POOL_ELEMENTS, generator=g) * 0.02
        self.bytes = {torch.float16: base.half().numpy().tobytes(),
                      torch.float32: base.numpy().tobytes(),
                      torch.float8_e4m3fn: (base * 100).to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()}
        self.offset = 0

    def chunks(self, dtype: torch.dtype, nbytes: int) -> Iterator[bytes]:
        data = self.bytes[dtype]
        itemsize = torch.empty((), dtype=dtype).element_size()
        left = nbytes
        while left:
            start = (self.offset * itemsize) % len(data)
            piece = data[start:start + min(left, len(data) - start)]
            self.offset += len(piece) // itemsize + 7919  # shift so tensors do not repeat each other
            left -= len(piece)
            yield piece


def write_safetensors(path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...], bytes | None]],
                      pool: _Pool) -> Path:
    """Write ``{name: (dtype, shape, exact bytes or None for random)}`` as safetensors, streaming."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, _) in tensors.items():
        size = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            size *= d
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, (dtype, _shape, exact) in tensors.items():
            info = header[name]
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]  # type: ignore[index]
            if exact is not None:
                handle.write(exact)
                continue
            for piece in pool.chunks(dtype, nbytes):
                handle.write(piece)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- the released files


def _transformer_tensors() -> dict:
    from unison_runtime.vace.wan_keys import COMFY_PREFIX, expected_transformer_shapes, load_json

    config = load_json(ROOT / "unison_runtime/configs/wan2.1-vace-1.3b-transformer/config.json")
    return {COMFY_PREFIX + name: (torch.float16, shape, None)
            for name, shape in expected_transformer_shapes(config).items()}


def _vae_tensors() -> dict:
    from unison_runtime.vace.wan_keys import VAE_CONFIG_DIR, expected_vae_shapes, load_json

    config = load_json(VAE_CONFIG_DIR / "config.json")
    return {name: (torch.float16, shape, None) for name, shape in expected_vae_shapes(config).items()}


def _umt5_tensors() -> dict:
    from unison_runtime.testing.tiny_wan_files import build_tiny_spiece_model
    from unison_runtime.vace.umt5_files import SPIECE_KEY, expected_umt5_shapes
    from unison_runtime.vace.wan_keys import load_json

    config = load_json(ROOT / "unison_runtime/configs/umt5-xxl-encoder/config.json")
    out: dict = {}
    for name, shape in expected_umt5_shapes(config).items():
        if name == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight; Comfy-Org's file stores it once
        if len(shape) == 2 and name != "shared.weight" and "relative_attention_bias" not in name:
            out[name] = (torch.float8_e4m3fn, shape, None)
            out[name[: -len("weight")] + "scale_weight"] = (torch.float32, (), struct.pack("<f", 0.0002))
        else:
            out[name] = (torch.float16, shape, None)
    out["scaled_fp8"] = (torch.float8_e4m3fn, (0,), b"")
    proto = build_tiny_spiece_model()
    out[SPIECE_KEY] = (torch.uint8, (len(proto),), proto)
    return out


def write_released_files(directory: Path) -> dict[str, Path]:
    pool = _Pool()
    files = {
        "transformer": (directory / "diffusion_models" / "wan2.1_vace_1.3B_fp16.safetensors", _transformer_tensors),
        "vae": (directory / "vae" / "wan_2.1_vae.safetensors", _vae_tensors),
        "text_encoder": (directory / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", _umt5_tensors),
    }
    out = {}
    for part, (path, tensors) in files.items():
        if not path.is_file():
            start = time.perf_counter()
            write_safetensors(path, tensors(), pool)
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
        out[part] = path
    (directory / "unison").mkdir(exist_ok=True)
    return out


# --------------------------------------------------------------------------- the measured child


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def child(argv: list[str]) -> None:
    """Run the CLI in this process with timers around each stage; print one JSON line."""
    from unison_runtime import __main__ as cli
    from unison_runtime import pipeline as pipeline_module
    from unison_runtime.vace import sampler as sampler_module
    from unison_runtime.vace import text as text_module

    stages: list[dict] = []
    start = time.perf_counter()

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages.append({"stage": label(*args), "seconds": round(time.perf_counter() - t0, 1),
                               "rss_gib_after": round(_status()["VmRSS"] / GIB, 2),
                               "peak_gib_so_far": round(_status()["VmHWM"] / GIB, 2)})
        return wrapper

    original_get = pipeline_module.UnisonPipeline._get

    def get(self, name):
        if name in self._loaded or self._sources.get(name) is None:
            return original_get(self, name)
        return timed(lambda *_: f"load {name}", original_get)(self, name)

    pipeline_module.UnisonPipeline._get = get
    text_module.encode_text = timed(lambda *a: "umT5 encode", text_module.encode_text)
    sampler_module.sample = timed(lambda *a: "sample + decode", sampler_module.sample)
    import io

    out = io.StringIO()
    code = cli.main(argv, out=out)
    report = json.loads(out.getvalue()) if out.getvalue() else {}
    print(json.dumps({"code": code, "total_seconds": round(time.perf_counter() - start, 1),
                      "peak_gib": round(_status()["VmHWM"] / GIB, 2), "stages": stages,
                      "notes": report.get("notes", [])}))


def run_job(directory: Path, job: str, steps: int, extra: list[str], out_dir: Path) -> dict:
    argv = ["run", JOBS[job], "--models", str(directory), "--out", str(out_dir / job), "--steps", str(steps),
            "--input-dir", str(out_dir), *extra]
    done = subprocess.run([sys.executable, "-m", "bench.bench_realsize", "--child", json.dumps(argv)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{job} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["stderr_memory"] = [line for line in done.stderr.splitlines() if line.startswith("memory:")]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI flags for run")
    parser.add_argument("--write-only", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if ROOT in args.dir.resolve().parents:
        parser.error("--dir must be outside the repository")
    write_released_files(args.dir)
    if args.write_only:
        return 0
    out_dir = args.dir / "out"
    out_dir.mkdir(exist_ok=True)
    for job in args.jobs:
        result = run_job(args.dir, job, args.steps, args.extra, out_dir)
        print(json.dumps({"job": job, "flags": args.extra, **result}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
