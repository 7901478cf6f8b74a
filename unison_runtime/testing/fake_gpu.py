"""Simulated CUDA cards and flash-attn builds, for checking GPU decisions on a machine without a GPU.

:class:`FakeCuda` replaces only torch's *queries* (``torch.cuda.is_available``,
``current_device``, ``get_device_capability``, ``get_device_properties``, ``mem_get_info``,
the ``torch.cuda.device`` context), so torch's own functions built on them
(``torch.cuda.is_bf16_supported``) and the runtime's policy code run unchanged. No kernel can
run: tensors stay on the CPU. :func:`write_flash_attn` writes a fake ``flash_attn`` package (a
working one computing with SDPA, an old one, one whose compiled part does not load, one whose
kernel fails) to put on ``sys.path``, so the real import machinery meets it.
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3


@dataclass(frozen=True)
class FakeCard:
    name: str
    capability: tuple[int, int]
    total_memory: int = 16 * GIB
    free_memory: int = 15 * GIB


#: Cards by compute capability, as torch reports them.
T4 = FakeCard("Tesla T4", (7, 5), 15 * GIB)
V100 = FakeCard("Tesla V100-SXM2-16GB", (7, 0))
GTX1080 = FakeCard("NVIDIA GeForce GTX 1080", (6, 1), 8 * GIB)
M60 = FakeCard("Tesla M60", (5, 2), 8 * GIB)
A100 = FakeCard("NVIDIA A100-SXM4-40GB", (8, 0), 40 * GIB)
RTX3090 = FakeCard("NVIDIA GeForce RTX 3090", (8, 6), 24 * GIB)
H100 = FakeCard("NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB)
MI300 = FakeCard("AMD Instinct MI300X", (9, 4), 192 * GIB)


@dataclass
class _Properties:
    name: str
    major: int
    minor: int
    total_memory: int


@dataclass
class FakeCuda:
    """A machine with ``cards`` (cuda:0, cuda:1, ...); ``current`` is torch's current device.

    ``emulated_bf16``: what torch's bf16 tensor test gives below sm80 (True on real pre-Ampere
    cards: they can hold bf16 tensors, which is why ``is_bf16_supported()`` says yes by default).
    """

    cards: tuple[FakeCard, ...]
    current: int = 0
    rocm: str | None = None
    emulated_bf16: bool = True
    entered: list[int] = field(default_factory=list)

    def _card(self, device: Any = None) -> FakeCard:
        if device is None:
            index = self.current
        elif isinstance(device, int):
            index = device
        else:
            device = torch.device(device)
            index = self.current if device.index is None else device.index
        return self.cards[index]

    def capability(self, device: Any = None) -> tuple[int, int]:
        return self._card(device).capability

    def properties(self, device: Any = None) -> _Properties:
        card = self._card(device)
        return _Properties(card.name, *card.capability, card.total_memory)

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        card = self._card(device)
        return card.free_memory, card.total_memory

    def device(self, index: Any):
        """Stands in for the ``torch.cuda.device`` context manager: makes ``index`` current inside."""
        fake = self

        @contextlib.contextmanager
        def context():
            previous = fake.current
            fake.current = torch.device(index).index if not isinstance(index, int) else index
            fake.entered.append(fake.current)
            try:
                yield
            finally:
                fake.current = previous

        return context()

    def install(self, monkeypatch: Any) -> FakeCuda:
        """Patch torch's CUDA queries with ``monkeypatch`` (undone at the end of the test)."""
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: len(self.cards))
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_device_capability", self.capability)
        monkeypatch.setattr(cuda, "get_device_properties", self.properties)
        monkeypatch.setattr(cuda, "get_device_name", lambda device=None: self._card(device).name)
        monkeypatch.setattr(cuda, "mem_get_info", self.mem_get_info)
        monkeypatch.setattr(cuda, "device", self.device)
        monkeypatch.setattr(cuda, "_check_bf16_tensor_supported", lambda device: self.emulated_bf16)
        monkeypatch.setattr(torch.version, "hip", self.rocm)
        return self


# --------------------------------------------------------------------------- flash-attn builds

_WORKING = '''
import torch

__version__ = "{version}"


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *args, return_attn_probs=False,
                    **kwargs):
    """flash-attn's layout: (batch, sequence, heads, head_dim); computed with SDPA."""
    calls.append((tuple(q.shape), q.dtype))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=causal,
        scale=softmax_scale).transpose(1, 2)
    return (out, None, None) if return_attn_probs else out


calls = []
'''

_BUILDS = {
    "working": _WORKING,
    "old": _WORKING,
    "broken": '''
raise ImportError("/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                  "_ZN3c104cuda9SetDeviceEi")
''',
    "failing": '''
__version__ = "{version}"


def flash_attn_func(q, k, v, *args, **kwargs):
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
''',
    "wrong": '''
import torch

__version__ = "{version}"


def flash_attn_func(q, k, v, *args, **kwargs):
    return torch.zeros_like(q)
''',
}


def write_flash_attn(root: str | Path, build: str, version: str = "2.7.4.post1") -> Path:
    """Write a fake ``flash_attn`` package of kind ``build`` under ``root``; returns ``root`` for ``sys.path``."""
    if build == "old" and version == "2.7.4.post1":
        version = "2.5.0"
    package = Path(root) / "flash_attn"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(textwrap.dedent(_BUILDS[build]).replace("{version}", version),
                                         encoding="utf-8")
    return Path(root)


def forget_flash_attn() -> None:
    """Drop any imported ``flash_attn`` from ``sys.modules`` (call after a test that installed a fake one)."""
    for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
        del sys.modules[name]


def install_flash_attn(monkeypatch: Any, root: str | Path, build: str, version: str = "2.7.4.post1") -> Path:
    """Put a fake flash-attn build first on ``sys.path`` for one test; pair with :func:`forget_flash_attn`."""
    path = write_flash_attn(root, build, version)
    forget_flash_attn()
    monkeypatch.syspath_prepend(str(path))
    return path
