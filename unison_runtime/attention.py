"""Which attention kernel each stage runs: flash-attn where it actually works on the chosen GPU, else SDPA.

flash-attn (2) is the fastest exact attention on NVIDIA GPUs, but it is an optional compiled
package that fails in several ways a package check does not see: a build for another torch or
CUDA (the import raises "undefined symbol"), a version older than the libraries need, a card
before Ampere (flash-attn 2 has kernels for sm80+ only), fp32 tensors. So before it is chosen,
:func:`flash_attention_status` checks, in order, the device and dtype, the import, the version
diffusers / transformers require, the compute capability of the chosen ``cuda:N``, and runs one
tiny call on that device (cached per device and dtype). When any step fails, the stage uses
PyTorch's ``scaled_dot_product_attention`` and one log line says why.

Stage one (transformers) names them ``flash_attention_2`` / ``sdpa``; stage two (diffusers'
attention dispatcher, which Wan's attention goes through) ``flash`` / ``native``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .devices import AMPERE, cuda_card, cuda_device

log = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)
#: The oldest flash-attn each library accepts: diffusers' ``_REQUIRED_FLASH_VERSION`` for its
#: ``flash`` backend, transformers' ``is_flash_attn_2_available`` for ``flash_attention_2``.
DIFFUSERS_MIN_VERSION = "2.6.3"
TRANSFORMERS_MIN_VERSION = "2.3.3"

_probed: dict[tuple[str, torch.dtype], str | None] = {}
_said: set[str] = set()


@dataclass(frozen=True)
class FlashStatus:
    """Whether flash-attn can run for a model on a device, and if not, why not (one phrase)."""

    usable: bool
    reason: str = ""


def flash_attention_available() -> bool:
    """True when a flash-attn package is installed (found, not yet imported); see :func:`flash_attention_status`."""
    return importlib.util.find_spec("flash_attn") is not None


def _version_tuple(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)


def _installed_version(module: Any) -> str | None:
    found = getattr(module, "__version__", None)
    if found:
        return str(found)
    try:
        from importlib.metadata import version

        return version("flash-attn")
    except Exception:  # no metadata: treated as unknown
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _probe_tensors(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Three tiny (batch, sequence, heads, head_dim) tensors on ``device`` for the probe call."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    return tuple(torch.randn(1, 4, 2, 64, generator=generator).to(device=device, dtype=dtype) for _ in range(3))


def _probe(flash: Any, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run one tiny ``flash_attn_func`` call on ``device``; None when it works, else what went wrong."""
    key = (str(device), dtype)
    if key not in _probed:
        try:
            q, k, v = _probe_tensors(device, dtype)
            out = flash.flash_attn_func(q, k, v)
            out = out[0] if isinstance(out, tuple) else out
            expected = torch.nn.functional.scaled_dot_product_attention(
                *(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
            if tuple(out.shape) != tuple(q.shape) or not torch.allclose(out.float(), expected, atol=2e-2):
                _probed[key] = "its test call gave wrong results"
            else:
                _probed[key] = None
        except Exception as exc:  # any failure of the kernel means: do not use it
            _probed[key] = f"its test call failed ({_first_line(exc)})"
    return _probed[key]


def flash_attention_status(device: str | torch.device, dtype: torch.dtype, *,
                           min_version: str = DIFFUSERS_MIN_VERSION) -> FlashStatus:
    """Can flash-attn run a model in ``dtype`` on ``device``? Checks the import, version, capability, one call."""
    device = torch.device(device)
    if device.type != "cuda":
        return FlashStatus(False, f"flash-attn runs on CUDA only (device is {device})")
    if dtype not in HALF_DTYPES:
        return FlashStatus(False, f"flash-attn has no {str(dtype).removeprefix('torch.')} kernels (bf16/fp16 only)")
    if not flash_attention_available():
        return FlashStatus(False, "flash-attn is not installed")
    try:
        flash = importlib.import_module("flash_attn")
    except Exception as exc:  # broken builds raise ImportError, OSError, RuntimeError...
        return FlashStatus(False, f"flash-attn is installed but does not import ({_first_line(exc)}); a build "
                                  "for another torch/CUDA? reinstall it or uninstall it")
    version = _installed_version(flash)
    if version is None or _version_tuple(version) < _version_tuple(min_version):
        return FlashStatus(False, f"flash-attn {version or '(unknown version)'} is older than the {min_version} "
                                  "needed")
    card = cuda_card(device)
    if not card.rocm and card.capability < AMPERE:
        return FlashStatus(False, f"flash-attn 2 needs an Ampere or newer GPU (sm80+); {card.label} is not")
    if not hasattr(flash, "flash_attn_func"):
        return FlashStatus(False, "flash-attn has no flash_attn_func")
    failure = _probe(flash, cuda_device(device), dtype)
    if failure:
        return FlashStatus(False, f"flash-attn {version}: {failure}")
    return FlashStatus(True)


def forget_probes() -> None:
    """Forget cached probe results and said lines (tests, or after installing flash-attn in a running process)."""
    _probed.clear()
    _said.clear()


def _say_fallback(stage: str, status: FlashStatus) -> None:
    """One log line per distinct reason: flash-attn was there but is not used (silent when it is not installed)."""
    if status.usable or status.reason in ("flash-attn is not installed",) or not status.reason:
        return
    if status.reason.startswith(("flash-attn runs on CUDA only", "flash-attn has no float32")):
        return  # nothing to fix: the CPU or an fp32 model never uses it
    message = f"{stage} attention: PyTorch SDPA, not flash-attn: {status.reason}"
    if message not in _said:
        _said.add(message)
        log.warning(message)


def flash_attention_fits(device: str | torch.device, dtype: torch.dtype) -> bool:
    """flash-attn works for a model in ``dtype`` on ``device`` (see :func:`flash_attention_status`)."""
    return flash_attention_status(device, dtype).usable


def vace_attention_backend(device: str | torch.device, dtype: torch.dtype) -> str:
    """The diffusers attention backend for the VACE transformer: ``flash`` where it works, else ``native`` SDPA."""
    status = flash_attention_status(device, dtype, min_version=DIFFUSERS_MIN_VERSION)
    _say_fallback("VACE transformer", status)
    return "flash" if status.usable else "native"


def use_best_vace_attention(transformer: Any, device: str | torch.device, dtype: torch.dtype) -> str:
    """Set the fastest working attention backend on a diffusers transformer; returns its name.

    ``native`` is diffusers' default, so nothing is set for it (and its "experimental feature"
    warning is not printed on every CPU load). If diffusers refuses ``flash`` even so (its own
    import-time check differs), the transformer keeps SDPA and one line says why.
    """
    backend = vace_attention_backend(device, dtype)
    if backend == "native":
        return backend
    try:
        transformer.set_attention_backend(backend)
    except (RuntimeError, ValueError, ImportError) as exc:
        _say_fallback("VACE transformer", FlashStatus(False, f"diffusers refused flash-attn ({exc})"))
        return "native"
    log.info("VACE transformer attention: flash-attn (diffusers backend %r)", backend)
    return backend


def qwen_attention(requested: str | None, device: torch.device, dtype: torch.dtype) -> tuple[str, FlashStatus]:
    """transformers' ``attn_implementation`` for stage one: ``flash_attention_2`` where it works, else ``sdpa``.

    ``requested`` is the user's choice (None/``auto``: decide here). Returns the choice and the
    flash-attn status, so an explicit ``flash_attention_2`` that cannot run is reported by the caller.
    """
    status = flash_attention_status(device, dtype, min_version=TRANSFORMERS_MIN_VERSION)
    if requested in (None, "auto"):
        _say_fallback("Qwen2.5-VL", status)
        return ("flash_attention_2" if status.usable else "sdpa"), status
    return requested, status
