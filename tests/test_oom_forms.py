"""Out of memory in every form CUDA, ROCm, MPS and the CPU give it: recognised, freed, explained as today.

The messages are torch's / the libraries' own wording (``c10/cuda/CUDACachingAllocator.cpp``,
``aten/src/ATen/cuda/CublasHandlePool.cpp`` via ``TORCH_CUDABLAS_CHECK``, cuDNN's
``CUDNN_STATUS_*``, ROCm's HIP allocator, MPS). cuDNN's ``CUDNN_STATUS_NOT_SUPPORTED`` (a conv3d
with no algorithm that fits its workspace) counts only while a CUDA card is nearly full,
simulated with ``FakeCuda``'s ``mem_get_info``.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness.counting import CountingLoader
from unison_runtime import faults
from unison_runtime.errors import OutOfMemory, WeightsError
from unison_runtime.pipeline import UnisonPipeline
from unison_runtime.planner.rules import RulePlanner
from unison_runtime.testing.fake_gpu import GIB, RTX3090, FakeCard, FakeCuda
from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers
from unison_runtime.vace.loading import load_vace_diffusers
from unison_runtime.vace.sampler import SamplingOptions

CUDA_OOM = ("CUDA out of memory. Tried to allocate 3.08 GiB. GPU 0 has a total capacity of 14.58 GiB of which "
            "1.21 GiB is free. Of the allocated memory 12.1 GiB is allocated by PyTorch")
CUBLAS = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
CUDNN_ALLOC = "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"
CUDNN_NOT_SUPPORTED = ("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                       "non-contiguous input.")
KERNEL_OOM = ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API "
              "call, so the stacktrace below might be incorrect.")
HIP_OOM = "HIP out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 63.98 GiB"
HIP_ERROR = "HIP error: hipErrorOutOfMemory"
MIOPEN = "miopenStatusAllocFailed"
MPS_OOM = ("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.23 GB, max allowed: 18.13 GB). "
           "Tried to allocate 1.50 GB on private pool.")

NEARLY_FULL = FakeCard("NVIDIA GeForce RTX 3090", (8, 6), 24 * GIB, free_memory=GIB // 2)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError(CUDA_OOM),
    RuntimeError(CUBLAS),
    RuntimeError(CUDNN_ALLOC),
    torch.AcceleratorError(KERNEL_OOM),
    RuntimeError(HIP_OOM),
    RuntimeError(HIP_ERROR),
    RuntimeError(MIOPEN),
    RuntimeError(MPS_OOM),
    RuntimeError("CUDA error: CUSOLVER_STATUS_ALLOC_FAILED"),
    MemoryError(),
], ids=lambda e: type(e).__name__ + ":" + str(e)[:30])
def test_every_allocation_failure_is_out_of_memory(error):
    assert faults.is_out_of_memory(error) is True


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"),
    RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx(...)`"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm(...)`"),
    ValueError(CUBLAS),  # only runtime errors come from the allocator
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
])
def test_other_errors_are_not(error):
    assert faults.is_out_of_memory(error) is False


def test_cudnn_not_supported_counts_only_on_a_nearly_full_card(monkeypatch):
    error = RuntimeError(CUDNN_NOT_SUPPORTED)
    assert faults.is_out_of_memory(error) is False  # no CUDA here at all
    fake = FakeCuda((RTX3090, NEARLY_FULL)).install(monkeypatch)
    assert faults.is_out_of_memory(error) is True  # cuda:1 has 0.5 of 24 GiB free
    fake.cards = (RTX3090, RTX3090)
    assert faults.is_out_of_memory(error) is False  # 15 GiB free: a real "not supported", passed on


def test_an_error_raised_from_an_allocation_failure_counts(monkeypatch):
    try:
        try:
            raise RuntimeError(CUBLAS)
        except RuntimeError as inner:
            raise WeightsError("cannot load the transformer") from inner
    except WeightsError as exc:
        assert faults.is_out_of_memory(exc) is True


@pytest.mark.parametrize("error", [RuntimeError(CUBLAS), RuntimeError(CUDNN_ALLOC), RuntimeError(HIP_ERROR)],
                         ids=["cublas", "cudnn", "hip"])
def test_library_failures_are_freed_and_explained_like_torch_oom(error):
    freed = []

    def work():
        raise error

    original = faults.release_memory
    faults.release_memory = lambda devices=(): freed.append(tuple(devices)) or original(devices)
    try:
        with pytest.raises(OutOfMemory) as info:
            faults.call_freeing_memory(work, lambda exc: f"advice for: {exc}", stage="decoding with the VAE",
                                       devices=("cuda:0",))
    finally:
        faults.release_memory = original
    assert freed == [("cuda:0",)]
    assert info.value.stage == "decoding with the VAE"
    assert str(info.value).startswith(f"advice for: {error}")


@pytest.fixture(scope="module")
def vace_dir(tmp_path_factory):
    return build_tiny_vace_diffusers(tmp_path_factory.mktemp("oom") / "Wan2.1-VACE-1.3B-diffusers")


class FailingOnce:
    """Replace ``module.method`` so its first call raises ``error``; later calls run normally."""

    def __init__(self, module, method: str, error: BaseException):
        self.module, self.method, self.error, self.calls = module, method, error, 0

    def __enter__(self):
        original = getattr(self.module, self.method)

        def failing(*args, **kwargs):
            self.calls += 1
            if self.calls == 1:
                raise self.error
            return original(*args, **kwargs)

        setattr(self.module, self.method, failing)
        return self

    def __exit__(self, *exc):
        delattr(self.module, self.method)


def _lion_pipeline(vace_dir):
    options = SamplingOptions(steps=2, seed=7, guidance=1.0)
    return UnisonPipeline(planner=RulePlanner(), options=options,
                          vace=CountingLoader(lambda: load_vace_diffusers(vace_dir, device="cpu")))


LION = "Create a video of a lion walking around in its habitat, 32x32, 4 frames"


def test_the_pipeline_explains_library_allocation_failures(vace_dir):
    """Through the real pipeline: the same OutOfMemory, advice and recovery as a torch.OutOfMemoryError."""
    pipeline = _lion_pipeline(vace_dir)
    fresh = pipeline.run(LION).frames
    stage = "sampling, step 1 of 2"
    with FailingOnce(pipeline.vace.transformer, "forward", RuntimeError(CUBLAS)), \
            pytest.raises(OutOfMemory) as info:
        pipeline.run(LION)
    text = str(info.value)
    assert info.value.stage == stage
    assert f"out of memory on cpu while {stage} (32x32, 5 frames): {CUBLAS.splitlines()[0]}" in text
    assert "- the resolution: width x height is 32x32; try 16x16" in text
    assert torch.equal(pipeline.run(LION).frames, fresh)


def test_a_library_allocation_failure_at_decode_is_retried_tiled_keeping_the_latents(vace_dir):
    """A cuDNN allocation failure in the VAE decode is an out-of-memory like torch's: the finished
    latents are decoded again in tiles (sampler.decode), not lost, and the notes say so."""
    pipeline = _lion_pipeline(vace_dir)
    fresh = pipeline.run(LION).frames
    with FailingOnce(pipeline.vace.vae, "decode", RuntimeError(CUDNN_ALLOC)):
        result = pipeline.run(LION)
    assert any("decoding ran out of memory; decoded again in" in note for note in result.notes)
    torch.testing.assert_close(result.frames, fresh, atol=1e-5, rtol=0)  # 32x32 fits in one tile
