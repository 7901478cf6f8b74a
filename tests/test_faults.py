"""Faults (issue 8, item 5): interrupts, out of memory and model files that change, for real.

Every hostile condition is produced, not described: a cancel callback that trips at step k, a
transformer forward patched to raise ``torch.OutOfMemoryError`` (or to make the CPU allocator
fail for real) at step k, model files deleted or replaced on disk between runs. After each, the
same pipeline and models must run again and give exactly what a fresh pipeline gives.
"""

from __future__ import annotations

import gc
import os
import shutil
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.harness.counting import CountingLoader
from unison_runtime import faults
from unison_runtime.errors import (
    MediaError,
    OutOfMemory,
    PathError,
    PlanError,
    SamplingCancelled,
    UnisonError,
    WeightsError,
)
from unison_runtime.faults import FileSignature, FileStamp, file_signature, memory_advice, signature_token
from unison_runtime.media import Medium
from unison_runtime.pipeline import UnisonPipeline, pipeline_from_args
from unison_runtime.plan import MediaRef, default_plan
from unison_runtime.planner.rules import RulePlanner
from unison_runtime.projector import load_projector
from unison_runtime.testing.tiny_projector import build_tiny_projector
from unison_runtime.testing.tiny_wan import TINY_VACE, build_tiny_vace_diffusers
from unison_runtime.vace import sampler as sampler_module
from unison_runtime.vace.loading import load_vace_diffusers
from unison_runtime.vace.sampler import SamplingOptions, sample
from unison_runtime.vace.sources import prepare_vace_inputs
from unison_runtime.vace.text import text_contexts

T2V = "Create a video of a lion walking around in its habitat, 32x32, 4 frames"  # 32x32, 5 frames
T2I_SMALL = "Create an image of a red car parked on a street at night, 16x16"
STEPS = 3
OPTIONS = SamplingOptions(steps=STEPS, seed=7)


@pytest.fixture(scope="module")
def vace_dir(tmp_path_factory):
    return build_tiny_vace_diffusers(tmp_path_factory.mktemp("faults") / "Wan2.1-VACE-1.3B-diffusers")


def make_pipeline(vace_dir, **kwargs):
    loader = CountingLoader(lambda: load_vace_diffusers(vace_dir, device="cpu"))
    return UnisonPipeline(planner=RulePlanner(), vace=loader, options=OPTIONS, **kwargs), loader


@pytest.fixture(scope="module")
def fresh_t2v(vace_dir):
    """What a fresh pipeline with freshly loaded models makes of T2V: the yardstick after every fault."""
    pipeline, _ = make_pipeline(vace_dir)
    return pipeline.run(T2V).frames


def forward_counter(transformer):
    calls: list[int] = []
    handle = transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]),
                                                   with_kwargs=True)
    return calls, handle


# --------------------------------------------------------------------------- interrupts


class HostInterrupt(Exception):
    """What a host's cancel check raises instead of returning True (ComfyUI's InterruptProcessingException)."""


@pytest.mark.parametrize("style, k", [("returns True", 2), ("raises", 1)])
def test_interrupt_at_step_k_stops_within_one_step_and_the_models_stay_usable(vace_dir, fresh_t2v, k, style):
    pipeline, loader = make_pipeline(vace_dir)
    progress: list[int] = []

    def cancel() -> bool:
        if len(progress) >= k:  # the user presses stop once step k is done
            if style == "raises":
                raise HostInterrupt("interrupted")
            return True
        return False

    calls, handle = forward_counter(pipeline.vace.transformer)
    expected = SamplingCancelled if style == "returns True" else HostInterrupt
    try:
        with pytest.raises(expected) as info:
            pipeline.run(T2V, progress=lambda step, total: progress.append(step), cancel=cancel)
    finally:
        handle.remove()
    if style == "returns True":
        assert f"before step {k + 1} of {STEPS}" in str(info.value)
    assert progress == list(range(1, k + 1))
    assert calls == [2] * k  # one batched forward per finished step, none after the stop

    again = pipeline.run(T2V)  # same pipeline, same models, same seed
    assert loader.calls == 1
    assert torch.equal(again.frames, fresh_t2v)


def test_a_cancelled_run_leaves_no_state_in_diffusers_cache_hooks(vace_dir):
    """First-block cache keeps residuals between steps; a stopped run must not hand them to the next."""
    from diffusers import FirstBlockCacheConfig

    def cached_pipeline():
        pipeline, _ = make_pipeline(vace_dir)
        # A huge threshold: every step after the first reuses the cached tail, so stale state would show.
        pipeline.vace.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        return pipeline

    fresh = cached_pipeline().run(T2V).frames
    pipeline = cached_pipeline()
    steps: list[int] = []
    with pytest.raises(SamplingCancelled):
        pipeline.run(T2V, progress=lambda s, t: steps.append(s), cancel=lambda: len(steps) >= 2)
    assert torch.equal(pipeline.run(T2V).frames, fresh)


def test_without_the_reset_the_stale_cache_would_change_the_result(vace_dir, monkeypatch):
    """The reset above is what makes the difference (guards the test against passing for nothing)."""
    from diffusers import FirstBlockCacheConfig

    pipeline, _ = make_pipeline(vace_dir)
    pipeline.vace.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    fresh = pipeline.run(T2V).frames  # the first run resets at its start, so this one is clean
    monkeypatch.setattr(sampler_module, "reset_model_caches", lambda *modules: None)
    steps: list[int] = []
    with pytest.raises(SamplingCancelled):
        pipeline.run(T2V, progress=lambda s, t: steps.append(s), cancel=lambda: len(steps) >= 2)
    assert not torch.equal(pipeline.run(T2V).frames, fresh)


# --------------------------------------------------------------------------- out of memory


class OutOfMemoryAt:
    """Patches a module's forward to fail from its ``at``-th call on, remembering (weakly) what it was given."""

    def __init__(self, module, at: int, error=None, method: str = "forward"):
        self.module, self.at, self.calls, self.method = module, at, 0, method
        self.error = error or (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        self.seen: list[weakref.ref] = []

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.at:
            self.seen.extend(weakref.ref(v) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
            raise self.error()
        return self.original(*args, **kwargs)

    def __enter__(self):
        self.original = getattr(self.module, self.method)
        setattr(self.module, self.method, self.forward)
        return self

    def __exit__(self, *exc):
        delattr(self.module, self.method)  # back to the class's method


def real_cpu_allocation_failure():
    """Ask the CPU allocator for 4 EiB: it fails for real, as a RuntimeError (not torch.OutOfMemoryError)."""
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("the allocator granted 4 EiB")


@pytest.mark.parametrize("kind, batch_cfg", [("torch.OutOfMemoryError", True), ("CPU allocator", False)])
def test_out_of_memory_at_step_k_frees_the_call_and_names_the_settings(vace_dir, fresh_t2v, batch_cfg, kind):
    pipeline, loader = make_pipeline(vace_dir)
    models = pipeline.vace
    sources: list[weakref.ref] = []
    real_sources = pipeline.sources

    def spy_sources(plan, media):
        inputs = real_sources(plan, media)
        sources.append(weakref.ref(inputs.frames))
        return inputs

    pipeline.sources = spy_sources
    per_step = 1 if batch_cfg else 2
    error = real_cpu_allocation_failure if kind == "CPU allocator" else None
    # Fails from step 2 on: batched guidance first falls back to two passes, which fail too.
    with OutOfMemoryAt(models.transformer, at=per_step + 1, error=error) as patch, \
            pytest.raises(OutOfMemory) as info:
        pipeline.run(T2V, options=SamplingOptions(steps=STEPS, seed=7, batch_cfg=batch_cfg))

    error = info.value
    assert isinstance(error, UnisonError) and isinstance(error, MemoryError)
    message = str(error)
    assert "while sampling, step 2 of 3" in message and error.stage == "sampling, step 2 of 3"
    assert "32x32" in message and "16x16" in message  # the current resolution, and a smaller one to try
    assert "num_frames is 5" in message
    assert "batch_cfg is already off" in message  # off by the user, or by the fallback after the first failure
    assert "unload or offload" in message
    if kind == "CPU allocator":
        assert "can't allocate memory" in message
    # Nothing the call allocated outlives it, although the error (and its traceback) is still held.
    assert patch.seen and all(ref() is None for ref in patch.seen), "latents, control or contexts still alive"
    assert sources and sources[0]() is None, "the VACE inputs are still alive"

    del pipeline.sources
    smaller = pipeline.run(T2I_SMALL)
    assert smaller.frames.shape == (1, 16, 16, 3)
    assert torch.equal(pipeline.run(T2V).frames, fresh_t2v)
    assert loader.calls == 1


def test_out_of_memory_in_the_batched_pass_falls_back_after_freeing_it(vace_dir, monkeypatch):
    """The fallback empties the device cache only once the failed forward's tensors are gone."""
    models = load_vace_diffusers(vace_dir, device="cpu")
    plan = default_plan("text_to_video", width=32, height=32, num_frames=5)
    contexts = text_contexts(models, "a lion")
    alive_at_empty: list[bool] = []
    failed: list[weakref.ref] = []

    def oom_on_batch(module, args, kwargs):
        if kwargs["hidden_states"].shape[0] == 2:
            failed.append(weakref.ref(kwargs["hidden_states"]))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(sampler_module, "_empty_cache",
                        lambda device: alive_at_empty.append(any(ref() is not None for ref in failed)))
    handle = models.transformer.register_forward_pre_hook(oom_on_batch, with_kwargs=True)
    try:
        result = sample(models, plan, prepare_vace_inputs(plan, []), contexts.cond, contexts.neg,
                        SamplingOptions(steps=2))
    finally:
        handle.remove()
    assert alive_at_empty == [False]
    assert any("ran out of memory at step 1" in note for note in result.notes)


def test_out_of_memory_in_the_sampler_called_alone_frees_its_latents(vace_dir):
    """The node path calls the sampler directly: its own latents go, the caller's contexts stay the caller's."""
    models = load_vace_diffusers(vace_dir, device="cpu")
    plan = default_plan("text_to_video", width=32, height=32, num_frames=5)
    contexts = text_contexts(models, "a lion")
    inputs = prepare_vace_inputs(plan, [])
    with OutOfMemoryAt(models.transformer, at=1) as patch, pytest.raises(OutOfMemory, match="step 1 of 2"):
        sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=2, guidance=1.0))
    hidden = patch.seen[0]  # the noise latents, allocated by the sampler
    assert hidden() is None
    assert contexts.cond.shape[1] == 2048  # the caller's tensors are untouched and usable
    again = sample(models, plan, inputs, contexts.cond, contexts.neg, SamplingOptions(steps=2, guidance=1.0))
    assert again.frames.shape == (5, 32, 32, 3)


def test_out_of_memory_while_decoding_names_only_what_matters_there(vace_dir, fresh_t2v):
    pipeline, _ = make_pipeline(vace_dir)
    with OutOfMemoryAt(pipeline.vace.vae, at=1, method="decode"), pytest.raises(OutOfMemory) as info:
        pipeline.run(T2V)
    message = str(info.value)
    assert info.value.stage == "decoding with the VAE" and "32x32" in message and "num_frames is 5" in message
    assert "batch_cfg" not in message and "guidance" not in message  # no transformer pass runs while decoding
    assert torch.equal(pipeline.run(T2V).frames, fresh_t2v)


def test_out_of_memory_while_encoding_the_prompt_is_explained_and_recoverable(vace_dir, fresh_t2v):
    pipeline, _ = make_pipeline(vace_dir)
    with OutOfMemoryAt(pipeline.vace.text_encoder, at=1), pytest.raises(OutOfMemory) as info:
        pipeline.run(T2V)
    assert info.value.stage == "encoding the prompt with umT5"
    assert "while encoding the prompt with umT5 (32x32, 5 frames)" in str(info.value)
    assert torch.equal(pipeline.run(T2V).frames, fresh_t2v)


def test_other_errors_pass_through_unchanged():
    def work():
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        faults.call_freeing_memory(work, lambda exc: "unused")
    assert faults.call_freeing_memory(lambda: 42, lambda exc: "unused") == 42


@pytest.mark.parametrize("exc, expected", [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (MemoryError(), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),  # only allocation errors are memory errors
])
def test_is_out_of_memory(exc, expected):
    assert faults.is_out_of_memory(exc) is expected


def test_memory_advice_lists_every_setting_with_its_value():
    text = memory_advice(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.1 GiB"),
                         stage="sampling, step 7 of 50", width=832, height=480, num_frames=81, device="cuda:0",
                         batch_cfg=True, guidance=5.0, text_device="cuda:0")
    assert text.startswith("out of memory on cuda:0 while sampling, step 7 of 50 (832x480, 81 frames): CUDA out")
    assert "width x height is 832x480; try 416x240" in text
    assert "num_frames is 81; try 41" in text
    assert "batch_cfg: on" in text and "turn it off" in text and "guidance to 1 (now 5)" in text
    assert "umT5 runs on cuda:0; load it on the CPU" in text
    image = memory_advice(None, stage="decoding with the VAE", width=32, height=16, num_frames=1, device="cpu",
                          batch_cfg=True, guidance=1.0, text_device="cpu")
    assert "num_frames" not in image and "batch_cfg" not in image and "umT5" not in image
    assert "try 16x16" in image  # never below the 16-pixel minimum
    host = memory_advice(None, stage="sampling", width=64, height=64, num_frames=5, device="cuda", batch_cfg=None,
                         guidance=5.0, where="(in ComfyUI: width, height and frames are on the Unison Task Router)")
    assert "batch_cfg" not in host and "guidance: 5 runs two passes per step; 1 runs one" in host
    assert host.endswith("(in ComfyUI: width, height and frames are on the Unison Task Router)")


# --------------------------------------------------------------------------- model files


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_file_stamp_records_size_mtime_inode_and_device(tmp_path):
    path = write(tmp_path / "model.safetensors", b"x" * 10)
    info = os.stat(path)
    assert FileStamp.of(path) == FileStamp(str(path), 10, info.st_mtime_ns, info.st_ino, info.st_dev)


def test_signature_of_a_deleted_file_names_it(tmp_path):
    path = write(tmp_path / "wan_2.1_vae.safetensors", b"weights")
    signature = file_signature(path, what="VACE model file")
    assert not signature.changed()
    path.unlink()
    with pytest.raises(WeightsError, match=r"VACE model file .*wan_2\.1_vae\.safetensors was deleted since it was "
                                           "loaded"):
        signature.current()


def test_a_replacement_with_the_same_size_and_mtime_is_still_a_change(tmp_path):
    path = write(tmp_path / "model.safetensors", b"A" * 64)
    signature = file_signature(path)
    info = os.stat(path)
    other = write(tmp_path / "incoming.tmp", b"B" * 64)
    os.utime(other, ns=(info.st_atime_ns, info.st_mtime_ns))  # as a copy that keeps timestamps would
    os.replace(other, path)
    assert os.stat(path).st_size == info.st_size and os.stat(path).st_mtime_ns == info.st_mtime_ns
    assert signature.changed()


def test_a_rewrite_in_place_is_a_change(tmp_path):
    path = write(tmp_path / "model.pth", b"A" * 64)
    signature = file_signature(path)
    with open(path, "r+b") as handle:
        handle.write(b"B" * 64)
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1_000_000))
    assert signature.changed()


def test_folder_signature_sees_added_replaced_and_deleted_files(tmp_path):
    folder = tmp_path / "Qwen2.5-VL-3B-Instruct"
    write(folder / "config.json", b"{}")
    write(folder / "model.safetensors", b"w" * 32)
    signature = file_signature(folder)
    assert [Path(s.path).name for s in signature.stamps] == ["config.json", "model.safetensors"]
    assert signature == FileSignature.of(folder) and hash(signature) == hash(FileSignature.of(folder))
    write(folder / "extra.safetensors", b"e")
    assert signature.changed()
    (folder / "extra.safetensors").unlink()
    assert not signature.changed()
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"model\.safetensors was deleted since it was loaded"):
        signature.current()


def test_missing_paths_are_weights_errors_and_the_token_never_raises(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        file_signature(tmp_path / "nope.safetensors")
    assert file_signature(None).stamps == ()
    present = write(tmp_path / "a.bin", b"1")
    token = signature_token(present, tmp_path / "gone.bin", None)
    assert token.startswith(f"{present}:1:") and token.endswith(f"missing:{tmp_path / 'gone.bin'}")


def test_pipeline_reports_a_deleted_model_file_and_reloads_a_replaced_one(tmp_path):
    path = build_tiny_projector(tmp_path / "projector.pth", input_dim=8, t5_dim=TINY_VACE.text_dim, seed=1)
    loader = CountingLoader(lambda: load_projector(path))
    pipeline = UnisonPipeline(projector=loader, files={"projector": [path]})
    first = pipeline.projector
    assert pipeline.projector is first and loader.calls == 1  # cached while the file is unchanged

    replacement = build_tiny_projector(tmp_path / "new" / "projector.pth", input_dim=8, t5_dim=TINY_VACE.text_dim,
                                       seed=2)
    os.replace(replacement, path)
    second = pipeline.projector
    assert loader.calls == 2 and second is not first
    torch.testing.assert_close(second.ln_in.weight, load_projector(path).ln_in.weight, rtol=0, atol=0)
    assert not torch.equal(second.ln_in.weight, first.ln_in.weight)

    path.unlink()
    with pytest.raises(WeightsError, match=r"projector file .*projector\.pth was deleted since it was loaded"):
        _ = pipeline.projector
    assert "projector" not in pipeline.loaded()  # not kept around to be served later
    with pytest.raises(WeightsError, match=r"projector file .*projector\.pth not found"):  # still gone
        _ = pipeline.projector
    build_tiny_projector(path, input_dim=8, t5_dim=TINY_VACE.text_dim, seed=3)
    assert pipeline.projector is not None and loader.calls == 3


def test_a_vace_weights_file_deleted_between_runs_stops_the_next_run(vace_dir, tmp_path, fresh_t2v):
    folder = shutil.copytree(vace_dir, tmp_path / "vace")
    pipeline, loader = make_pipeline(folder, files={"vace": [folder]})
    assert torch.equal(pipeline.run(T2V).frames, fresh_t2v)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    saved = weights.read_bytes()
    weights.unlink()
    with pytest.raises(WeightsError, match=r"transformer/diffusion_pytorch_model\.safetensors was deleted since it "
                                           "was loaded"):
        pipeline.run(T2V)
    write(weights, saved)
    assert torch.equal(pipeline.run(T2V).frames, fresh_t2v)
    assert loader.calls == 2  # loaded again from the file put back, not served from before


def test_cli_pipeline_watches_the_files_it_located(tmp_path):
    models = tmp_path / "models"
    path = build_tiny_projector(models / "unison" / "projector.pth", input_dim=8, t5_dim=TINY_VACE.text_dim)
    pipeline, locations = pipeline_from_args(SimpleNamespace(models=models, input_dir=tmp_path))
    assert locations.projector == path
    assert pipeline.projector is not None
    path.unlink()
    with pytest.raises(WeightsError, match="was deleted since it was loaded"):
        _ = pipeline.projector


# --------------------------------------------------------------------------- failures never corrupt state


class FailingOnce:
    """A loader that fails the first time (a file still being copied), then loads."""

    def __init__(self, load):
        self.load, self.calls = load, 0

    def __call__(self):
        self.calls += 1
        if self.calls == 1:
            raise WeightsError("VACE transformer: truncated (simulated copy in progress)")
        return self.load()


def test_a_failing_run_never_corrupts_the_pipeline(vace_dir, fresh_t2v, tmp_path):
    loader = FailingOnce(lambda: load_vace_diffusers(vace_dir, device="cpu"))
    pipeline = UnisonPipeline(planner=RulePlanner(), vace=loader, options=OPTIONS, roots=[tmp_path])
    with pytest.raises(WeightsError, match="truncated"):
        pipeline.run(T2V)
    instruction, _ = pipeline.read(T2V)
    plan = pipeline.make_plan(instruction)
    image = Medium(name="a.png", kind="image", frames=np.zeros((1, 8, 8, 3), np.uint8))
    failures = [
        (PathError, lambda: pipeline.run("Make the sky in ###missing.png### purple, 32x32")),
        (PlanError, lambda: pipeline.run(T2V, plan=plan.with_changes(width=100))),
        (MediaError, lambda: pipeline.generate(
            default_plan("image_reference", [MediaRef("a.png", "video", "reference"),
                                             MediaRef("b.png", "image", "reference")], width=32, height=32),
            instruction, [image, image])),
        (UnisonError, lambda: pipeline.generate(default_plan("image_understanding", [MediaRef("a.png", "image")]),
                                                instruction, [image])),
        (SamplingCancelled, lambda: pipeline.run(T2V, cancel=lambda: True)),
    ]
    for expected, run in failures:
        with pytest.raises(expected):
            run()
    with OutOfMemoryAt(pipeline.vace.transformer, at=2), pytest.raises(OutOfMemory):
        pipeline.run(T2V)
    gc.collect()
    assert torch.equal(pipeline.run(T2V).frames, fresh_t2v)
    assert loader.calls == 2  # the failed load, then one load that every later run reused
