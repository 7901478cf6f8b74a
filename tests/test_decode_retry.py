"""A decode that runs out of memory is retried in tiles, after freeing what decoding does not need; the finished
latents are never lost to it (runtime side, no ComfyUI needed; the node path is in test_comfy_memory.py)."""

from __future__ import annotations

import pytest
import torch

from unison_runtime.errors import OutOfMemory
from unison_runtime.plan import default_plan
from unison_runtime.testing.tiny_wan import TINY_VACE, build_tiny_vace_diffusers
from unison_runtime.vace import sampler
from unison_runtime.vace.loading import load_vace_diffusers
from unison_runtime.vace.sources import VaceInputs
from unison_runtime.vace.text import text_contexts

OOM = "CUDA out of memory. Tried to allocate 8.00 GiB (simulated)"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return load_vace_diffusers(build_tiny_vace_diffusers(tmp_path_factory.mktemp("vace") / "vace"), device="cpu")


def latents(height: int, width: int, frames: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, TINY_VACE.z_dim, frames, height, width, generator=generator)


def failing(monkeypatch, vae, failures: int, error: str = OOM) -> list[tuple[bool, int]]:
    """Make the first ``failures`` decodes raise ``error``; returns (tiling on, tile height) per call."""
    decode = type(vae).decode
    calls: list[tuple[bool, int]] = []

    def patched(self, *args, **kwargs):
        calls.append((self.use_tiling, self.tile_sample_min_height))
        if len(calls) <= failures:
            raise torch.OutOfMemoryError(error) if "memory" in error else RuntimeError(error)
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(type(vae), "decode", patched)
    return calls


def test_out_of_memory_frees_then_decodes_the_same_latents_tiled(models, monkeypatch) -> None:
    z = latents(4, 4)
    expected = sampler.decode(models, z, 0)
    freed, notes = [], []
    calls = failing(monkeypatch, models.vae, 1)
    frames = sampler.decode(models, z, 0, free_memory=lambda: freed.append(True), notes=notes)
    assert calls == [(False, 256), (True, 256)]
    assert freed == [True]  # what decoding does not need was let go before the retry
    torch.testing.assert_close(frames, expected)  # smaller than one tile: the same pixels
    assert notes == ["decoding ran out of memory; decoded again in 256x256 tiles (same latents)"]
    assert models.vae.use_tiling is False and models.vae.tile_sample_min_height == 256  # settings restored


def test_second_failure_goes_to_smaller_tiles_that_really_tile(models, monkeypatch) -> None:
    spatial = sampler.vae_scales(models)[1]
    z = latents(160 // spatial, 160 // spatial)  # 160 px: one 256 tile, several 128 tiles
    tiled = []
    original = type(models.vae).tiled_decode
    monkeypatch.setattr(type(models.vae), "tiled_decode", lambda self, *a, **k: tiled.append(1) or original(
        self, *a, **k))
    calls = failing(monkeypatch, models.vae, 2)
    frames = sampler.decode(models, z, 0)
    assert calls == [(False, 256), (True, 256), (True, 128)] and tiled == [1]
    assert frames.shape == (5, 160, 160, 3) and torch.isfinite(frames).all()


def test_other_errors_are_not_retried(models, monkeypatch) -> None:
    calls = failing(monkeypatch, models.vae, 1, error="Expected all tensors to be on the same device")
    with pytest.raises(RuntimeError, match="same device"):
        sampler.decode(models, latents(4, 4), 0, free_memory=lambda: pytest.fail("nothing to free"))
    assert len(calls) == 1


def test_sample_keeps_the_latents_through_the_retry(models, monkeypatch) -> None:
    plan = default_plan("text_to_image", width=32, height=32)
    inputs = VaceInputs(frames=torch.full((1, 32, 32, 3), 0.5), masks=torch.ones(1, 32, 32),
                        references=torch.zeros(0, 32, 32, 3))
    contexts = text_contexts(models, "a lighthouse")
    options = sampler.SamplingOptions(steps=2, guidance=1.0, seed=5)
    expected = sampler.sample(models, plan, inputs, contexts.cond, None, options).frames
    failing(monkeypatch, models.vae, 1)
    steps, freed = [], []
    generation = sampler.sample(models, plan, inputs, contexts.cond, None, options,
                                progress=lambda i, n: steps.append(i), free_for_decode=lambda: freed.append(True))
    assert steps == [1, 2] and freed == [True]  # denoised once; the decode alone was repeated
    torch.testing.assert_close(generation.frames, expected)
    assert any("decoded again in 256x256 tiles" in note for note in generation.notes)


def test_when_every_tiling_fails_the_error_names_the_decode(models, monkeypatch) -> None:
    plan = default_plan("text_to_image", width=32, height=32)
    inputs = VaceInputs(frames=torch.full((1, 32, 32, 3), 0.5), masks=torch.ones(1, 32, 32),
                        references=torch.zeros(0, 32, 32, 3))
    contexts = text_contexts(models, "a lighthouse")
    calls = failing(monkeypatch, models.vae, 99)
    with pytest.raises(OutOfMemory) as caught:
        sampler.sample(models, plan, inputs, contexts.cond, None, sampler.SamplingOptions(steps=1, guidance=1.0))
    assert caught.value.stage == "decoding with the VAE" and len(calls) == 1 + len(sampler.DECODE_TILES)
