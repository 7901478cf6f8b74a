"""Per-layer casts on the CPU: reused buffers vs a fresh tensor per cast (stored_precision.CastBuffers).

Stage one, umT5 and the transformer keep their bf16 / fp16 / fp8 matrices as stored and cast each
layer's weight to fp32 just before it runs. A fresh tensor per cast gets fresh pages from the OS
each time (every cast above glibc's mmap threshold is a mapping of its own), which costs most on a
token-by-token generation, where the matmul is tiny. This times one token through decoder layers of
Qwen2.5-VL-3B's shapes (hidden 2048, 16 heads with 2 KV heads, MLP 11008; random bf16 weights),
both ways in turns, and checks the outputs are identical.

    python -m bench.bench_cast_buffers --clock cpu     # 4 layers (0.5 GB of bf16 weights)
    python -m bench.bench_cast_buffers --quick         # smoke run
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bench.common import (
    Row,
    base_parser,
    chosen_clock,
    command_line,
    interleaved,
    machine_summary,
    median,
    pair_ratios,
    print_table,
    set_torch_threads,
)

QWEN_3B = {"hidden": 2048, "kv": 256, "mlp": 11008}
QUICK = {"hidden": 64, "kv": 16, "mlp": 128}
PROJECTIONS = (("q", "hidden", "hidden"), ("k", "kv", "hidden"), ("v", "kv", "hidden"), ("o", "hidden", "hidden"),
               ("gate", "mlp", "hidden"), ("up", "mlp", "hidden"), ("down", "hidden", "mlp"))


def build_layers(dims: dict[str, int], count: int, seed: int = 0):
    """``count`` decoder layers' seven projections, bf16 weights kept as stored, cast per layer to fp32."""
    import torch

    from unison_runtime.vace.stored_precision import apply_stored_precision

    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    for _ in range(count):
        layer = torch.nn.ModuleDict({name: torch.nn.Linear(dims[inp], dims[out], bias=False)
                                     for name, out, inp in PROJECTIONS})
        for linear in layer.values():
            linear.weight.data = (linear.weight.data * 0.02).to(torch.bfloat16)
        model.append(layer)
    kept = {f"{index}.{name}.weight": torch.float32 for index in range(count) for name, *_ in PROJECTIONS}
    apply_stored_precision(model, kept)
    return model


def one_token(model, x):
    """Every projection of every layer on one token (the shapes a generated token meets)."""
    out = x
    for layer in model:
        q, k, v = layer["q"](out), layer["k"](out), layer["v"](out)
        mixed = layer["o"](q + 0 * (k.sum() + v.sum()))
        out = layer["down"](layer["gate"](mixed) * layer["up"](mixed)) * 1e-3 + out
    return out


def measure(dims: dict[str, int], layers: int, rounds: int, clock: Callable[[], float]) -> list[Row]:
    import torch

    from unison_runtime.vace.stored_precision import cast_buffers

    model = build_layers(dims, layers)
    x = torch.randn(1, dims["hidden"])
    outputs: dict[str, torch.Tensor] = {}
    buffers = cast_buffers(model)
    keep = buffers.give

    def arm(reuse: bool):
        def run() -> None:
            # Fresh: a cast's tensor is dropped after its layer, so every cast gets a new one (as before the pool).
            buffers.give = keep if reuse else (lambda tensor: None)
            with torch.inference_mode():
                outputs["reused" if reuse else "fresh"] = one_token(model, x)

        return run

    times = interleaved({"reused": arm(True), "fresh": arm(False)}, rounds, clock=clock)
    same = torch.equal(outputs["reused"], outputs["fresh"])
    speedups = pair_ratios(times["fresh"], times["reused"])
    shape = f"{layers} layers, hidden {dims['hidden']}, MLP {dims['mlp']}"
    return [
        Row(f"token time, fresh casts / reused buffers ({shape})", median(speedups), "x", rounds, "> 1", None,
            f"fresh {median(times['fresh']) * 1e3:.0f} ms, reused {median(times['reused']) * 1e3:.0f} ms per token"),
        Row("outputs identical (reused vs fresh)", float(same), "bool", 1, "1", same),
    ]


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = base_parser(__doc__.split("\n\n")[0], clock=True)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    dims = QUICK if args.quick else QWEN_3B
    rounds = args.repeats or (2 if args.quick else 7)
    rows = measure(dims, 1 if args.quick else args.layers, rounds, chosen_clock(args))
    rows[0].met = rows[0].value > 1 if not args.quick else None
    print_table("Per-layer casts on the CPU: reused buffers", rows, machine=machine_summary("cpu"),
                command=command_line("bench.bench_cast_buffers", argv))
    return rows


if __name__ == "__main__":
    main()
