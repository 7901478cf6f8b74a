"""What a long job does when things go wrong: out of memory, interrupts, model files that change.

Three promises, kept by the small helpers here and used by the sampler, the pipeline and the nodes:

* **Out of memory frees and explains.** :func:`call_freeing_memory` runs a piece of work; when a
  device runs out of memory it lets go of everything the work allocated (a traceback keeps every
  frame's tensors alive, so the frames are cleared before the error travels on), collects, empties
  the CUDA cache, and raises :class:`~unison_runtime.errors.OutOfMemory` whose message names the
  settings to lower with their current values (:func:`memory_advice`). The models are untouched,
  so a smaller run can follow at once.
* **Interrupts leave nothing behind.** Sampling state lives in the call (a fresh scheduler, local
  latents), and :func:`reset_model_caches` clears what diffusers' cache hooks keep between steps,
  so a run stopped at step k leaves the models as they were.
* **A cache never serves a model whose file is gone.** :class:`FileSignature` records each model
  file's size, modification time, inode and device. Caches key on it and call
  :meth:`FileSignature.current` before serving: a deleted file is a
  :class:`~unison_runtime.errors.WeightsError` ("... was deleted since it was loaded"), a replaced
  one gives a different signature, so the model is loaded again instead of served stale.

Only the standard library is imported at module level; torch is looked up when needed, so the
nodes can use the file helpers without loading torch.
"""

from __future__ import annotations

import gc
import os
import re
import stat
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import OutOfMemory, WeightsError, first_line

T = TypeVar("T")
PathLike = str | os.PathLike

# How torch and its backends word an allocation failure that is not a torch.OutOfMemoryError:
# the CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"),
# and so do MPS ("MPS backend out of memory"), ROCm ("HIP out of memory", "hipErrorOutOfMemory")
# and a kernel launch that cannot get memory ("CUDA error: out of memory", an AcceleratorError).
_OUT_OF_MEMORY_WORDS = ("out of memory", "outofmemory", "can't allocate memory", "not enough memory",
                        "failed to allocate memory")
# The CUDA/ROCm libraries name theirs *_ALLOC_FAILED: cuBLAS creating its handle or workspace
# (CUBLAS_STATUS_ALLOC_FAILED), cuDNN (CUDNN_STATUS_ALLOC_FAILED), cuFFT, cuSOLVER, cuSPARSE,
# hipBLAS; MIOpen says miopenStatusAllocFailed, rocBLAS rocblas_status_memory_error.
_LIBRARY_ALLOCATION_FAILURES = re.compile(r"_ALLOC_FAILED|STATUS_ALLOC|statusallocfailed|status_memory_error",
                                          re.IGNORECASE)
# cuDNN reports a conv3d it cannot fit a workspace for as CUDNN_STATUS_NOT_SUPPORTED (it tried
# every algorithm, none had memory): the Wan VAE's 3D convolutions near a full card. The same
# status also means a truly unsupported input, so it counts as out of memory only while the card
# is nearly full (less than this fraction of it free), where freeing memory is the fix.
_CUDNN_NOT_SUPPORTED = "CUDNN_STATUS_NOT_SUPPORTED"
NEARLY_FULL_FRACTION = 0.10


#: A folder with more files than this is not a model folder; stamping stops there.
MAX_STAMPED_FILES = 4096


# --------------------------------------------------------------------------- out of memory


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure on any device (CUDA, ROCm, CPU, MPS), whatever type and words torch gave it.

    Besides ``torch.OutOfMemoryError`` and ``MemoryError``: RuntimeErrors saying "out of memory"
    (CUDA kernel launches, HIP, MPS, the CPU allocator), the CUDA libraries' allocation failures
    (``CUBLAS_STATUS_ALLOC_FAILED``, ``CUDNN_STATUS_ALLOC_FAILED``, ...), and cuDNN's
    ``CUDNN_STATUS_NOT_SUPPORTED`` while a CUDA device is nearly full (see
    :func:`cuda_nearly_full`). An error raised *from* an allocation failure counts too.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _is_allocation_failure(exc):
            return True
        exc = exc.__cause__
    return False


def _is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, OutOfMemory)):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    lowered = text.lower()
    if any(words in lowered for words in _OUT_OF_MEMORY_WORDS) or _LIBRARY_ALLOCATION_FAILURES.search(text):
        return True
    return _CUDNN_NOT_SUPPORTED in text and cuda_nearly_full()


def cuda_nearly_full(fraction: float = NEARLY_FULL_FRACTION) -> bool:
    """True when some CUDA device has less than ``fraction`` of its memory free (``torch.cuda.mem_get_info``)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return False
    for index in range(torch.cuda.device_count()):
        try:
            free, total = torch.cuda.mem_get_info(index)
        except RuntimeError:
            continue
        if total and free < fraction * total:
            return True
    return False


def forget_locals(exc: BaseException | None) -> None:
    """Clear the local variables of every finished frame in ``exc``'s traceback (and its causes).

    The tensors a failed call allocated are still referenced by its frames for as long as the
    exception lives (a caller, a log, ComfyUI's error report may keep it). Line numbers and code
    stay, so tracebacks still print; frames still running are left alone.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def release_memory(devices: Iterable[Any] = ()) -> None:
    """Collect garbage and return cached device memory (CUDA, MPS) to the driver.

    On the CPU collecting is all there is to do. ``devices`` limits the cache emptying to the
    accelerators named (empty: every available one).
    """
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    kinds = {str(d).split(":")[0] for d in devices}
    if (not kinds or "cuda" in kinds) and torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if (not kinds or "mps" in kinds) and mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def call_freeing_memory(
    work: Callable[[], T], advice: Callable[[BaseException], str], *, stage: Callable[[], str] | str = "",
    devices: Iterable[Any] = (),
) -> T:
    """Run ``work()``; if it runs out of memory, free what it allocated and raise :class:`OutOfMemory`.

    ``advice(exc)`` builds the user's message (see :func:`memory_advice`); it is called while the
    failure is handled, before the memory is let go. ``stage`` (or a callable giving it, for work
    that moves through stages) is recorded on the error. Every other exception passes unchanged.
    An :class:`OutOfMemory` raised inside (by a nested guard) is passed on as it is, after this
    level's memory is freed too.
    """
    pending: OutOfMemory | None = None
    try:
        return work()
    except OutOfMemory as exc:
        forget_locals(exc)
        pending = exc
    except BaseException as exc:
        if not is_out_of_memory(exc):
            raise
        where = stage() if callable(stage) else stage
        pending = OutOfMemory(advice(exc), where)
        forget_locals(exc)
    # Outside the except clauses: the original exception (and the frames it holds) is gone now.
    release_memory(devices)
    raise pending




def _smaller_side(value: int) -> int:
    return max(16, value // 2 // 16 * 16)


def _fewer_frames(value: int) -> int:
    return max(5, (value - 1) // 2 // 4 * 4 + 1)


def memory_advice(
    exc: BaseException | None,
    *,
    stage: str,
    width: int,
    height: int,
    num_frames: int,
    device: Any,
    batch_cfg: bool | None = None,
    guidance: float | None = None,
    text_device: Any = None,
    where: str = "",
) -> str:
    """The message of an :class:`OutOfMemory`: what ran out, then each setting to lower with its value.

    Listed from the one that saves the most: the resolution, the frame count, batched guidance,
    the text encoder's device, and memory held by other models. ``batch_cfg=None`` is for hosts
    that do not expose it (the guidance line remains); ``where`` tells where those settings live
    in the host (e.g. which ComfyUI node), appended as a last line.
    """
    frames = f"{num_frames} frame" + ("s" if num_frames != 1 else "")
    lines = [f"out of memory on {device} while {stage} ({width}x{height}, {frames})"
             + (f": {first_line(exc)}" if exc is not None else "") + ". To fit, lower:"]
    lines.append(f"- the resolution: width x height is {width}x{height}; try {_smaller_side(width)}x"
                 f"{_smaller_side(height)} (multiples of 16)")
    if num_frames > 1:
        lines.append(f"- the frame count: num_frames is {num_frames}; try {_fewer_frames(num_frames)} (4k+1)")
    if guidance is not None and guidance > 1.0:
        if batch_cfg:
            lines.append("- batch_cfg: on (both guidance passes in one batch); turn it off to halve the activations, "
                         f"or set guidance to 1 (now {guidance:g}) for a single pass")
        else:
            off = " (batch_cfg is already off)" if batch_cfg is False else ""
            lines.append(f"- guidance: {guidance:g} runs two passes per step{off}; 1 runs one")
    if text_device is not None and str(text_device).split(":")[0] != "cpu":
        lines.append(f"- the text encoder device: umT5 runs on {text_device}; load it on the CPU to free its memory")
    lines.append("- memory held by other models: unload or offload them (ComfyUI: 'Unload models')")
    if where:
        lines.append(where)
    return "\n".join(lines)


def stage_one_advice(exc: BaseException | None, *, stage: str, device: Any, max_video_frames: int | None = None) -> str:
    """The message of an :class:`OutOfMemory` raised while stage one (Qwen2.5-VL) plans or answers."""
    lines = [f"out of memory on {device} while {stage}" + (f": {first_line(exc)}" if exc is not None else "")
             + ". To fit, lower:", "- the media stage one sees: fewer or smaller images and videos"]
    if max_video_frames is not None:
        lines.append(f"- the video frames stage one samples: max_video_frames is {max_video_frames}")
    lines.append(f"- the device: stage one runs on {device}; load it on the CPU, or with bf16/fp16")
    lines.append("- memory held by other models: unload or offload them (ComfyUI: 'Unload models')")
    return "\n".join(lines)


# --------------------------------------------------------------------------- interrupts


def reset_model_caches(*modules: Any) -> None:
    """Forget what diffusers' cache hooks (first-block cache, ...) kept from the last denoising run.

    Those hooks compare each step with the previous one; a run stopped half-way would otherwise
    hand its residuals to the next run's first step. A no-op for modules without caching on.
    """
    for module in modules:
        if getattr(module, "is_cache_enabled", False) and hasattr(module, "_reset_stateful_cache"):
            module._reset_stateful_cache()


# --------------------------------------------------------------------------- model files


@dataclass(frozen=True)
class FileStamp:
    """One file as it was: a replaced file (new inode), a rewritten one (size, mtime) differ."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: PathLike) -> FileStamp:
        """Stamp ``path`` (symlinks followed: replacing the target counts). ``OSError`` when it is gone."""
        info = os.stat(path)
        return cls(str(path), info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


def _stamp_tree(root: Path, what: str) -> list[FileStamp]:
    try:
        info = os.stat(root)
    except FileNotFoundError:
        raise WeightsError(f"{what} {root} not found") from None
    except OSError as exc:
        raise WeightsError(f"{what} {root} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(info.st_mode):
        return [FileStamp(str(root), info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)]
    stamps = []
    for current, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            try:
                stamps.append(FileStamp.of(Path(current) / name))
            except OSError:
                continue  # vanished while walking, or a dangling link: not part of the model now
            if len(stamps) >= MAX_STAMPED_FILES:
                return stamps
    return stamps


@dataclass(frozen=True)
class FileSignature:
    """The files a model was loaded from, as they were when it was loaded; hashable, for cache keys.

    ``roots`` are the paths as given (files or model folders); ``stamps`` every file under them.
    """

    roots: tuple[str, ...]
    stamps: tuple[FileStamp, ...]
    what: str = "model file"

    @classmethod
    def of(cls, *paths: PathLike | None, what: str = "model file") -> FileSignature:
        """Stamp each path (``None`` skipped; folders walked). A missing path is a :class:`WeightsError`."""
        roots = tuple(str(p) for p in paths if p is not None)
        stamps = tuple(s for root in roots for s in _stamp_tree(Path(root), what))
        return cls(roots, stamps, what)

    def current(self) -> FileSignature:
        """The signature of the same paths now.

        Raises :class:`WeightsError` naming the first file (or folder) that was deleted since this
        signature was taken, so a cache reports it rather than serving the model loaded from it.
        Compare the result with ``self``: different means a file was replaced or changed.
        """
        for root in self.roots:
            if not os.path.exists(root):
                raise WeightsError(f"{self.what} {root} was deleted since it was loaded; put it back or choose "
                                   "another, then run again (the copy in memory is not used)")
        for stamp in self.stamps:
            if not os.path.exists(stamp.path):
                raise WeightsError(f"{self.what} {stamp.path} was deleted since it was loaded; put it back or "
                                   "choose another, then run again (the copy in memory is not used)")
        return FileSignature.of(*self.roots, what=self.what)

    def changed(self) -> bool:
        """True when a file was replaced, rewritten, added or removed in a model folder (deleted: raises)."""
        return self.current() != self

    def token(self) -> str:
        """A short stable text for the signature (ComfyUI ``IS_CHANGED`` values, logs)."""
        return ";".join(f"{s.path}:{s.size}:{s.mtime_ns}:{s.inode}:{s.device}" for s in self.stamps) or "empty"


def file_signature(*paths: PathLike | None, what: str = "model file") -> FileSignature:
    """:meth:`FileSignature.of`: stamp the files a model is about to be loaded from."""
    return FileSignature.of(*paths, what=what)


def signature_token(*paths: PathLike | None) -> str:
    """Like ``file_signature(...).token()``, but never raises: a missing path reads ``missing:PATH``.

    For places that must not fail (ComfyUI's ``IS_CHANGED``); the load itself reports the file.
    """
    parts = []
    for path in paths:
        if path is None:
            continue
        try:
            parts.append(file_signature(path).token())
        except WeightsError:
            parts.append(f"missing:{path}")
    return "|".join(parts)
