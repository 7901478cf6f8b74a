"""Caching: a second run with unchanged models loads nothing (issue 9, item 5).

Two levels, both on a random model with the released structure (``bench.scaled_models``):

* **UnisonPipeline** (the CLI / Python path): models are given as loaders and loaded lazily on
  first use; every loader call is timed. Run 1 loads, run 2 (same models, other seed) must not
  call any loader; after ``release()`` run 3 loads again, showing the measurement does see a load.
* **ComfyUI nodes** (``--comfyui DIR``: a ComfyUI checkout; ``--comfyui-python`` its interpreter):
  a real ComfyUI server is started on loopback with a temporary base directory holding the pack
  and the models in ComfyUI's formats (Comfy-Org transformer fp16, ``wan_2.1_vae.safetensors``,
  ``umt5_xxl_fp16.safetensors``). The same API prompt (VACE Loader → Planner → Router → Sampler →
  Preview) is queued twice with another seed: run 2 must list the loader among the nodes served
  from ComfyUI's cache (``execution_cached``), i.e. it was not executed, so nothing was reloaded.
  Then ``POST /free`` drops the caches and run 3 loads again. Times come from ComfyUI's own
  ``execution_start`` / ``execution_success`` timestamps.

    python -m bench.bench_caching --quick
    python -m bench.bench_caching --comfyui /path/to/ComfyUI --comfyui-python /path/to/venv/bin/python
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT, Row, base_parser, command_line, machine_summary, median, print_table, set_torch_threads
from bench.scaled_models import QUICK_MODEL, SAMPLER_MODEL, ScaledVace, build_scaled_vace, cache_root
from tests.harness.comfy_server import start_server, stop_server

INSTRUCTION = "Create a {size}x{size} image of a lion walking around in its habitat on a sunny day."


class TimedLoader:
    """A zero-argument loader that records how long each call took."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self.load = load
        self.calls: list[float] = []

    def __call__(self) -> Any:
        start = time.perf_counter()
        try:
            return self.load()
        finally:
            self.calls.append(time.perf_counter() - start)


# --------------------------------------------------------------------------- UnisonPipeline


def pipeline_runs(spec: ScaledVace, size: int, steps: int, guidance: float = 5.0) -> dict[str, float]:
    """Three runs of one pipeline: first (loads), second (cached), third after release() (loads again)."""
    from unison_runtime.pipeline import UnisonPipeline
    from unison_runtime.projector import load_projector
    from unison_runtime.testing.tiny_projector import build_tiny_projector
    from unison_runtime.vace.loading import load_vace_diffusers
    from unison_runtime.vace.sampler import SamplingOptions

    folder = build_scaled_vace(spec)
    projector_path = folder / "bench_projector.pth"
    if not projector_path.is_file():
        build_tiny_projector(projector_path, input_dim=64, hidden_dim=64, t5_dim=spec.text_dim)
    loaders = {"vace": TimedLoader(lambda: load_vace_diffusers(folder, device="cpu")),
               "projector": TimedLoader(lambda: load_projector(projector_path))}
    pipeline = UnisonPipeline(vace=loaders["vace"], projector=loaders["projector"])
    instruction = INSTRUCTION.format(size=size)
    result: dict[str, float] = {}
    for run, seed in (("run1", 0), ("run2", 1), ("run3", 2)):
        if run == "run3":
            pipeline.release()
        before = {name: len(loader.calls) for name, loader in loaders.items()}
        start = time.perf_counter()
        pipeline.run(instruction, options=SamplingOptions(steps=steps, seed=seed, guidance=guidance))
        result[f"{run}_total"] = time.perf_counter() - start
        new_calls = [call for name, loader in loaders.items() for call in loader.calls[before[name]:]]
        result[f"{run}_load"] = sum(new_calls)
        result[f"{run}_loader_calls"] = len(new_calls)
    return result


def pipeline_rows(results: list[dict[str, float]]) -> list[Row]:
    def m(key: str) -> float:
        return median([r[key] for r in results])

    runs = len(results)
    second_calls = max(r["run2_loader_calls"] for r in results)
    return [
        Row("UnisonPipeline: model load time in run 2 (unchanged models)", m("run2_load"), "s", runs,
            "~0 (no loader called)", second_calls == 0,
            f"loader calls in run 2: {second_calls}; run 1 loaded in {m('run1_load'):.2f} s"),
        Row("UnisonPipeline: run 2 total / run 1 total", m("run2_total") / m("run1_total"), "x", runs, "", None,
            f"run 1 {m('run1_total'):.2f} s (loads + samples), run 2 {m('run2_total'):.2f} s (samples)"),
        Row("UnisonPipeline: model load time in run 3, after release()", m("run3_load"), "s", runs,
            "> 0 (loads again)", min(r["run3_loader_calls"] for r in results) > 0,
            "shows the timer sees a reload when there is one"),
    ]


# --------------------------------------------------------------------------- a real ComfyUI


def _request(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if raw else {})
    except urllib.error.HTTPError as exc:
        return exc.code, {"raw": exc.read().decode(errors="replace")}


def write_comfy_models(spec: ScaledVace, models_dir: Path) -> dict[str, str]:
    """The scaled model in ComfyUI's single-file formats, converted from its diffusers folder."""
    from unison_runtime.testing import tiny_wan_files as files
    from unison_runtime.vace.loading import load_vace_diffusers

    folder = build_scaled_vace(spec)
    names = {"transformer": "bench_wan2.1_vace_fp16.safetensors", "vae": "bench_wan_2.1_vae.safetensors",
             "text_encoder": "bench_umt5_xxl_fp16.safetensors"}
    folders = {"transformer": "diffusion_models", "vae": "vae", "text_encoder": "text_encoders"}
    paths = {part: models_dir / folders[part] / name for part, name in names.items()}
    if all(path.is_file() for path in paths.values()):
        return names
    models = load_vace_diffusers(folder, device="cpu")
    files.write_wan_transformer(models.transformer, paths["transformer"], layout="comfy", precision="fp16")
    files.write_wan_vae(models.vae, paths["vae"])
    files.write_umt5_comfy(models.text_encoder, (folder / "tokenizer" / "spiece.model").read_bytes(),
                           paths["text_encoder"], precision="fp16")
    return names


def api_prompt(names: dict[str, str], size: int, steps: int, seed: int) -> dict[str, Any]:
    """VACE Loader → Planner (rule planner) → Router → Sampler → PreviewImage, in ComfyUI's API format."""
    from unison_runtime.vace.text import WAN_NEGATIVE_PROMPT

    return {
        "1": {"class_type": "UnisonVaceLoader", "inputs": {**names, "dtype": "auto", "text_encoder_device": "auto"}},
        "2": {"class_type": "UnisonPlanner", "inputs": {"instruction": INSTRUCTION.format(size=size),
                                                        "on_unreadable_plan": "use the rule planner's plan"}},
        "3": {"class_type": "UnisonTaskRouter", "inputs": {"plan": ["2", 0], "task": "auto", "width": 0, "height": 0,
                                                           "frames": 0, "frame_index": "auto", "fps": 0}},
        "4": {"class_type": "UnisonVaceSampler", "inputs": {"vace": ["1", 0], "plan": ["3", 8], "seed": seed,
                                                            "steps": steps, "guidance": 5.0, "shift": 5.0,
                                                            "negative_prompt": WAN_NEGATIVE_PROMPT}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


class ComfyServer:
    """A ComfyUI started by this benchmark on loopback (and stopped by it: only its own process)."""

    def __init__(self, comfyui: Path, python: str, base: Path, port: int, timeout: float = 300) -> None:
        self.server = start_server(comfyui, python, base, port, timeout=timeout,
                                   ready_path="/object_info/UnisonVaceLoader")  # answers once the pack is loaded
        self.url = self.server.url
        self.log = self.server.log

    def run(self, prompt: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
        prompt_id = str(uuid.uuid4())
        status, answer = _request(f"{self.url}/prompt", {"prompt": prompt, "prompt_id": prompt_id,
                                                          "client_id": "unison-bench"})
        if status != 200 or answer.get("node_errors"):
            raise RuntimeError(f"ComfyUI refused the prompt ({status}): {answer}")
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = _request(f"{self.url}/history/{prompt_id}")[1].get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("messages"):
                messages = {name: data for name, data in entry["status"]["messages"]}
                if "execution_success" not in messages:
                    raise RuntimeError(f"ComfyUI run failed: {entry['status']}")
                return {"seconds": (messages["execution_success"]["timestamp"]
                                    - messages["execution_start"]["timestamp"]) / 1000.0,
                        "cached": messages.get("execution_cached", {}).get("nodes", [])}
            time.sleep(0.2)
        raise RuntimeError(f"ComfyUI run did not finish within {timeout} s")

    def free(self) -> None:
        _request(f"{self.url}/free", {"unload_models": True, "free_memory": True})
        time.sleep(2)  # /free is applied by the queue worker between prompts

    def stop(self) -> None:
        stop_server(self.server)


def comfy_runs(comfyui: Path, python: str, spec: ScaledVace, size: int, steps: int, port: int) -> dict[str, Any]:
    base = cache_root() / f"comfy-base-{spec.name}"
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "ComfyUI-Unison"
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(ROOT, target_is_directory=True)
    names = write_comfy_models(spec, base / "models")
    server = ComfyServer(comfyui, python, base, port)  # stops its process itself if it fails to start
    try:
        first = server.run(api_prompt(names, size, steps, seed=0))
        second = server.run(api_prompt(names, size, steps, seed=1))
        server.free()
        third = server.run(api_prompt(names, size, steps, seed=2))
    finally:
        server.stop()
    return {"run1": first, "run2": second, "run3": third, "log": str(server.log)}


def comfy_rows(result: dict[str, Any]) -> list[Row]:
    first, second, third = result["run1"], result["run2"], result["run3"]
    loader_cached = "1" in second["cached"]
    return [
        Row("ComfyUI: VACE Loader executed in run 2 (unchanged models, new seed)", 0.0 if loader_cached else 1.0,
            "times", 1, "0 (served from cache)", loader_cached,
            f"cached nodes run 2: {sorted(second['cached'])}; run 1: {sorted(first['cached'])}"),
        Row("ComfyUI: run 2 time / run 1 time", second["seconds"] / first["seconds"], "x", 1, "", None,
            f"run 1 {first['seconds']:.2f} s (load + sample), run 2 {second['seconds']:.2f} s (sample only)"),
        Row("ComfyUI: run 3 time, after POST /free (caches dropped)", third["seconds"], "s", 1,
            "VACE Loader executed again", "1" not in third["cached"],
            f"cached nodes run 3: {sorted(third['cached'])}; server log {result['log']}"),
    ]


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=None, help="a ComfyUI checkout: also measure node caching")
    parser.add_argument("--comfyui-python", default=sys.executable, help="the interpreter ComfyUI runs with")
    parser.add_argument("--port", type=int, default=8199, help="loopback port for the benchmark's ComfyUI")
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    spec = QUICK_MODEL if args.quick else SAMPLER_MODEL
    size, steps = (32, 1) if args.quick else (128, 4)
    repeats = args.repeats or (1 if args.quick else 3)
    guidance = 1.0 if args.quick else 5.0  # quick: one forward per step is enough to see the caching
    rows = pipeline_rows([pipeline_runs(spec, size, steps, guidance) for _ in range(repeats)])
    if args.comfyui is not None:
        rows += comfy_rows(comfy_runs(args.comfyui, args.comfyui_python, spec, size, steps, args.port))
    machine = machine_summary() + f", {args.threads} torch thread(s), model {spec.name}"
    print_table("Caching: second run with unchanged models", rows, machine=machine,
                command=command_line("bench.bench_caching", argv))
    return rows


if __name__ == "__main__":
    main()
