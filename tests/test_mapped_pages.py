"""Weights mapped from their files give their RAM back once a stage is done with them, and stay exact.

Residency is read from this process's page tables (``/proc/self/pagemap``), so the assertions are
about the pages this process holds, not an estimate. Linux only, as the feature.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import sys

import pytest
import torch
from safetensors.torch import save_file

from unison_runtime import mapped_pages
from unison_runtime.plan import default_plan
from unison_runtime.testing.tiny_wan_files import build_tiny_comfy_models_dir
from unison_runtime.vace import sampler
from unison_runtime.vace.files import load_vace_from_files
from unison_runtime.vace.sources import VaceInputs
from unison_runtime.vace.stored_precision import cast_buffers
from unison_runtime.vace.text import release_encoder_pages, text_contexts
from unison_runtime.weights import SafetensorsFile

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page residency is read from /proc")
PAGE = mmap.PAGESIZE


@pytest.fixture
def weights_file(tmp_path):
    """A safetensors file (8 MiB fp16 + 1 MiB fp32), opened as the loaders open one: tensors mapped from it."""
    path = tmp_path / "weights.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file({"big": torch.randn(4096, 1024, generator=generator).half(),
               "small": torch.randn(256, 1024, generator=generator)}, str(path))
    return SafetensorsFile(path, what="test weights")


def test_mapped_weights_are_given_back_and_read_again_unchanged(weights_file) -> None:
    big = weights_file.mapped("big")
    expected = weights_file.copy("big")  # read into private memory, independently of the mapping
    assert mapped_pages.mapped_bytes([big]) >= big.nbytes and mapped_pages.private_bytes([big]) == 0
    assert torch.equal(big, expected)  # touches every page
    assert mapped_pages.resident_mapped_bytes([big]) >= big.nbytes
    released = mapped_pages.release_file_pages([big])
    assert released >= big.nbytes
    assert mapped_pages.resident_mapped_bytes([big]) == 0
    assert torch.equal(big, expected)  # read back from the file: the same values
    assert mapped_pages.resident_mapped_bytes([big]) >= big.nbytes
    assert mapped_pages.release_file_pages([big]) >= big.nbytes  # and again: nothing is used up


def test_only_the_given_tensors_pages_are_released(weights_file) -> None:
    big, small = weights_file.mapped("big"), weights_file.mapped("small")
    float(big.float().sum() + small.sum())
    mapped_pages.release_file_pages([big])
    assert mapped_pages.resident_mapped_bytes([big]) <= PAGE  # at most a page shared with the neighbour
    assert mapped_pages.resident_mapped_bytes([small]) >= small.nbytes - PAGE


def test_a_written_page_of_a_private_mapping_survives(weights_file) -> None:
    small = weights_file.mapped("small")
    expected = weights_file.copy("small")
    expected[0, 0] = small[0, 0] = 123.0  # copy on write: this page now exists only in this process
    float(small.sum())
    released = mapped_pages.release_file_pages([small])
    assert released >= small.nbytes - 2 * PAGE  # the clean pages went
    assert mapped_pages.resident_mapped_bytes([small]) == PAGE  # the written one stayed
    assert torch.equal(small, expected)


def test_private_memory_is_never_advised(weights_file) -> None:
    private = torch.randn(512, 1024)
    expected = private.clone()
    big = weights_file.mapped("big")
    assert mapped_pages.mapped_bytes([private]) == 0
    assert mapped_pages.private_bytes([private, big]) == private.nbytes
    assert mapped_pages.release_file_pages([private]) == 0
    assert torch.equal(private, expected)


def test_tensors_of_counts_a_shared_weight_once() -> None:
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    second.weight = first.weight
    tensors = mapped_pages.tensors_of(first, second, None, object())  # not a module: nothing to see
    assert len(tensors) == 3 and sum(t is first.weight for t in tensors) == 1


def test_nothing_is_done_off_linux(weights_file, monkeypatch) -> None:
    big = weights_file.mapped("big")
    float(big.float().sum())
    monkeypatch.setattr(mapped_pages.sys, "platform", "darwin")
    assert mapped_pages.file_mappings() == [] and mapped_pages.release_file_pages([big]) == 0
    monkeypatch.undo()
    assert mapped_pages.resident_mapped_bytes([big]) >= big.nbytes


def test_give_back_says_what_and_how_much(weights_file, caplog, monkeypatch) -> None:
    module = torch.nn.Module()
    module.register_buffer("weight", weights_file.mapped("big"))
    float(module.weight.float().sum())
    with caplog.at_level(logging.DEBUG, logger="unison"):
        released = mapped_pages.give_back("test model", module, after="after the test")
    assert released >= module.weight.nbytes
    assert f"test model: {released / 2**30:.2f} GiB of weights mapped from the file given back to the OS after " \
           "the test" in caplog.text
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]  # 8 MiB: below LOG_FROM, not shown by default
    float(module.weight.float().sum())
    caplog.clear()
    monkeypatch.setattr(mapped_pages, "LOG_FROM", 1)
    with caplog.at_level(logging.DEBUG, logger="unison"):
        mapped_pages.give_back("test model", module, after="after the test")
    assert [r.levelno for r in caplog.records] == [logging.INFO]


# --------------------------------------------------------------------------- the models


@pytest.fixture(scope="module")
def comfy_files(tmp_path_factory):
    return build_tiny_comfy_models_dir(tmp_path_factory.mktemp("comfy-files"))


@pytest.fixture
def cpu_models(comfy_files):
    """Tiny VACE from Comfy-Org-format files on the CPU: fp16 transformer and scaled-fp8 umT5 kept mapped."""
    return load_vace_from_files(comfy_files["transformer"], comfy_files["vae"], comfy_files["text_encoder"],
                                device="cpu")


def umt5_resident(models) -> int:
    return mapped_pages.resident_mapped_bytes(mapped_pages.tensors_of(models.text_encoder))


def test_umt5_pages_are_given_back_after_encoding_and_encode_again_the_same(cpu_models) -> None:
    stored = mapped_pages.mapped_bytes(mapped_pages.tensors_of(cpu_models.text_encoder))
    assert stored > 0  # the fp8 matrices are views of the file
    first = text_contexts(cpu_models, "a lighthouse at dusk")
    casts = cast_buffers(cpu_models.text_encoder)
    assert umt5_resident(cpu_models) > 0 and casts.held_bytes() > 0
    assert release_encoder_pages(cpu_models) > 0
    assert umt5_resident(cpu_models) == 0 and casts.held_bytes() == 0  # the reused casts went too
    again = text_contexts(cpu_models, "a lighthouse at dusk")
    assert torch.equal(first.cond, again.cond) and torch.equal(first.neg, again.neg)


def test_umt5_on_another_device_is_left_alone(cpu_models) -> None:
    text_contexts(cpu_models, "a lighthouse")
    resident = umt5_resident(cpu_models)
    assert release_encoder_pages(dataclasses.replace(cpu_models, text_device="cuda")) == 0
    assert release_encoder_pages(dataclasses.replace(cpu_models, text_encoder=None)) == 0
    assert umt5_resident(cpu_models) == resident > 0


def test_transformer_pages_are_given_back_while_the_vae_works_with_the_same_frames(cpu_models, monkeypatch) -> None:
    plan = default_plan("text_to_image", width=32, height=32)
    inputs = VaceInputs(frames=torch.full((1, 32, 32, 3), 0.5), masks=torch.ones(1, 32, 32),
                        references=torch.zeros(0, 32, 32, 3))
    contexts = text_contexts(cpu_models, "a lighthouse")
    options = sampler.SamplingOptions(steps=2, guidance=3.0, seed=5)
    transformer = mapped_pages.tensors_of(cpu_models.transformer)
    assert mapped_pages.mapped_bytes(transformer) > 0
    seen: list[tuple[str, int]] = []

    def recording(name):
        original = getattr(sampler, name)

        def call(*args, **kwargs):
            seen.append((name, mapped_pages.resident_mapped_bytes(transformer)))
            if seen[-1][1] == 0:
                assert cast_buffers(cpu_models.transformer).held_bytes() == 0  # given back with the pages
            return original(*args, **kwargs)

        monkeypatch.setattr(sampler, name, call)

    recording("prepare_latents")
    recording("decode")
    float(sum(t.float().sum() for t in transformer))  # resident, as after an earlier run
    generation = sampler.sample(cpu_models, plan, inputs, contexts.cond, contexts.neg, options)
    assert seen == [("prepare_latents", 0), ("decode", 0)]  # the VAE works while the pages are given back
    monkeypatch.setattr(mapped_pages, "give_back", lambda *args, **kwargs: 0)  # the same run, pages kept
    kept = sampler.sample(cpu_models, plan, inputs, contexts.cond, contexts.neg, options)
    assert seen[3][1] > 0  # kept resident through the run this time
    assert torch.equal(generation.frames, kept.frames)


def test_a_pipeline_keeping_its_models_gives_umt5_pages_back_after_encoding(cpu_models) -> None:
    from unison_runtime.pipeline import UnisonPipeline

    pipeline = UnisonPipeline(vace=cpu_models)
    plan = default_plan("text_to_image", width=32, height=32)
    first = pipeline.contexts(dataclasses.replace(plan, prompt="a lighthouse at dusk"))
    assert umt5_resident(cpu_models) == 0 and pipeline.vace is cpu_models  # still loaded, pages given back
    again = pipeline.contexts(dataclasses.replace(plan, prompt="a lighthouse at dusk"))
    assert torch.equal(first.cond, again.cond) and torch.equal(first.neg, again.neg)
