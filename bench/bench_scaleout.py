"""Scale-out on this machine (issue 18): context-parallel step time, and batch throughput on Ray.

1. **Context parallel, per step**: two processes over gloo (Ulysses 2), one thread each, run the VACE
   transformer's forward on a bench-size random model; in the same rounds rank 0 alone runs the
   same forward on an unsplit copy while rank 1 waits. Rounds alternate the arms; the row is the
   median per-round ratio (2-process step / 1-process step; 0.5 would be a perfect split).
2. **Batch on Ray, 2 workers vs 1**: one local Ray cluster (2 CPUs), the same batch run with
   ``--workers 1`` and ``--workers 2`` in turns (1, 2, 2, 1, ...), each into a fresh folder, worker
   start and model loading included (what a user waits for); the row is the median per-pair ratio
   of the wall times (1 worker / 2 workers: the throughput gain).

No figure here is a GPU figure; BENCHMARKS.md section 10 gives published GPU numbers beside them.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Row, base_parser, command_line, machine_summary, median, pair_ratios, print_table

VACE = "diffusion_models/Wan2.1-VACE-1.3B-diffusers"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- 1. context parallel


def _cp_config(quick: bool) -> dict[str, Any]:
    from unison_runtime.testing.tiny_wan import TinyVaceDims, tiny_transformer_config

    dims = TinyVaceDims(heads=2, head_dim=16, num_layers=2, vace_layers=(0, 1)) if quick else \
        TinyVaceDims(heads=12, head_dim=64, ffn_dim=3072, num_layers=4, vace_layers=(0, 2), text_dim=256)
    return tiny_transformer_config(dims)


def _cp_inputs(config: dict[str, Any], quick: bool) -> dict[str, Any]:
    import torch

    frames, size = (2, 8) if quick else (5, 32)  # 32x32 latents of 5 frames: 1,280 tokens (256 per frame)
    generator = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, config["in_channels"], frames, size, size, generator=generator),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 64, config["text_dim"], generator=generator),
            "control_hidden_states": torch.randn(1, config["vace_in_channels"], frames, size, size,
                                                 generator=generator),
            "control_hidden_states_scale": torch.ones(len(config["vace_layers"])), "return_dict": False}


def _cp_rank(rank: int, port: int, quick: bool, rounds: int, result_path: str) -> None:
    import torch
    import torch.distributed as dist
    from diffusers import WanVACETransformer3DModel

    from unison_runtime.parallel.context import ParallelDegrees, enable_context_parallel
    from unison_runtime.parallel.distributed import RankInfo, device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("cpu:gloo", rank=rank, world_size=2)
    config = _cp_config(quick)
    inputs = _cp_inputs(config, quick)
    torch.manual_seed(0)
    split = WanVACETransformer3DModel(**config).eval()
    plain = WanVACETransformer3DModel(**config).eval() if rank == 0 else None
    if plain is not None:
        plain.load_state_dict(split.state_dict())
    info = RankInfo(rank=rank, world=2, local_rank=rank, device="cpu")
    enable_context_parallel(split, ParallelDegrees(ulysses=2), mesh=device_mesh(info, 1, 2))

    def forward(model: Any) -> Any:
        with torch.no_grad():
            return model(**inputs)[0]

    def one(arm: str) -> float:
        dist.barrier()
        start = time.perf_counter()
        if arm == "cp":
            forward(split)
        elif rank == 0:
            forward(plain)
        elapsed = time.perf_counter() - start
        dist.barrier()
        return elapsed

    for arm in ("cp", "single"):  # warm-up
        one(arm)
    times: dict[str, list[float]] = {"cp": [], "single": []}
    for i in range(rounds):
        for arm in (("cp", "single") if i % 2 == 0 else ("single", "cp")):
            times[arm].append(one(arm))
    if rank == 0:
        diff = float((forward(split) - forward(plain)).abs().max())
        tokens = inputs["hidden_states"].shape[2] * (inputs["hidden_states"].shape[3] // 2) ** 2
        Path(result_path).write_text(json.dumps({"times": times, "max_diff": diff, "tokens": tokens,
                                                 "heads": config["num_attention_heads"]}))
    else:
        forward(split)
    dist.destroy_process_group()


def bench_context_parallel(quick: bool, rounds: int) -> list[Row]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "cp.json"
        mp.start_processes(_cp_rank, args=(_free_port(), quick, rounds, str(result)), nprocs=2, start_method="spawn")
        data = json.loads(result.read_text())
    ratios = pair_ratios(data["times"]["cp"], data["times"]["single"])
    step = median(data["times"]["single"])
    note = (f"{data['tokens']} video tokens, {data['heads']} heads, 1 thread per process; 1-process step "
            f"{step:.3f} s; split vs unsplit output max diff {data['max_diff']:.1e}; load average "
            f"{os.getloadavg()[0]:.1f}")
    return [Row("context parallel, 2 processes (Ulysses 2) / 1 process, per transformer step", median(ratios), "x",
                len(ratios), target="report (0.5 = perfect split)", note=note)]


# --------------------------------------------------------------------------- 2. batch on Ray


def _batch_workspace(root: Path, quick: bool, items: int) -> Path:
    from unison_runtime.testing.tiny_wan import TinyVaceDims, build_tiny_vace_diffusers

    dims = TinyVaceDims() if quick else TinyVaceDims(heads=4, head_dim=32, ffn_dim=256, num_layers=4,
                                                     vace_layers=(0, 2))
    build_tiny_vace_diffusers(root / "models" / VACE, dims=dims)
    size = "32x32" if quick else "64x64"
    lines = [{"id": f"item-{i:02d}", "prompt": f"Create a video of a lion walking around in its habitat, {size}, "
              "9 frames", "seed": i} for i in range(items)]
    batch = root / "prompts.jsonl"
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return batch


def bench_ray_batch(quick: bool, rounds: int) -> list[Row]:
    import logging

    import ray

    from unison_runtime.__main__ import build_parser
    from unison_runtime.parallel.batch import batch_folder, plan_batch
    from unison_runtime.parallel.ray_batch import run_ray_batch

    items = 2 if quick else 8
    steps = "2" if quick else "8"
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        batch = _batch_workspace(root, quick, items)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, logging_level=logging.ERROR,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        try:
            times: dict[int, list[float]] = {1: [], 2: []}
            run = 0
            for i in range(rounds):
                for workers in ((1, 2) if i % 2 == 0 else (2, 1)):
                    run += 1
                    args = build_parser().parse_args(
                        ["run", "--batch", str(batch), "--models", str(root / "models"), "--out",
                         str(root / f"out-{run}"), "--steps", steps, "--quiet", "--ray", "--workers", str(workers)])
                    start = time.perf_counter()
                    code = run_ray_batch(args, plan_batch(args), batch_folder(args.out), io.StringIO())
                    times[workers].append(time.perf_counter() - start)
                    if code != 0:
                        raise RuntimeError(f"the batch with {workers} worker(s) failed (exit {code})")
        finally:
            ray.shutdown()
    ratios = pair_ratios(times[1], times[2])
    note = (f"{items} text-to-video lines (tiny random VACE, {steps} steps), worker start and loading included; "
            f"1 worker {median(times[1]):.1f} s, 2 workers {median(times[2]):.1f} s per batch; load average "
            f"{os.getloadavg()[0]:.1f}")
    return [Row("Ray batch throughput, 2 workers / 1 worker (2 CPUs)", median(ratios), "x", len(ratios),
                target="report (2.0 = linear)", note=note)]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--skip-ray", action="store_true", help="only the context-parallel row")
    args = parser.parse_args(argv)
    rounds = args.repeats or (2 if args.quick else 6)
    rows = bench_context_parallel(args.quick, rounds)
    if not args.skip_ray:
        rows += bench_ray_batch(args.quick, max(2, rounds // 3) if not args.quick else 2)
    print_table("Scale-out (issue 18)", rows, machine=machine_summary(),
                command=command_line("bench.bench_scaleout", argv))
    return rows


if __name__ == "__main__":
    main()
