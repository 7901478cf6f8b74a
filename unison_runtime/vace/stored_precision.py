"""Keep narrow weights (fp8, scaled fp8, fp16, bf16) in their stored dtype and cast them layer by layer.

Why: umT5-XXL ships as 6.7 GB of scaled fp8 (Comfy-Org's ``umt5_xxl_fp8_e4m3fn_scaled``) and the
VACE transformer as 4.3 GB of fp16; converted whole to fp32 for the CPU they take 21 GiB and 8 GiB.
ComfyUI's own Wan path (``comfy/ops.py`` ``cast_bias_weight``) keeps them stored and casts each
layer's weight just before it runs; diffusers' ``apply_layerwise_casting`` does the same, but
ignores the per-tensor fp8 scales and casts back after each call. This is that idea with the scales
honoured: before a layer runs its stored weight is replaced by ``stored.to(float32) * scale`` in
the compute dtype (the same arithmetic as :func:`~unison_runtime.vace.quantized.dequantize_into`,
so results are bit-identical to converting at load time), and afterwards the stored tensor is put
back. At most one layer's weight exists in the compute dtype at a time.

Only the bulk is kept stored: ``nn.Linear`` weights and the token embedding (looked up row by
row, never cast whole). Each computes in the dtype the library's loader would have given it (so a
module a model keeps in fp32 still computes in fp32). Modules diffusers never casts
(``_skip_layerwise_casting_patterns``: norms, patch and time embeddings) are converted at load time
as before.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .. import mapped_pages
from .quantized import scale_name

#: Module-name patterns never kept stored, besides a model's own lists (diffusers' defaults).
_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", r"^proj_in$", r"^proj_out$", "relative_attention_bias")
#: Linear layers whose parent reads their weight's dtype before calling them (transformers' T5
#: feed-forward casts its activations to ``wo.weight.dtype``): cast when the parent runs.
_CAST_WITH_PARENT = ("wo",)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _skipped(model: torch.nn.Module, module_name: str) -> bool:
    patterns = list(_SKIP_PATTERNS) + list(getattr(model, "_skip_layerwise_casting_patterns", None) or [])
    return any(re.search(pattern, module_name) for pattern in patterns)


def plan_stored(
    model: torch.nn.Module, dtypes: Mapping[str, torch.dtype], compute: Mapping[str, torch.dtype]
) -> dict[str, torch.dtype]:
    """``{model tensor name: compute dtype}`` of the weights to keep in their stored dtype.

    ``dtypes``: stored dtype per model name; ``compute``: the dtype the library's loader would
    convert each to (so a module the model keeps in fp32 still computes in fp32). ``model`` may be
    empty (meta). Kept: Linear / Embedding weights stored narrower than they compute.
    """
    keep: dict[str, torch.dtype] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):  # tied names too
        if not isinstance(module, torch.nn.Linear | torch.nn.Embedding) or _skipped(model, module_name):
            continue
        name = f"{module_name}.weight"
        stored, wanted = dtypes.get(name), compute.get(name)
        if stored is None or wanted is None or not stored.is_floating_point or stored == wanted:
            continue
        if _itemsize(stored) < _itemsize(wanted):
            keep[name] = wanted
    return keep


def dequantize_weight(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``stored`` (times its scaled-fp8 ``scale``) in ``dtype``: the product is taken in float32, as at load time."""
    if scale is None:
        return stored.to(dtype)
    work = stored.to(torch.float32)
    if scale.numel() > 1:
        scale = scale.reshape(-1, *([1] * (work.ndim - 1)))
    work.mul_(scale.to(device=work.device, dtype=torch.float32))
    return work if dtype == torch.float32 else work.to(dtype)


class CastBuffers:
    """Reusable CPU buffers for one model's per-layer casts: one per weight shape in use at once.

    Why: a cast into a fresh tensor gets fresh pages from the OS each call (every cast above glibc's
    mmap threshold is a mapping of its own), and on the CPU the kernel zeroing them cost more than the
    cast: one generated token through Qwen2.5-VL-3B-shaped layers took 3.1x the CPU time
    (``bench/bench_cast_buffers.py``, BENCHMARKS.md section 8). Reused buffers hold one fp32 copy per
    distinct weight shape (the largest layer's cast is held anyway at the peak). Only the CPU: a GPU's
    caching allocator already reuses its blocks. :meth:`clear` gives them back.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype))
        return free.pop() if free else torch.empty(shape, dtype=dtype)

    def give(self, tensor: torch.Tensor) -> None:
        self._free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for free in self._free.values() for t in free)

    def clear(self) -> None:
        self._free.clear()


def _cast_into(buffers: CastBuffers, stored: torch.Tensor, scale: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor | None:
    """:func:`dequantize_weight` into a reused buffer (the same arithmetic), or ``None`` where it does not apply."""
    if stored.device.type != "cpu" or (scale is not None and dtype != torch.float32):
        return None
    out = buffers.take(stored.shape, dtype)
    out.copy_(stored)
    if scale is not None:
        out.mul_((scale.reshape(-1, *([1] * (out.ndim - 1))) if scale.numel() > 1 else scale).to(torch.float32))
    return out


class _CastWeights:
    """Forward hooks of one module: its (and its listed children's) stored weights in the compute dtype
    while it runs, the stored tensors back afterwards (also when the forward raises)."""

    def __init__(self, layers: list[torch.nn.Module], dtype: torch.dtype, buffers: CastBuffers) -> None:
        self.layers = layers
        self.dtype = dtype
        self.buffers = buffers
        self.saved: list[torch.Tensor] = []
        self.lent: list[torch.Tensor | None] = []

    def before(self, module: torch.nn.Module, args: Any) -> None:
        if self.saved:  # re-entered without an after (should not happen): keep the stored tensors we hold
            return
        for layer in self.layers:
            stored = layer.weight.data
            scale = getattr(layer, "weight_scale", None)
            self.saved.append(stored)
            cast = _cast_into(self.buffers, stored, scale, self.dtype)
            self.lent.append(cast)
            layer.weight.data = cast if cast is not None else dequantize_weight(stored, scale, self.dtype)

    def after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        for layer, stored in zip(self.layers, self.saved, strict=True):
            layer.weight.data = stored
        for cast in self.lent:
            if cast is not None:
                self.buffers.give(cast)
        self.saved, self.lent = [], []


def cast_buffers(model: torch.nn.Module | None) -> CastBuffers | None:
    """The reused cast buffers of a model made by :func:`apply_stored_precision` (``None`` for any other)."""
    return getattr(model, "_unison_cast_buffers", None)


def drop_cast_buffers(model: torch.nn.Module | None) -> int:
    """Free a model's reused cast buffers (they come back on its next forward); returns the bytes freed."""
    buffers = cast_buffers(model)
    if buffers is None:
        return 0
    held = buffers.held_bytes()
    buffers.clear()
    return held


def give_back_ram(what: str, model: torch.nn.Module | None, *, after: str) -> int:
    """A CPU model's RAM beside what it computes with, back to the OS while it waits: its reused cast buffers and
    the resident pages of its stored weights (:mod:`unison_runtime.mapped_pages`); both come back on its next
    forward. Returns the page bytes given back (logged, naming ``what`` and ``after``)."""
    drop_cast_buffers(model)
    return mapped_pages.give_back(what, model, after=after)


def _embedding_forward(module: torch.nn.Embedding, dtype: torch.dtype) -> Any:
    """A forward that looks rows up in the stored table and casts only those rows."""
    import torch.nn.functional as F

    def forward(ids: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if weight.element_size() == 1:  # fp8 tables: look the bytes up, the values are cast below
            rows = F.embedding(ids, weight.view(torch.uint8)).view(weight.dtype)
        else:
            rows = F.embedding(ids, weight, module.padding_idx)
        return dequantize_weight(rows, getattr(module, "weight_scale", None), dtype)

    return forward


def apply_stored_precision(
    model: torch.nn.Module, kept: Mapping[str, torch.dtype], scales: Mapping[str, torch.Tensor] | None = None
) -> int:
    """Make the modules whose weights are in ``kept`` compute in the dtype given there; returns how many.

    ``scales``: per kept weight name, its scaled-fp8 scale (stored on the module as a
    non-persistent ``weight_scale`` buffer, so it follows the module between devices).
    """
    scales = scales or {}
    modules = dict(model.named_modules(remove_duplicate=False))
    hosts: dict[tuple[str, torch.dtype], list[torch.nn.Module]] = {}
    count = 0
    for name, dtype in sorted(kept.items()):
        module_name = name.removesuffix(".weight")
        module = modules[module_name]
        if name in scales:
            module.register_buffer("weight_scale", scales[name].to(torch.float32), persistent=False)
        if isinstance(module, torch.nn.Embedding):
            if not hasattr(module, "_unison_cast_rows"):
                module.forward = _embedding_forward(module, dtype)
                module._unison_cast_rows = True
                count += 1
            continue
        count += 1
        parent_name, _, leaf = module_name.rpartition(".")
        host = parent_name if leaf in _CAST_WITH_PARENT and parent_name in modules else module_name
        hosts.setdefault((host, dtype), []).append(module)
    buffers = cast_buffers(model) or CastBuffers()
    model._unison_cast_buffers = buffers  # not a buffer of the module: never saved, moved or counted
    for (host, dtype), layers in hosts.items():
        hooks = _CastWeights(layers, dtype, buffers)
        modules[host].register_forward_pre_hook(hooks.before)
        modules[host].register_forward_hook(hooks.after, always_call=True)
    return count


def scales_for(kept: Mapping[str, torch.dtype], names: Mapping[str, str], source: Any) -> dict[str, torch.Tensor]:
    """The scaled-fp8 scales (float32 copies) of the kept weights that have one in ``source``."""
    out: dict[str, torch.Tensor] = {}
    for name in kept:
        key = scale_name(names[name])
        if key is not None and key in source:
            out[name] = source.as_stored(key).to(torch.float32).clone()
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers hold as loaded (stored weights at their stored size)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen or tensor.is_meta:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
