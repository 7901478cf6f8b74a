"""Gather a model's state dict in the dtypes it computes in, converting in bounded pieces beside it.

Why: mapping a whole fp16 / fp8 file and then casting it keeps the file's pages resident next to the
converted copy (1.5-2.9x the model in RSS, measured by ``bench/bench_memory.py``). Here a tensor used
as stored stays a zero-copy view of its file, and a tensor that changes dtype is read in pieces of
rows into private memory, each converted (fp8 scales applied in float32) into the result and
dropped before the next is read. Peak memory is then the loaded model plus one piece.

Which dtype each tensor gets follows the libraries' own ``from_pretrained`` (:func:`dtype_rule`),
so a single file and the diffusers / transformers folder of the same weights load alike.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import WeightsError, first_line
from ..weights import SafetensorsFile, load_state_dict
from .quantized import dequantize_into, dequantize_tensor, scale_name

#: ``(model tensor name, stored dtype) -> dtype to load it in``
DtypeRule = Callable[[str, torch.dtype], torch.dtype]

#: Float32 work per piece when a stored tensor is converted: bounds the memory a conversion adds
#: to the loaded model, however large the tensor (umT5-XXL's embedding is 2 GB in fp16).
CONVERT_PIECE_BYTES = 16 * 1024 * 1024


class StateSource(Protocol):
    """Where stored tensors come from: safetensors files, or a state dict already loaded from a pickle."""

    def __contains__(self, name: object) -> bool: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def as_stored(self, name: str) -> torch.Tensor:
        """The tensor to use unchanged (zero-copy where the format allows)."""
        ...

    def converted(
        self, name: str, dtype: torch.dtype, scale: torch.Tensor | None, device: str | torch.device
    ) -> torch.Tensor:
        """The tensor in ``dtype`` on ``device`` (times ``scale``), its source never held whole where avoidable."""
        ...


class SafetensorsSource:
    """Tensors of one safetensors file or of a model's shards, found by name."""

    def __init__(self, files: Iterable[str | Path], *, what: str) -> None:
        self._by_name: dict[str, SafetensorsFile] = {}
        # Staging buffers reused by every piece: allocating per piece leaves freed holes between
        # the loaded tensors that the C allocator keeps (measured: +0.2x RSS after a fp8 load).
        self._raw = bytearray()
        self._work: torch.Tensor | None = None
        for path in files:
            file = SafetensorsFile(path, what=what)
            self._by_name.update(dict.fromkeys(file.names(), file))

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def dtype(self, name: str) -> torch.dtype:
        return self._by_name[name].dtype(name)

    def as_stored(self, name: str) -> torch.Tensor:
        return self._by_name[name].mapped(name)

    def converted(
        self, name: str, dtype: torch.dtype, scale: torch.Tensor | None, device: str | torch.device
    ) -> torch.Tensor:
        """Converted in pieces of rows: beside the result, at most one piece and its float32 work copy."""
        file = self._by_name[name]
        shape = file.shape(name)
        out = torch.empty(shape, dtype=dtype, device=device)
        rows = shape[0] if shape else 1
        if out.numel() == 0:
            return out
        by_row = out.view(rows, -1)
        step = max(1, CONVERT_PIECE_BYTES // (by_row.shape[1] * 4))
        row_scales = scale is not None and scale.ndim > 0 and scale.shape[0] == rows and rows > 1
        piece_rows = min(step, rows)
        raw_bytes = piece_rows * by_row.shape[1] * file.dtype(name).itemsize
        if len(self._raw) < raw_bytes:
            self._raw = bytearray(raw_bytes)
        work_size = piece_rows * by_row.shape[1] if scale is not None else 0
        if work_size and (self._work is None or self._work.numel() < work_size or self._work.device != out.device):
            self._work = torch.empty(work_size, dtype=torch.float32, device=out.device)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            piece = file.copy_rows(name, start, stop, into=self._raw).to(device)
            piece_scale = scale[start:stop].reshape(stop - start, -1) if row_scales else scale
            dequantize_into(by_row[start:stop], piece.reshape(stop - start, -1), piece_scale,
                            work=self._work if scale is not None else None)
        return out

    def close(self) -> None:
        """Let the staging buffers and the files' mappings go (tensors already loaded keep theirs)."""
        self._raw, self._work = bytearray(), None
        for file in set(self._by_name.values()):
            file.close()


class StateDictSource:
    """A loaded state dict, emptied as tensors are taken so each source can be freed once converted."""

    def __init__(self, state: MutableMapping[str, torch.Tensor]) -> None:
        self._state = state

    def __contains__(self, name: object) -> bool:
        return name in self._state

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype

    def as_stored(self, name: str) -> torch.Tensor:
        return self._state.pop(name)

    def converted(
        self, name: str, dtype: torch.dtype, scale: torch.Tensor | None, device: str | torch.device
    ) -> torch.Tensor:
        return dequantize_tensor(self._state.pop(name).to(device), scale, dtype)


def pickle_source(
    files: Iterable[Path], state: dict[str, torch.Tensor], *, what: str, converts: bool
) -> StateDictSource:
    """A source for pickle-format file(s) already loaded memory-mapped as ``state``.

    When tensors will be converted, the file is loaded again into private memory: pages of a
    mapped torch checkpoint stay resident until the whole mapping is gone, whereas private
    tensors are freed one by one as they are converted. Reading the mapped load's metadata cost
    nothing, so the file is still read once.
    """
    if not converts:
        return StateDictSource(state)
    state.clear()
    fresh: dict[str, torch.Tensor] = {}
    for path in files:
        fresh.update(load_state_dict(path, what=what, mmap=False))
    return StateDictSource(fresh)


def dtype_rule(model_class: Any, dtype: torch.dtype) -> DtypeRule:
    """The dtype ``model_class.from_pretrained(..., dtype)`` gives each floating tensor, as a function.

    diffusers keeps ``_keep_in_fp32_modules`` in float32 for any requested dtype; transformers only
    for fp16 (``_keep_in_fp32_modules_strict`` also for bf16). A module matches when its name is
    one part of the tensor's dotted name, as both libraries match it.
    """
    keep = set(getattr(model_class, "_keep_in_fp32_modules", None) or [])
    is_transformers = hasattr(model_class, "_keep_in_fp32_modules_strict")
    if is_transformers and dtype != torch.float16:
        keep = set()
    if is_transformers and dtype in (torch.float16, torch.bfloat16):
        keep |= set(model_class._keep_in_fp32_modules_strict or [])

    def wanted(name: str, stored: torch.dtype) -> torch.dtype:
        return torch.float32 if keep and not keep.isdisjoint(name.split(".")) else dtype

    return wanted


def needs_conversion(source: StateSource, names: Mapping[str, str], rule: DtypeRule) -> bool:
    """True when any tensor of ``names`` ({model name: stored name}) changes dtype or carries a scale."""
    for target, stored in names.items():
        dtype = source.dtype(stored)
        scale = scale_name(stored)
        if (scale is not None and scale in source) or (dtype.is_floating_point and rule(target, dtype) != dtype):
            return True
    return False


def load_converted(
    source: StateSource, names: Mapping[str, str], rule: DtypeRule, *, device: str | torch.device = "cpu",
    keep_stored: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """``{model name: tensor}`` for ``names`` = ``{model name: stored name}``, each in ``rule``'s dtype on ``device``.

    Floating tensors take the dtype ``rule`` gives; other tensors keep theirs. A stored
    ``X.weight`` with an ``X.scale_weight`` next to it is dequantized with that scale. Two model
    names for one stored tensor (tied embeddings) share one loaded tensor.
    """
    out: dict[str, torch.Tensor] = {}
    loaded: dict[str, torch.Tensor] = {}
    for target, stored in names.items():
        if stored in loaded:
            out[target] = loaded[stored]
            continue
        if stored not in source:
            raise WeightsError(f"tensor {stored!r} is missing")
        dtype = source.dtype(stored)
        wanted = rule(target, dtype) if dtype.is_floating_point else dtype
        scale_key = scale_name(stored)
        scale = source.as_stored(scale_key) if scale_key is not None and scale_key in source else None
        if target in keep_stored or (wanted == dtype and scale is None):
            tensor = source.as_stored(stored).to(device)
        else:
            tensor = source.converted(stored, wanted, scale, device)
        out[target] = loaded[stored] = tensor
    close = getattr(source, "close", None)
    if close is not None:
        close()
    return out


def empty_module(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` with its parameters on the meta device (no memory); buffers it computes are real."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def assemble_module(
    model: torch.nn.Module, state: dict[str, torch.Tensor], *, device: str | torch.device, path: Path, what: str
) -> Any:
    """An :func:`empty_module` given the tensors of ``state`` as its parameters, as they are.

    No parameter is allocated twice: ``assign=True`` makes the loaded tensors (already in their
    dtypes, see :func:`load_converted`) the parameters. Missing or surplus tensors are refused,
    naming ``path``.
    """
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: could not build the {what} from it ({first_line(exc)})") from None
    if hasattr(model, "tie_weights"):  # transformers: tied names become one parameter again, as from_pretrained does
        model.tie_weights()
    # A name the file leaves out because it is tied to another (transformers' embed_tokens) is not missing.
    loaded = {tensor.data_ptr() for tensor in state.values()}
    current = model.state_dict()
    missing = [name for name in result.missing_keys
               if current[name].is_meta or current[name].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        names = [*missing[:3], *result.unexpected_keys[:3]]
        raise WeightsError(f"{path}: the {what} does not match its config (tensors {', '.join(names)})")
    empty = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if empty:
        raise WeightsError(f"{path}: the {what} has no weights for {', '.join(empty[:5])}")
    return model.to(device).eval().requires_grad_(False)

