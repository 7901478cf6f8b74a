"""GPU decisions on simulated cards: the compute dtype per device capability, asked of the chosen cuda:N.

No GPU here: ``FakeCuda`` replaces torch's CUDA *queries* only, so torch's own
``is_bf16_supported`` and the runtime's policy run unchanged (see unison_runtime/testing/fake_gpu.py).
Below sm80 a real card can hold bf16 tensors, so torch's default ``is_bf16_supported()``
(``including_emulation=True``) says yes there; the fake says so too, as the real card would.
"""

from __future__ import annotations

import logging

import pytest
import torch

from unison_runtime import devices
from unison_runtime.planner import qwen_loading
from unison_runtime.testing.fake_gpu import A100, GTX1080, H100, M60, MI300, RTX3090, T4, V100, FakeCuda
from unison_runtime.vace import loading

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def fresh_messages():
    devices._said.clear()
    yield
    devices._said.clear()


@pytest.mark.parametrize(("card", "rocm", "transformer", "text_encoder", "planner"), [
    (H100, None, BF16, BF16, BF16),
    (RTX3090, None, BF16, BF16, BF16),
    (A100, None, BF16, BF16, BF16),
    (T4, None, FP16, FP32, FP32),  # bf16 only emulated: fp16 (residual stream in fp32) / fp32
    (V100, None, FP16, FP32, FP32),
    (GTX1080, None, FP16, FP32, FP32),
    (M60, None, FP32, FP32, FP32),  # no fast fp16 either
    (MI300, "6.2", BF16, BF16, BF16),  # ROCm
])
def test_default_dtypes_per_capability(monkeypatch, card, rocm, transformer, text_encoder, planner):
    FakeCuda((card,), rocm=rocm).install(monkeypatch)
    assert loading.resolve_dtype(None, "cuda", role="transformer") is transformer
    assert loading.resolve_dtype("auto", "cuda:0", role="text_encoder") is text_encoder
    assert loading.resolve_dtype(None, "cuda", role="vae") is FP32
    assert qwen_loading.resolve_dtype(None, torch.device("cuda")) is planner
    assert qwen_loading.resolve_dtype("auto", torch.device("cuda:0")) is planner


def test_pre_ampere_cards_do_not_get_emulated_bf16(monkeypatch):
    """torch's default answer is yes on a T4 (emulation); the policy must not take it."""
    FakeCuda((T4,)).install(monkeypatch)
    assert torch.cuda.is_bf16_supported() is True  # what the previous policy asked
    assert devices.bf16_native("cuda") is False
    assert loading.resolve_dtype(None, "cuda") is not BF16
    assert qwen_loading.resolve_dtype(None, torch.device("cuda")) is not BF16


def test_explicit_dtypes_win_on_any_card(monkeypatch):
    FakeCuda((T4,)).install(monkeypatch)
    assert loading.resolve_dtype("bf16", "cuda") is BF16
    assert loading.resolve_dtype("fp32", "cuda", role="transformer") is FP32
    assert qwen_loading.resolve_dtype("fp16", torch.device("cuda")) is FP16


@pytest.mark.parametrize(("cards", "current", "chosen", "expected"), [
    ((T4, RTX3090), 0, "cuda:1", BF16),  # current is the T4, the user chose the 3090
    ((RTX3090, T4), 0, "cuda:1", FP16),  # current is the 3090, the user chose the T4
    ((T4, RTX3090), 1, "cuda:0", FP16),
    ((T4, RTX3090), 1, "cuda", BF16),  # bare cuda = the current device
])
def test_the_chosen_device_is_asked_not_the_current_one(monkeypatch, cards, current, chosen, expected):
    fake = FakeCuda(cards, current=current).install(monkeypatch)
    assert loading.resolve_dtype(None, chosen, role="transformer") is expected
    assert fake.current == current  # the device context was left as it was
    index = torch.device(chosen).index
    assert fake.entered[-1] == (current if index is None else index)  # is_bf16_supported asked of that device
    planner = BF16 if expected is BF16 else FP32
    assert qwen_loading.resolve_dtype(None, torch.device(chosen)) is planner


def test_the_choice_is_one_line_said_once(monkeypatch, caplog):
    FakeCuda((RTX3090, T4)).install(monkeypatch)
    with caplog.at_level(logging.INFO, logger="unison_runtime.devices"):
        for _ in range(3):
            loading.resolve_dtype(None, "cuda:1", role="transformer")
            loading.resolve_dtype(None, "cuda:1", role="text_encoder")
            qwen_loading.resolve_dtype(None, torch.device("cuda:1"))
            loading.resolve_dtype(None, "cuda:0", role="transformer")  # bf16 on the 3090: nothing to say
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "cuda:1 (Tesla T4, sm75) has no native bf16: the VACE transformer runs in fp16 with its residual stream "
        "kept in fp32 (choose dtype fp32 to override)",
        "cuda:1 (Tesla T4, sm75): no native bf16, and umT5 overflows in fp16: the umT5 text encoder runs in fp32 "
        "(more memory; choose a dtype explicitly to override)",
        "cuda:1 (Tesla T4, sm75): no native bf16, and fp16 is not verified for it: the Qwen2.5-VL (stage one) runs "
        "in fp32 (more memory; choose a dtype explicitly to override)",
    ]
    assert all("\n" not in line for line in lines)


def test_the_comfyui_loader_nodes_get_the_same_choice(monkeypatch):
    from nodes import loaders

    FakeCuda((T4, H100)).install(monkeypatch)
    assert loaders._vace_dtypes("auto", "auto", "cuda:0", "cuda:1") == {"dtype": FP16, "text_dtype": BF16,
                                                                "vae_dtype": FP32}
    assert loaders._vace_dtypes("auto", "auto", "cuda:1", "cuda:0") == {"dtype": BF16, "text_dtype": FP32,
                                                                "vae_dtype": FP32}


def test_cpu_and_other_devices_keep_their_policy():
    assert loading.resolve_dtype(None, "cpu") is FP32
    assert loading.resolve_dtype(None, "cpu", role="text_encoder") is FP32
    assert qwen_loading.resolve_dtype(None, torch.device("cpu")) is FP32
    assert loading.resolve_dtype(None, "mps", role="transformer") is BF16
    with pytest.raises(ValueError, match="unknown model role"):
        devices.default_compute_dtype("cpu", "unet")


def test_a_cuda_device_torch_cannot_see_is_a_clear_error(monkeypatch):
    from unison_runtime.errors import UnisonError

    if not torch.cuda.is_available():
        with pytest.raises(UnisonError, match="device cuda asks for CUDA, but torch sees no CUDA device here"):
            loading.resolve_dtype(None, "cuda")
    FakeCuda((T4, RTX3090)).install(monkeypatch)
    with pytest.raises(UnisonError, match=r"device cuda:2 does not exist: torch sees 2 CUDA device\(s\), cuda:0 to "
                                          r"cuda:1"):
        loading.resolve_dtype(None, "cuda:2")
