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
VmHWM), the RSS after each stage and each stage's time. The ``image`` / ``video`` jobs see stage two's
files only (``DIR/stage-two``: links to the three folders), so the rule planner plans and the context is
umT5 alone. ``plan`` writes (once) a random Qwen2.5-VL-3B + Unison LoRA into ``DIR/unison`` and runs
``plan --model --lora``. ``full-image`` / ``full-video`` also write a random projector in the released
format (``unison/projector.pth``) and run ``run --models DIR`` as users do with every released file:
stage one plans (capped at ``PLAN_TOKENS`` new tokens, its text then replaced by what the trained planner
emits, see ``FULL_PLANNER_TEXT``) and projects, is released, then umT5, then transformer + VAE.

    python -m bench.bench_realsize                      # write (once) and run both jobs
    python -m bench.bench_realsize --jobs image --steps 2 --extra --no-low-memory
    python -m bench.bench_realsize --jobs full-image --steps 2   # with stage one and the projector
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
    "plan": "Please create a video of a lion walking around in its habitat, 2 seconds long.",
    "full-image": "Create an image of a red fox in the snow at dawn, 64x64",
    "full-video": "Create a video of a red fox running in the snow, 64x64, 9 frames",
}
#: What the trained planner emits for the ``full-*`` jobs' instructions. The random planner's own tokens
#: cannot be a plan (it never emits planner tokens, so ``run`` would take it for an understanding request):
#: the capped generation still runs (its memory and time are measured), then its text is replaced by this.
FULL_PLANNER_TEXT = {"full-image": "<BORES>64,64<EORES><CFI>",
                     "full-video": "<BORES>64,64<EORES><BONF>8<EONF><CFV>"}
#: New tokens the random-weight planner may generate in the ``plan`` job (it never emits a stop token;
#: the peak is reached while loading, merging and in the first forward, not by later tokens).
PLAN_TOKENS = 4
_POOL_ELEMENTS = 8 * 1024 * 1024
_DTYPE_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8",
                torch.bfloat16: "BF16"}


# --------------------------------------------------------------------------- piecewise safetensors writer


class _Pool:
    """Random bytes per dtype, drawn once; tensors are written as cyclic slices of them."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(_POOL_ELEMENTS, generator=g) * 0.02
        self.bytes = {torch.float16: base.half().numpy().tobytes(),
                      torch.bfloat16: base.to(torch.bfloat16).view(torch.int16).numpy().tobytes(),
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


def stage_two_view(directory: Path) -> Path:
    """``DIR/stage-two``: links to stage two's three folders only, so ``run`` finds no stage one there."""
    view = directory / "stage-two"
    for folder in ("diffusion_models", "vae", "text_encoders"):
        link = view / folder
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(directory / folder, target_is_directory=True)
    return view


def write_projector(directory: Path) -> Path:
    """``unison/projector.pth`` in the released format (a ``torch.save`` state dict, float32) and shapes:
    Qwen's 2048 -> 2048 -> umT5's 4096, 56 -> 4 tokens (~50 MB)."""
    from unison_runtime.testing.tiny_projector import build_tiny_projector

    path = directory / "unison" / "projector.pth"
    if not path.is_file():
        build_tiny_projector(path, input_dim=QWEN_TEXT["hidden_size"], hidden_dim=2048, t5_dim=4096)
    return path


# --------------------------------------------------------------------------- stage one: Qwen2.5-VL-3B + LoRA

#: Qwen2.5-VL-3B-Instruct's released sizes (its config.json); token ids come from the small tokenizer.
QWEN_TEXT = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}}
QWEN_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
               "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 2048,
               "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
LORA_RANK = 64
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _legacy_name(name: str) -> str:
    """Today's transformers names as the released checkpoint spells them (``model.layers``, ``visual``)."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    return name.removeprefix("model.") if name.startswith("model.visual.") else name


def write_qwen(directory: Path, pool: _Pool) -> tuple[Path, Path]:
    """``unison/Qwen2.5-VL-3B-Instruct`` (bf16, two shards, tied embeddings, as released) and ``unison/unison-lora``
    (rank-64 LoRA on the language model's projections + ``embed_tokens`` / ``lm_head`` saved whole in fp32,
    the planner tokens in its tokenizer), written piecewise."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from unison_runtime.testing import tiny_qwen

    base, lora = directory / "unison" / "Qwen2.5-VL-3B-Instruct", directory / "unison" / "unison-lora"
    if (base / "config.json").is_file() and (lora / "adapter_config.json").is_file():
        return base, lora
    scratch = directory / "unison" / ".tiny"
    tiny_base = tiny_qwen.build_tiny_qwen(scratch / "base")
    tiny_lora = tiny_qwen.build_tiny_unison_lora(tiny_base, scratch / "lora")
    tokenizer = tiny_qwen.build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={**QWEN_TEXT, "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>")},
        vision_config=QWEN_VISION, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True, dtype="bfloat16")
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    shapes = {_legacy_name(n): tuple(t.shape) for n, t in model.state_dict().items() if n != "lm_head.weight"}
    del model
    base.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for index, part in enumerate(halves, start=1):
        shard = f"model-0000{index}-of-00002.safetensors"
        write_safetensors(base / shard, {n: (torch.bfloat16, shapes[n], None) for n in part}, pool)
        weight_map.update(dict.fromkeys(part, shard))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "generation_config.json"):
        (base / name).write_bytes((tiny_base / name).read_bytes())
    Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(base)

    hidden, ffn, kv = QWEN_TEXT["hidden_size"], QWEN_TEXT["intermediate_size"], 256
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden)}
    tensors: dict = {}
    for layer in range(QWEN_TEXT["num_hidden_layers"]):
        for target in _LORA_TARGETS:
            where = "mlp" if target.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{where}.{target}"
            fan_in, fan_out = dims[target]
            tensors[f"{prefix}.lora_A.weight"] = (torch.float32, (LORA_RANK, fan_in), None)
            tensors[f"{prefix}.lora_B.weight"] = (torch.float32, (fan_out, LORA_RANK), None)
    rows = (QWEN_TEXT["vocab_size"], hidden)
    tensors["base_model.model.model.embed_tokens.weight"] = (torch.float32, rows, None)
    tensors["base_model.model.lm_head.weight"] = (torch.float32, rows, None)
    write_safetensors(lora / "adapter_model.safetensors", tensors, pool)
    adapter = json.loads((tiny_lora / "adapter_config.json").read_text())
    adapter.update(r=LORA_RANK, lora_alpha=2 * LORA_RANK, base_model_name_or_path="Qwen/Qwen2.5-VL-3B-Instruct",
                   target_modules=list(_LORA_TARGETS), modules_to_save=["embed_tokens", "lm_head"])
    (lora / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_lora / name).is_file():
            (lora / name).write_bytes((tiny_lora / name).read_bytes())
    return base, lora


# --------------------------------------------------------------------------- the measured child


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def child(argv: list[str], planner_text: str | None = None) -> None:
    """Run the CLI in this process with timers around each stage; print one JSON line.

    ``planner_text``: what the Qwen planner's capped generation is replaced by (``full-*`` jobs)."""
    from unison_runtime import __main__ as cli
    from unison_runtime import pipeline as pipeline_module
    from unison_runtime.vace import sampler as sampler_module
    from unison_runtime.vace import text as text_module

    stages: list[dict] = []
    start = time.perf_counter()

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                stages.append({"stage": label(*args), "seconds": round(time.perf_counter() - t0, 1),
                               "cpu_seconds": round(time.process_time() - cpu0, 1),
                               "rss_gib_after": round(_status()["VmRSS"] / GIB, 2),
                               "peak_gib_so_far": round(_status()["VmHWM"] / GIB, 2)})
        return wrapper

    original_get = pipeline_module.UnisonPipeline._get

    def get(self, name):
        if name in self._loaded or self._sources.get(name) is None:
            return original_get(self, name)
        return timed(lambda *_: f"load {name}", original_get)(self, name)

    pipeline_module.UnisonPipeline._get = get
    from unison_runtime.planner import qwen as qwen_module

    qwen_module.load_qwen = timed(lambda *a, **k: "load Qwen2.5-VL (+ LoRA merge)", qwen_module.load_qwen)
    qwen_module.QwenPlanner.plan = timed(lambda *a: f"plan ({PLAN_TOKENS} new tokens)", qwen_module.QwenPlanner.plan)
    qwen_module.PLAN_MAX_NEW_TOKENS = PLAN_TOKENS
    if planner_text is not None:
        generated = qwen_module.QwenPlanner.planner_text

        def fixed_planner_text(self, instruction):
            generated(self, instruction)  # the capped generation runs: its memory and time are measured
            return planner_text

        qwen_module.QwenPlanner.planner_text = fixed_planner_text
    qwen_module.QwenPlanner.hidden_states = timed(lambda *a: "stage-one hidden states (projector input)",
                                                  qwen_module.QwenPlanner.hidden_states)
    text_module.encode_text = timed(lambda *a: "umT5 encode", text_module.encode_text)
    sampler_module.sample = timed(lambda *a: "sample + decode", sampler_module.sample)
    import io

    out = io.StringIO()
    code = cli.main(argv, out=out)
    report = json.loads(out.getvalue()) if out.getvalue() else {}
    print(json.dumps({"code": code, "total_seconds": round(time.perf_counter() - start, 1),
                      "cpu_seconds": round(time.process_time(), 1),
                      "peak_gib": round(_status()["VmHWM"] / GIB, 2), "stages": stages,
                      "notes": report.get("notes", [])}))


def run_job(directory: Path, job: str, steps: int, extra: list[str], out_dir: Path) -> dict:
    if job == "plan":
        base, lora = write_qwen(directory, _Pool(1))
        argv = ["plan", "--model", str(base), "--lora", str(lora), JOBS[job], *extra]
    else:
        models = directory
        if job.startswith("full-"):
            write_qwen(directory, _Pool(1))
            write_projector(directory)
        else:
            models = stage_two_view(directory)
        argv = ["run", JOBS[job], "--models", str(models), "--out", str(out_dir / job), "--steps", str(steps),
                "--input-dir", str(out_dir), *extra]
    request = {"argv": argv, "planner_text": FULL_PLANNER_TEXT.get(job)}
    done = subprocess.run([sys.executable, "-m", "bench.bench_realsize", "--child", json.dumps(request)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{job} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["stderr_memory"] = [line for line in done.stderr.splitlines() if line.startswith("memory:")]
    return result


def comfy_job(directory: Path, comfyui: Path, python: str, steps: int, port: int = 8197,
              guidance: float = 5.0, runs: int = 1, planner: bool = False, task: str = "auto") -> dict:
    """A text-to-image workflow (VACE Loader -> Planner -> Router -> Sampler -> PreviewImage, 64x64) in a real
    ComfyUI started on loopback with ``--cpu``, the released-size files linked into a scratch models folder;
    returns the server's peak RSS (VmHWM, read from /proc before it is stopped) and the run's time.

    ``runs`` > 1 queues it again with a new seed and another prompt (umT5 encodes again, beside models kept
    from the first run); ``peaks_gib`` / ``seconds_each`` then give the peak so far and the time after each run.
    ``planner``: as the shipped workflows, with the Qwen2.5-VL-3B planner + LoRA (Unison Planner Loader) and the
    projector (its tokens into the Sampler); written first if missing. The random planner plans nonsense (it
    generates its 256 tokens, and may even "decide" a question): ``task`` set on the Task Router (as a user
    overrides it) makes the Sampler run whatever it decided."""
    import shutil

    from bench.bench_caching import ComfyServer, api_prompt

    if planner:
        write_qwen(directory, _Pool(1))
        write_projector(directory)
    base = directory / "comfy-base"
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    files = {"transformer": ("diffusion_models", "wan2.1_vace_1.3B_fp16.safetensors"),
             "vae": ("vae", "wan_2.1_vae.safetensors"),
             "text_encoder": ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors")}
    stage_one = [("unison", "Qwen2.5-VL-3B-Instruct"), ("unison", "unison-lora"), ("unison", "projector.pth")]
    links = [*files.values(), *(stage_one if planner else [])]
    for folder, name in links:
        link = base / "models" / folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(directory / folder / name)
    pack = base / "custom_nodes" / "ComfyUI-Unison"
    if pack.is_symlink() or pack.exists():
        pack.unlink() if pack.is_symlink() else shutil.rmtree(pack)
    pack.symlink_to(ROOT, target_is_directory=True)
    server = ComfyServer(comfyui, python, base, port, timeout=600)
    try:
        idle = _proc_status(server.server.pid)
        seconds, peaks = [], []
        for index in range(runs):
            prompt = api_prompt({part: name for part, (_, name) in files.items()}, 64, steps, seed=index)
            prompt["4"]["inputs"]["guidance"] = guidance  # 1: one umT5 forward and one pass per step (time, not memory)
            if task != "auto":  # the size too, whatever a random planner decided
                prompt["3"]["inputs"].update(task=task, width=64, height=64)
            prompt["1"]["inputs"]["text_encoder_dtype"] = "auto"
            if index:
                prompt["2"]["inputs"]["instruction"] += f" Variation {index}."
            if planner:
                prompt["6"] = {"class_type": "UnisonPlannerLoader", "inputs": {
                    "model": "Qwen2.5-VL-3B-Instruct", "lora": "unison-lora", "dtype": "auto", "device": "auto",
                    "attention": "auto"}}
                prompt["7"] = {"class_type": "UnisonProjectorLoader",
                               "inputs": {"projector": "projector.pth", "dtype": "auto"}}
                prompt["8"] = {"class_type": "UnisonProjector", "inputs": {"projector": ["7", 0], "hidden": ["2", 2],
                                                                           "context_length": 2048}}
                prompt["2"]["inputs"]["planner"] = ["6", 0]
                prompt["4"]["inputs"]["tokens"] = ["8", 0]
            seconds.append(round(server.run(prompt, timeout=6 * 3600)["seconds"], 1))
            after = _proc_status(server.server.pid)
            peaks.append(round(after["VmHWM"] / GIB, 2))
    finally:
        server.stop()
    return {"seconds": seconds[0], "idle_rss_gib": round(idle["VmRSS"] / GIB, 2),
            "rss_after_gib": round(after["VmRSS"] / GIB, 2), "peak_gib": peaks[-1],
            "seconds_each": seconds, "peaks_gib": peaks, "log": str(server.log)}


def _proc_status(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--jobs", nargs="+", default=["image", "video"], choices=list(JOBS),
                        help="image/video: stage two's files only; plan: stage one alone (Qwen2.5-VL-3B + LoRA "
                             "written on first use), plan --model --lora; full-image/full-video: run with every "
                             "released file (stage one too)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI flags for run")
    parser.add_argument("--write-only", action="store_true")
    parser.add_argument("--comfyui", type=Path, help="also run one workflow in this ComfyUI checkout (--cpu)")
    parser.add_argument("--comfyui-python", default=sys.executable, help="the Python that runs that ComfyUI")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        request = json.loads(args.child)
        child(request["argv"], request.get("planner_text"))
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
    if args.comfyui is not None:
        result = comfy_job(args.dir, args.comfyui, args.comfyui_python, args.steps)
        print(json.dumps({"job": "comfyui text-to-image 64x64", **result}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
