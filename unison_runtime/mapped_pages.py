"""Give back the RAM of weights mapped from their files once a stage is done with them (Linux).

Why: the stored fp8 / fp16 weights stay views of their safetensors files
(:mod:`unison_runtime.vace.stored_precision`), so the pages a forward pass reads become resident
and stay counted in the process's RSS until the tensors die. A host that keeps the models for the
next prompt while computing on the CPU (ComfyUI's ``--cpu``: the offload device is the compute
device, so offloading moves nothing) then holds umT5 (6.3 GiB), the transformer (4.0 GiB) and the
VAE at once: 12.6 GiB at released size against 7.7 GiB for the staged CLI (BENCHMARKS.md section 8).
The tensors can stay where they are: the kernel may drop a clean file page from the mapping and
read it back, from the page cache or the file, on the next access. So after encoding, umT5's pages
are given back; before decoding, the transformer's; the models stay loaded and compute as before.

Only file-backed ranges are touched. A page of a private mapping that was written to (copy on
write) exists nowhere else, so ``MADV_DONTNEED``, which discards it, is used only on mappings with
no such page; the others get ``MADV_PAGEOUT`` (Linux 5.4), which reclaims clean pages and keeps
written ones (there is no swap to write them to). Anonymous memory (a converted fp32 copy) is never
advised: freeing it is the owner's job. Elsewhere than Linux nothing is done.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MADV_DONTNEED = 4
MADV_PAGEOUT = 21
_MAPS = Path("/proc/self/maps")
_SMAPS = Path("/proc/self/smaps")
_PAGEMAP = Path("/proc/self/pagemap")
#: Smaller amounts are logged at debug level only (a user reads the line when it is worth a thought).
LOG_FROM = 64 * 1024**2


@dataclass(frozen=True)
class FileMapping:
    """One file-backed range of this process's address space (a line of ``/proc/self/maps``)."""

    start: int
    end: int
    private: bool
    path: str


def file_mappings() -> list[FileMapping]:
    """This process's mappings of regular files, in address order (empty off Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        lines = _MAPS.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[4] == "0" or not fields[5].startswith("/") or fields[5].startswith("/dev/"):
            continue  # anonymous, [heap]/[stack], or a device (/dev/zero, /dev/shm, a GPU driver's)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        found.append(FileMapping(start, end, fields[1][3] == "p", fields[5]))
    return found


def tensors_of(*modules: Any) -> list[torch.Tensor]:
    """The parameters and buffers of ``modules``, each once (anything not a torch module is skipped)."""
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def _spans(tensors: Iterable[torch.Tensor], *, whole_storage: bool) -> list[tuple[int, int]]:
    """Address ranges of the distinct CPU tensors: each tensor's own bytes, or its whole storage's (a view's
    pages are those of the storage it views)."""
    ranges: dict[int, int] = {}
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.is_meta:
            continue
        if whole_storage:
            storage = tensor.untyped_storage()
            start, size = storage.data_ptr(), storage.nbytes()
        else:
            start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        if size:
            ranges[start] = max(ranges.get(start, 0), size)
    return sorted((start, start + size) for start, size in ranges.items())


def _overlaps(ranges: list[tuple[int, int]], mappings: list[FileMapping]) -> list[tuple[FileMapping, int, int]]:
    """(mapping, start, end) pieces where the storage ranges lie in file mappings, merged per mapping."""
    pieces: dict[FileMapping, tuple[int, int]] = {}
    for begin, end in ranges:
        for mapping in mappings:
            low, high = max(begin, mapping.start), min(end, mapping.end)
            if low < high:
                old = pieces.get(mapping)
                pieces[mapping] = (min(low, old[0]), max(high, old[1])) if old else (low, high)
    return [(mapping, low, high) for mapping, (low, high) in pieces.items()]


def _in_mappings(ranges: list[tuple[int, int]], mappings: list[FileMapping]) -> int:
    return sum(max(0, min(end, m.end) - max(begin, m.start)) for begin, end in ranges for m in mappings)


def mapped_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` (each distinct tensor's own bytes) that are views of a file (resident or not)."""
    return _in_mappings(_spans(tensors, whole_storage=False), file_mappings())


def private_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct CPU ``tensors`` outside any file mapping: memory they hold for good.

    Mapped pages count as available memory to the kernel (it can drop and re-read them), so a memory
    check counts only these as already in use.
    """
    ranges = _spans(tensors, whole_storage=False)
    return sum(end - begin for begin, end in ranges) - _in_mappings(ranges, file_mappings())


def _copied_bytes(starts: set[int]) -> dict[int, int]:
    """``{mapping start: bytes}`` of copy-on-write pages (smaps' ``Anonymous``) of the mappings at ``starts``."""
    copied: dict[int, int] = {}
    current: int | None = None
    try:
        text = _SMAPS.read_text()
    except OSError:
        return copied
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            start = int(head.split("-")[0], 16)
            current = start if start in starts else None
        elif current is not None and head == "Anonymous:":
            copied[current] = int(line.split()[1]) * 1024  # "Anonymous:   1234 kB"
    return copied


def _present_pages(low: int, high: int) -> int:
    """How many pages of ``[low, high)`` are present in this process's page tables (``/proc/self/pagemap``)."""
    page = mmap.PAGESIZE
    first, last = low // page, -(-high // page)
    try:
        with open(_PAGEMAP, "rb", buffering=0) as pagemap:
            pagemap.seek(first * 8)
            entries = pagemap.read((last - first) * 8)
    except OSError:
        return 0
    # One little-endian 64-bit entry per page; bit 63 set (negative as int64) = present in RAM.
    return int((torch.frombuffer(bytearray(entries), dtype=torch.int64) < 0).sum()) if entries else 0


def resident_mapped_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the file-mapped pages under ``tensors`` that are resident in this process (counted in its RSS)."""
    pieces = _overlaps(_spans(tensors, whole_storage=True), file_mappings())
    return sum(_present_pages(low, high) for _, low, high in pieces) * mmap.PAGESIZE


def _madvise() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    advise = getattr(libc, "madvise", None)
    if advise is not None:
        advise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        advise.restype = ctypes.c_int
    return advise


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Let the kernel drop the resident file pages under ``tensors``; returns the RSS given back, in bytes.

    The tensors stay valid and unchanged: a page is read back when next touched. Nothing is done
    (0) off Linux, for tensors outside file mappings, or where the kernel refuses the advice.
    """
    page = mmap.PAGESIZE
    # Whole pages: each range is widened to page bounds inside its mapping (the same file).
    pieces = [(mapping, max(mapping.start, low // page * page), min(mapping.end, -(-high // page) * page))
              for mapping, low, high in _overlaps(_spans(tensors, whole_storage=True), file_mappings())]
    resident = [(mapping, low, high, present) for mapping, low, high in pieces
                if (present := _present_pages(low, high))]
    advise = _madvise() if resident else None
    if advise is None:
        return 0
    copied = _copied_bytes({mapping.start for mapping, *_ in resident})
    released = 0
    for mapping, low, high, present in resident:
        written = mapping.private and copied.get(mapping.start, 1) > 0  # copy-on-write pages, or unknown
        # A kernel before 5.4 refuses MADV_PAGEOUT (EINVAL): those pages stay, which costs only memory.
        advise(low, high - low, MADV_PAGEOUT if written else MADV_DONTNEED)
        released += (present - _present_pages(low, high)) * page
    return released


def give_back(what: str, *modules: Any, after: str) -> int:
    """:func:`release_file_pages` for the weights of ``modules``, with one log line naming ``what`` was given back."""
    released = release_file_pages(tensors_of(*modules))
    if released:
        logging.getLogger("unison").log(
            logging.INFO if released >= LOG_FROM else logging.DEBUG,
            "%s: %.2f GiB of weights mapped from the file given back to the OS %s (read again when next used)",
            what, released / 2**30, after)
    return released
