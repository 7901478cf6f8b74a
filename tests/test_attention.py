"""Attention backend choice by what actually works: import, version, capability, one probe call; else SDPA.

Simulated machines (unison_runtime/testing/fake_gpu.py): torch's CUDA queries are faked, and a
fake ``flash_attn`` package is put on ``sys.path`` so the real import machinery meets it (a
working build computing with SDPA, one too old, one whose compiled part does not load, one whose
kernel raises, one that computes garbage). The probe's three tiny tensors are made on the CPU
here (no CUDA device can hold them); everything else runs as on a GPU machine.
"""

from __future__ import annotations

import logging

import pytest
import torch

from unison_runtime import attention
from unison_runtime.errors import UnisonError
from unison_runtime.planner import qwen_loading
from unison_runtime.testing.fake_gpu import (
    A100,
    H100,
    MI300,
    RTX3090,
    T4,
    FakeCuda,
    forget_flash_attn,
    install_flash_attn,
)
from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers
from unison_runtime.vace.loading import load_vace_diffusers

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    attention.forget_probes()
    monkeypatch.setattr(attention, "_probe_tensors",
                        lambda device, dtype: tuple(torch.randn(1, 4, 2, 64, dtype=dtype) for _ in range(3)))
    yield
    forget_flash_attn()
    attention.forget_probes()


def machine(monkeypatch, tmp_path, card, build: str | None, **kwargs):
    """A simulated machine with ``card`` as cuda:0 and flash-attn ``build`` (None: not installed)."""
    FakeCuda((card,), **kwargs).install(monkeypatch)
    if build is None:
        monkeypatch.setattr(attention, "flash_attention_available", lambda: False)
    else:
        install_flash_attn(monkeypatch, tmp_path / "site", build)


@pytest.mark.parametrize(("card", "build", "dtype", "vace", "qwen", "reason"), [
    (A100, "working", BF16, "flash", "flash_attention_2", ""),
    (H100, "working", FP16, "flash", "flash_attention_2", ""),
    (RTX3090, None, BF16, "native", "sdpa", "flash-attn is not installed"),
    (RTX3090, "working", FP32, "native", "sdpa", "flash-attn has no float32 kernels"),
    (T4, "working", FP16, "native", "sdpa", "flash-attn 2 needs an Ampere or newer GPU (sm80+); cuda:0 (Tesla T4, "
                                            "sm75) is not"),
    (RTX3090, "broken", BF16, "native", "sdpa", "flash-attn is installed but does not import (ImportError: "
                                                "/site-packages/flash_attn_2_cuda"),
    (RTX3090, "old", BF16, "native", "flash_attention_2", "flash-attn 2.5.0 is older than the 2.6.3 needed"),
    (RTX3090, "failing", BF16, "native", "sdpa", "flash-attn 2.7.4.post1: its test call failed (RuntimeError: "
                                                 "FlashAttention only supports Ampere GPUs or newer.)"),
    (RTX3090, "wrong", BF16, "native", "sdpa", "flash-attn 2.7.4.post1: its test call gave wrong results"),
])
def test_backend_for_each_stage(monkeypatch, tmp_path, card, build, dtype, vace, qwen, reason):
    machine(monkeypatch, tmp_path, card, build)
    assert attention.vace_attention_backend("cuda", dtype) == vace
    assert qwen_loading.resolve_attention(None, torch.device("cuda:0"), dtype) == qwen
    status = attention.flash_attention_status("cuda:0", dtype)
    assert status.usable == (vace == "flash")
    assert status.reason.startswith(reason)


def test_rocm_cards_are_not_held_to_the_nvidia_capability(monkeypatch, tmp_path):
    machine(monkeypatch, tmp_path, MI300, "working", rocm="6.2")
    assert attention.vace_attention_backend("cuda:0", BF16) == "flash"


def test_cpu_never_uses_flash_attn(monkeypatch, tmp_path):
    install_flash_attn(monkeypatch, tmp_path / "site", "working")
    assert attention.vace_attention_backend("cpu", BF16) == "native"
    assert qwen_loading.resolve_attention(None, torch.device("cpu"), BF16) == "sdpa"


def test_one_log_line_when_flash_attn_is_there_but_not_used(monkeypatch, tmp_path, caplog):
    machine(monkeypatch, tmp_path, RTX3090, "broken")
    with caplog.at_level(logging.INFO, logger="unison_runtime.attention"):
        for _ in range(3):
            attention.vace_attention_backend("cuda:0", BF16)
            qwen_loading.resolve_attention(None, torch.device("cuda:0"), BF16)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0].startswith("VACE transformer attention: PyTorch SDPA, not flash-attn: flash-attn is installed "
                               "but does not import (ImportError:")
    assert lines[1].startswith("Qwen2.5-VL attention: PyTorch SDPA, not flash-attn: ")


def test_nothing_is_said_when_flash_attn_is_simply_absent(monkeypatch, tmp_path, caplog):
    machine(monkeypatch, tmp_path, RTX3090, None)
    with caplog.at_level(logging.INFO, logger="unison_runtime.attention"):
        assert attention.vace_attention_backend("cuda:0", BF16) == "native"
    assert caplog.records == []


def test_the_probe_runs_once_per_device_and_dtype(monkeypatch, tmp_path):
    machine(monkeypatch, tmp_path, RTX3090, "working")
    import flash_attn

    for _ in range(3):
        attention.vace_attention_backend("cuda:0", BF16)
        attention.vace_attention_backend("cuda", BF16)  # the same card
    attention.vace_attention_backend("cuda:0", FP16)
    assert flash_attn.calls == [((1, 4, 2, 64), BF16), ((1, 4, 2, 64), FP16)]


@pytest.mark.parametrize(("card", "build", "dtype", "message"), [
    (RTX3090, None, BF16, "the flash-attn package is not installed"),
    (RTX3090, "working", FP32, "needs a CUDA device and bf16/fp16"),
    (T4, "working", FP16, "cannot run here: flash-attn 2 needs an Ampere or newer GPU (sm80+); cuda:0 (Tesla T4"),
    (RTX3090, "broken", BF16, "cannot run here: flash-attn is installed but does not import"),
])
def test_asking_qwen_for_flash_attention_that_cannot_run_is_a_clear_error(monkeypatch, tmp_path, card, build, dtype,
                                                                         message):
    machine(monkeypatch, tmp_path, card, build)
    with pytest.raises(UnisonError, match="use --attention sdpa") as info:
        qwen_loading.resolve_attention("flash_attention_2", torch.device("cuda:0"), dtype)
    assert message in str(info.value)
    assert qwen_loading.resolve_attention("sdpa", torch.device("cuda:0"), dtype) == "sdpa"


def test_vace_loader_falls_back_when_diffusers_refuses_flash(monkeypatch, tmp_path, caplog):
    """Our checks pass (a working build on an sm86 card) but diffusers decided at import time that
    flash-attn is unusable: set_attention_backend raises; the transformer keeps SDPA, one line says why."""
    from diffusers import WanVACETransformer3DModel

    machine(monkeypatch, tmp_path, RTX3090, "working")
    folder = build_tiny_vace_diffusers(tmp_path / "vace")
    transformer = WanVACETransformer3DModel.from_pretrained(folder / "transformer")
    with caplog.at_level(logging.INFO, logger="unison_runtime.attention"):
        assert attention.use_best_vace_attention(transformer, "cuda:0", BF16) == "native"
    assert [r.getMessage() for r in caplog.records] == [
        "VACE transformer attention: PyTorch SDPA, not flash-attn: diffusers refused flash-attn (Flash Attention "
        "backend 'flash' is not usable because of missing package or the version is too old. Please install "
        "`flash-attn>=2.6.3`.)"]


def test_vace_transformer_runs_through_diffusers_flash_backend(monkeypatch, tmp_path):
    """With diffusers agreeing, the flash backend is set and the transformer computes through
    ``flash_attn_func`` (the fake computes with SDPA): same output as native SDPA."""
    from diffusers import WanVACETransformer3DModel
    from diffusers.models import attention_dispatch

    machine(monkeypatch, tmp_path, RTX3090, "working")
    import flash_attn

    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", True)
    monkeypatch.setattr(attention_dispatch, "flash_attn_func", flash_attn.flash_attn_func)
    folder = build_tiny_vace_diffusers(tmp_path / "vace")
    native = WanVACETransformer3DModel.from_pretrained(folder / "transformer").eval()
    flash = WanVACETransformer3DModel.from_pretrained(folder / "transformer").eval()
    assert attention.use_best_vace_attention(flash, "cuda:0", BF16) == "flash"
    config = native.config
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, config.in_channels, 2, 8, 8, generator=g),
              "control_hidden_states": torch.randn(1, config.vace_in_channels, 2, 8, 8, generator=g),
              "encoder_hidden_states": torch.randn(1, 6, config.text_dim, generator=g),
              "timestep": torch.tensor([500.0]), "return_dict": False}
    before = len(flash_attn.calls)
    with torch.no_grad():
        expected, got = native(**inputs)[0], flash(**inputs)[0]
    assert len(flash_attn.calls) > before  # attention went through flash_attn_func
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cpu_load_keeps_native_attention(tmp_path):
    models = load_vace_diffusers(build_tiny_vace_diffusers(tmp_path / "vace"), device="cpu")
    assert models.attention == "native"


def test_single_file_loader_decides_attention_on_its_device_and_dtype(monkeypatch, tmp_path):
    from diffusers import WanVACETransformer3DModel

    from unison_runtime.testing.tiny_wan_files import build_tiny_comfy_models_dir
    from unison_runtime.vace.files import load_vace_from_files

    paths = build_tiny_comfy_models_dir(tmp_path / "models")
    seen: list[tuple[str, torch.dtype]] = []
    chosen: list[str] = []

    def choose(device, dtype):
        seen.append((str(device), dtype))
        return "flash"

    monkeypatch.setattr(attention, "vace_attention_backend", choose)
    monkeypatch.setattr(WanVACETransformer3DModel, "set_attention_backend", lambda self, name: chosen.append(name))
    models = load_vace_from_files(paths["transformer"], paths["vae"], paths["text_encoder"], device="cpu",
                                  dtype="bf16")
    assert models.attention == "flash" and chosen == ["flash"]
    assert seen == [("cpu", torch.bfloat16)]  # asked with the transformer's device and compute dtype
