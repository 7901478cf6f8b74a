"""The one safe way the pack reads and writes state dicts.

Model files come from strangers (workflows are shared, checkpoints are re-uploaded), so nothing
here ever runs a pickle: ``.safetensors`` files are read with the safetensors library, and the
pickle-based formats (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) only with
``torch.load(weights_only=True)``, whose restricted unpickler refuses any global that is not a
tensor-building one. Whatever loads must be a flat ``str -> Tensor`` mapping; every refusal is a
:class:`~unison_runtime.errors.WeightsError` naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError, first_line

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

#: Dtype names as users write them (CLI, node widgets, Python callers), shared by every loader.
DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

# safetensors itself refuses headers above 100 MB; a real header is a few KB per hundred tensors.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024

_HEADER_METADATA_KEY = "__metadata__"


def _describe(what: str, path: Path) -> str:
    return f"{what} weights {path}" if what else f"weights {path}"


# --------------------------------------------------------------------------- safetensors header


def read_safetensors_header(path: str | Path, *, what: str = "") -> dict[str, Any]:
    """Read only the JSON header of a ``.safetensors`` file: names, dtypes, shapes, offsets.

    Lets callers recognise a model kind (or refuse a wrong file) without loading any tensor.
    Returns the header as stored: ``{name: {"dtype": str, "shape": [int, ...],
    "data_offsets": [begin, end]}, ...}`` plus ``"__metadata__": {str: str}`` when the file has
    one. The header size is bounded and every tensor's byte range is checked against the file
    size, so a truncated file is reported here rather than half-way through a load.
    """
    path = Path(path)
    label = _describe(what, path)
    _check_is_file(path, label)
    return _read_header(path, label)


def _read_header(path: Path, label: str) -> dict[str, Any]:
    return _read_header_and_start(path, label)[0]


def _read_header_and_start(path: Path, label: str) -> tuple[dict[str, Any], int]:
    """The checked header and the byte position where the tensor data starts."""
    bad = f"{label}: truncated or not a safetensors file"
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"{bad} (only {len(prefix)} bytes; expected an 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len == 0 or header_len > MAX_SAFETENSORS_HEADER_BYTES:
            raise WeightsError(
                f"{bad} (header length {header_len}; expected 1..{MAX_SAFETENSORS_HEADER_BYTES} bytes)"
            )
        if 8 + header_len > file_size:
            raise WeightsError(f"{bad} (header needs {header_len} bytes, only {file_size - 8} follow its length)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{bad} (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{bad} (header is a JSON {type(header).__name__}; expected an object)")
    data_size = file_size - 8 - header_len
    for name, info in header.items():
        if name == _HEADER_METADATA_KEY:
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise WeightsError(f"{bad} (__metadata__ must map strings to strings)")
            continue
        _check_header_entry(name, info, data_size, bad)
    return header, 8 + header_len


def _check_header_entry(name: str, info: Any, data_size: int, bad: str) -> None:
    if not isinstance(info, dict):
        raise WeightsError(f"{bad} (entry {name!r} is not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise WeightsError(f"{bad} (tensor {name!r} has no dtype)")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WeightsError(f"{bad} (tensor {name!r} has shape {shape!r}; expected a list of sizes)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise WeightsError(f"{bad} (tensor {name!r} has data_offsets {offsets!r})")
    if offsets[1] > data_size:
        raise WeightsError(
            f"{bad} (tensor {name!r} ends at byte {offsets[1]} of the data, the file holds {data_size})"
        )


# --------------------------------------------------------------------------- one tensor at a time

#: safetensors dtype names -> torch dtypes (the ones this torch has).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("I64", "int64"), ("I32", "int32"),
        ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("U16", "uint16"), ("U32", "uint32"),
        ("U64", "uint64"), ("BOOL", "bool"),
    )
    if hasattr(torch, attr)
}


class SafetensorsFile:
    """A ``.safetensors`` file whose tensors are taken one at a time, mapped or copied.

    Why both: a tensor used as stored is best a zero-copy view of the file (``mapped``: its pages
    are read, and count in RSS, only when used). A tensor that is converted to another dtype is
    better ``copy``-ed: its bytes are read into private memory, converted, and the copy dropped,
    so the file's pages never sit in memory next to the converted model, as they do when the whole
    file is mapped and cast. The header is checked on opening (see :func:`read_safetensors_header`).
    """

    def __init__(self, path: str | Path, *, what: str = "") -> None:
        self.path = Path(path)
        self.label = _describe(what, self.path)
        _check_is_file(self.path, self.label)
        self.header, self._data_start = _read_header_and_start(self.path, self.label)
        self._mapping: Any = None

    def names(self) -> list[str]:
        return [name for name in self.header if name != _HEADER_METADATA_KEY]

    def __contains__(self, name: object) -> bool:
        return name != _HEADER_METADATA_KEY and name in self.header

    def dtype(self, name: str) -> torch.dtype:
        stored = self.header[name]["dtype"]
        if stored not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{self.label}: tensor {name!r} has dtype {stored!r}, which this torch cannot hold")
        return SAFETENSORS_DTYPES[stored]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor as a view of the file (no copy; read-only in spirit: never modify it)."""
        from safetensors import SafetensorError, safe_open

        try:
            if self._mapping is None:
                self._mapping = safe_open(str(self.path), framework="pt")
            return self._mapping.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"{self.label}: cannot read tensor {name!r} ({exc})") from None

    def copy(self, name: str) -> torch.Tensor:
        """The tensor in private memory, read from the file directly (the file is not mapped)."""
        shape = self.shape(name)
        return self.copy_rows(name, 0, shape[0] if shape else 1)

    def copy_rows(self, name: str, start: int, stop: int, *, into: bytearray | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor's first dimension, read into private memory.

        Lets a loader convert a large tensor in bounded pieces (a 0-d tensor has one row). With
        ``into``, the bytes land at the start of that buffer (grown by the caller, reused piece
        after piece: no allocation per piece) and the returned tensor is a view of it.
        """
        dtype, shape = self.dtype(name), self.shape(name)
        begin, end = self.header[name]["data_offsets"]
        size = end - begin
        expected = dtype.itemsize * _numel(shape)
        if size != expected:
            raise WeightsError(f"{self.label}: tensor {name!r} holds {size} bytes; its dtype and shape need {expected}")
        rows = shape[0] if shape else 1
        if not 0 <= start <= stop <= rows:
            raise WeightsError(f"{self.label}: rows {start}:{stop} of tensor {name!r} (it has {rows})")
        row_bytes = size // rows if rows else 0
        part_shape = (stop - start, *shape[1:]) if shape else ()
        count = (stop - start) * row_bytes
        if count == 0:
            return torch.empty(part_shape, dtype=dtype)
        if into is not None and len(into) < count:
            raise WeightsError(f"{self.label}: a {len(into)}-byte buffer cannot hold {count} bytes of {name!r}")
        buffer = into if into is not None else bytearray(count)
        view = memoryview(buffer)[:count]
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self._data_start + begin + start * row_bytes)
            done = 0
            while done < count:
                got = handle.readinto(view[done:])
                if not got:
                    raise WeightsError(f"{self.label}: truncated while reading tensor {name!r}")
                done += got
        return torch.frombuffer(buffer, dtype=torch.uint8, count=count).view(dtype).reshape(part_shape)

    def close(self) -> None:
        """Forget the mapping handle (tensors already taken from it keep their own reference)."""
        self._mapping = None


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# --------------------------------------------------------------------------- loading


def load_state_dict(
    path: str | Path, *, what: str, device: str | torch.device = "cpu", mmap: bool = True
) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` state dict from ``.safetensors`` or a pickle-based file.

    ``what`` says what the file is meant to be ("projector", "VACE transformer") and appears in
    every error. Pickle formats go through ``torch.load(weights_only=True)`` (memory-mapped
    when the file is in the zip format, unless ``mmap=False``), so a pickle that would run code
    is refused, not run.

    Wrapping: a checkpoint whose top level is a single entry holding the state dict
    (``{"state_dict": {...}}``, ``{"model": {...}}``, any one key) is unwrapped one level,
    provided every value inside is a tensor. Anything else (extra entries such as ``"epoch"``,
    deeper nesting, non-string keys, lists, objects) is refused.
    """
    path = Path(path)
    label = _describe(what, path)
    _check_is_file(path, label)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state = _load_safetensors(path, label, device)
    elif suffix in PICKLE_SUFFIXES:
        state = _load_pickle(path, label, device, mmap)
    else:
        expected = ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        raise WeightsError(f"{label}: unsupported file type {path.suffix or '(none)'!r}; expected one of {expected}")
    return _flat_tensor_mapping(state, label)


def _check_is_file(path: Path, label: str) -> None:
    if not path.exists():
        raise WeightsError(f"{label}: file not found")
    if not path.is_file():
        raise WeightsError(f"{label}: not a regular file; expected a weights file")


def _load_safetensors(path: Path, label: str, device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _read_header(path, label)
    try:
        return load_file(path, device=str(device) if isinstance(device, torch.device) else device)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise WeightsError(f"{label}: truncated or not a safetensors file ({exc})") from None


def _load_pickle(path: Path, label: str, device: str | torch.device, mmap: bool) -> Any:
    not_plain = f"{label}: not a plain state dict (a pickle that only holds tensors was expected)"
    with warnings.catch_warnings():
        # The restricted unpickler warns about protocol numbers; the refusal below is what matters.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        try:
            try:
                if not mmap:
                    return torch.load(path, map_location=device, weights_only=True)
                return torch.load(path, map_location=device, weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap can only be used" not in str(exc):
                    raise
                # Legacy (non-zip) torch.save format or a bare pickle: same restricted unpickler, no mmap.
                return torch.load(path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as exc:
            detail = _unpickling_detail(str(exc))
            raise WeightsError(f"{not_plain}; it was refused without running it{detail}") from None
        except MemoryError:
            raise
        except Exception as exc:  # corrupt archives raise RuntimeError, EOFError, ValueError, ...
            raise WeightsError(
                f"{label}: cannot read it as a torch checkpoint, it may be truncated or corrupt "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from None


def _unpickling_detail(message: str) -> str:
    # torch's message suggests weights_only=False; pass on only the line that says what was refused.
    for line in message.splitlines():
        line = line.strip()
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return f" ({first_line(line.removeprefix('WeightsUnpickler error: '))})"
    return ""




def _flat_tensor_mapping(obj: Any, label: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{label}: holds a {type(obj).__name__}; expected a state dict (names mapped to tensors)")
    if len(obj) == 1:
        (key, inner), = obj.items()
        if isinstance(key, str) and isinstance(inner, Mapping):
            obj = inner  # {"state_dict": {...}} / {"model": {...}}: one level only
    problems = [
        f"{key!r} ({type(value).__name__})"
        for key, value in obj.items()
        if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
    if problems:
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise WeightsError(f"{label}: not a flat state dict; entries that are not name -> tensor: {shown}")
    if not obj:
        raise WeightsError(f"{label}: holds no tensors; expected a state dict")
    return {key: value.detach() if isinstance(value, torch.nn.Parameter) else value for key, value in obj.items()}


# --------------------------------------------------------------------------- helpers


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Return a new dict with ``prefix`` removed from the keys that start with it.

    Keys without the prefix are kept as they are (``module.`` from DataParallel is usually on
    all keys or none). Two keys that become the same name are refused rather than overwritten.
    """
    if not prefix:
        return dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name in out:
            raise WeightsError(f"removing the prefix {prefix!r} makes two entries named {name!r}")
        out[name] = value
    return out


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` as ``.safetensors`` and return the path.

    safetensors refuses tensors that share memory and non-contiguous views, so each tensor is
    made contiguous and shared storages are copied. The file is written next to its target and
    renamed into place, so an interrupted save never leaves a half-written model behind.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WeightsError(f"metadata for {path} must map strings to strings")
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[tuple[str, int]] = set()
    for name, value in state_dict.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(f"cannot save {path}: entry {name!r} is not name -> tensor")
        tensor = value.detach().to("cpu")
        if tensor.numel() > 0:
            storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
            if storage in seen_storages or not tensor.is_contiguous():
                tensor = tensor.contiguous() if not tensor.is_contiguous() else tensor.clone()
            seen_storages.add((str(tensor.device), tensor.untyped_storage().data_ptr()))
        tensors[name] = tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=dict(metadata) if metadata is not None else None)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only; a model file is meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
