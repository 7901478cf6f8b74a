"""A tiny random projector written in the released format (a plain ``torch.save`` state dict).

The released ``projector.pth`` is 2048 → 2048 → 4096 with 56 → 4 tokens; the tiny one keeps the
key layout and the 56 → 4 sequence mix, with small feature sizes so tests and ``selftest`` stay fast.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..weights import save_safetensors


def tiny_projector_state_dict(
    input_dim: int = 64,
    hidden_dim: int = 32,
    t5_dim: int = 64,
    seq_len: int = 56,
    out_tokens: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random float32 weights under the reference key names.

    LayerNorm scales and shifts are random too (not 1 and 0) so that a parity test would notice
    a LayerNorm that ignored its affine parameters.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    return {
        "ln_in.weight": 1.0 + randn(input_dim, scale=0.1),
        "ln_in.bias": randn(input_dim, scale=0.1),
        "net.0.weight": randn(hidden_dim, input_dim, scale=input_dim**-0.5),
        "net.0.bias": randn(hidden_dim, scale=0.1),
        "net.3.weight": randn(t5_dim, hidden_dim, scale=hidden_dim**-0.5),
        "net.3.bias": randn(t5_dim, scale=0.1),
        "ln_out.weight": 1.0 + randn(t5_dim, scale=0.1),
        "ln_out.bias": randn(t5_dim, scale=0.1),
        "seq_adjust.weight": randn(out_tokens, seq_len, scale=seq_len**-0.5),
        "seq_adjust.bias": randn(out_tokens, scale=0.1),
    }


def build_tiny_projector(
    path: str | Path,
    input_dim: int = 64,
    hidden_dim: int = 32,
    t5_dim: int = 64,
    seq_len: int = 56,
    out_tokens: int = 4,
    prefix: str = "",
    seed: int = 0,
) -> Path:
    """Write a tiny projector to ``path``: ``.pth``/``.pt`` via ``torch.save`` of a plain dict
    (as the release), ``.safetensors`` via safetensors. ``prefix="module."`` mimics a
    DataParallel save."""
    path = Path(path)
    state = tiny_projector_state_dict(input_dim, hidden_dim, t5_dim, seq_len, out_tokens, seed)
    state = {f"{prefix}{key}": value for key, value in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        torch.save(state, path)
    elif suffix == ".safetensors":
        save_safetensors(state, path)
    else:
        raise ValueError(f"tiny projector path {path}: expected a .pth, .pt or .safetensors name")
    return path
