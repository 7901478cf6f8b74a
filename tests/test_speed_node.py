"""The Unison Speed node and the VACE Sampler's ``speed`` input (issue 19), under ComfyUI's stand-in modules."""

from __future__ import annotations

import pytest
import torch
from harness.comfy_env import InterruptProcessingException
from harness.fixtures import TEXT_ENCODER_NAME, TRANSFORMER_NAME, VAE_NAME, comfy, install_models, tiny_models  # noqa: F401

from nodes.generation import UnisonVaceSampler
from nodes.loaders import UnisonVaceLoader
from nodes.planning import UnisonPlanner, UnisonTaskRouter
from nodes.speed import PRESET, UnisonSpeed
from unison_runtime.errors import UnisonError


@pytest.fixture
def models(comfy, tiny_models):  # noqa: F811
    install_models(comfy, tiny_models)
    return comfy


def _plan():
    packet = UnisonPlanner().run("A watercolor painting of a harbor.")["result"][0]
    return UnisonTaskRouter().route(packet, "auto", 32, 32, 0, "auto", 0)["result"][0]


def _sample(vace, packet, speed=None, steps=3):
    out = UnisonVaceSampler().sample(vace, packet, 0, steps, 5.0, 5.0, "blurry", speed=speed)
    return out["result"][0], out["ui"]["text"][0]


def test_speed_node_settings() -> None:
    node = UnisonSpeed()
    assert node.settings("none") == ({"cache": "none", "compile": False, "text_kv_cache": True},)
    assert node.settings("magcache", PRESET, True, False) == (
        {"cache": "magcache", "compile": True, "text_kv_cache": False},)  # preset: no threshold given
    assert node.settings("first_block", 0.1) == (
        {"cache": "first_block", "compile": False, "text_kv_cache": True, "cache_threshold": 0.1},)
    with pytest.raises(UnisonError, match=r"for pab it is spatial_attention_block_skip_range.*an integer >= 1"):
        node.settings("pab", 0.5)
    assert "fastercache" not in UnisonSpeed.INPUT_TYPES()["required"]["cache"][0]


def test_sampler_with_a_cache_that_never_skips_gives_the_same_frames_and_says_so(models) -> None:
    vace = UnisonVaceLoader().load(TRANSFORMER_NAME, VAE_NAME, TEXT_ENCODER_NAME, "auto", "auto")[0]
    packet = _plan()
    plain, _ = _sample(vace, packet)
    speed = UnisonSpeed().settings("first_block", 0.0)[0]
    cached, shown = _sample(vace, packet, speed)
    assert torch.equal(plain, cached)
    # batched guidance (chosen from the free memory): one transformer call per step
    assert "cache first_block (threshold 0): the blocks ran in 3 of 3 transformer calls" in shown
    assert models.progress[-3:] == [(1, 3), (2, 3), (3, 3)]  # progress still ticks every step


def test_interrupt_with_a_cache_on_leaves_the_transformer_clean(models) -> None:
    vace = UnisonVaceLoader().load(TRANSFORMER_NAME, VAE_NAME, TEXT_ENCODER_NAME, "auto", "auto")[0]
    packet = _plan()
    speed = UnisonSpeed().settings("magcache")[0]
    models.interrupt_after_checks = 3
    with pytest.raises(InterruptProcessingException):
        _sample(vace, packet, speed)
    transformer = vace.models.transformer
    assert not transformer.is_cache_enabled
    assert [n for n, m in transformer.named_modules() if "forward" in m.__dict__] == []
    frames, _ = _sample(vace, packet, speed)
    assert frames.shape == (1, 32, 32, 3)
