"""fp16 is safe for the VACE transformer: its residual stream stays in fp32 (unison_runtime/vace/fp16.py).

Checked on the CPU (fp16 matrix products run there too) with a tiny VACE transformer whose
activations are pushed past fp16's range (65504) the way a trained model's can be: large
modulation gates (``scale_shift_table``, which diffusers keeps in fp32) or a large patch
embedding. diffusers' plain fp16 load overflows to inf/NaN there; the runtime's fp16 load stays
finite and within 1e-2 (relative L2) of fp32. On ordinary activations the whole sampler in fp16
matches fp32 to the same tolerance.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from unison_runtime.plan import default_plan
from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers
from unison_runtime.vace.fp16 import MARKER, keep_residual_stream_fp32
from unison_runtime.vace.loading import load_vace_diffusers
from unison_runtime.vace.sampler import SamplingOptions, sample
from unison_runtime.vace.sources import prepare_vace_inputs
from unison_runtime.vace.text import text_contexts

FP16_MAX = torch.finfo(torch.float16).max


@pytest.fixture(scope="module")
def vace_dir(tmp_path_factory):
    return build_tiny_vace_diffusers(tmp_path_factory.mktemp("fp16") / "vace")


def amplified_copy(vace_dir, target, how: str):
    """A copy of the tiny VACE folder whose transformer's residual stream grows past fp16's range."""
    from diffusers import WanVACETransformer3DModel

    shutil.copytree(vace_dir, target)
    transformer = WanVACETransformer3DModel.from_pretrained(vace_dir / "transformer")
    with torch.no_grad():
        if how == "gates":  # gate_msa and c_gate_msa of every block: the stream grows block by block
            for block in [*transformer.blocks, *transformer.vace_blocks]:
                block.scale_shift_table[:, 2].mul_(1e6)
                block.scale_shift_table[:, 5].mul_(1e6)
        else:  # the stream starts large
            transformer.patch_embedding.weight.mul_(1e3)
            transformer.patch_embedding.bias.mul_(1e3)
    transformer.save_pretrained(target / "transformer", safe_serialization=True)
    return target


def transformer_inputs(config, dtype, scale: float):
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": (scale * torch.randn(1, config.in_channels, 2, 8, 8, generator=g)).to(dtype),
            "control_hidden_states": torch.randn(1, config.vace_in_channels, 2, 8, 8, generator=g).to(dtype),
            "encoder_hidden_states": torch.randn(1, 6, config.text_dim, generator=g).to(dtype),
            "timestep": torch.tensor([500.0]), "return_dict": False}


def largest_stream_value(transformer, inputs) -> float:
    """The largest |value| the residual stream reaches (block outputs)."""
    seen = [0.0]

    def hook(module, args, output):
        tensor = output[-1] if isinstance(output, tuple) else output
        seen[0] = max(seen[0], tensor.float().abs().max().item())

    handles = [b.register_forward_hook(hook) for b in [*transformer.blocks, *transformer.vace_blocks]]
    with torch.no_grad():
        transformer(**inputs)
    for h in handles:
        h.remove()
    return seen[0]


def relative_error(got, expected) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize(("how", "scale"), [("gates", 1.0), ("patch", 30.0)])
def test_fp16_load_stays_finite_where_the_stream_exceeds_fp16(vace_dir, tmp_path, how, scale):
    from diffusers import WanVACETransformer3DModel

    folder = amplified_copy(vace_dir, tmp_path / how, how)
    reference = load_vace_diffusers(folder, device="cpu", dtype="fp32").transformer
    config = reference.config
    assert largest_stream_value(reference, transformer_inputs(config, torch.float32, scale)) > FP16_MAX
    with torch.no_grad():
        expected = reference(**transformer_inputs(config, torch.float32, scale))[0]
    assert expected.isfinite().all()

    # diffusers' own fp16 load: the stream is cast back to fp16 after every block and overflows.
    plain = WanVACETransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float16).eval()
    with torch.no_grad():
        overflowed = plain(**transformer_inputs(config, torch.float16, scale))[0]
    assert not overflowed.isfinite().all()

    half = load_vace_diffusers(folder, device="cpu", dtype="fp16")
    assert half.dtype == torch.float16 and getattr(half.transformer, MARKER) is True
    assert half.transformer.blocks[0].attn1.to_q.weight.dtype == torch.float16  # fp16 weights: half the memory
    with torch.no_grad():
        got = half.transformer(**transformer_inputs(config, torch.float16, scale))[0]
    assert got.isfinite().all()
    assert relative_error(got, expected) < 1e-2


def test_the_stream_is_fp32_and_the_matrix_products_fp16(vace_dir):
    half = load_vace_diffusers(vace_dir, device="cpu", dtype="fp16").transformer
    dtypes: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, args, output):
            dtypes[name] = (output[-1] if isinstance(output, tuple) else output).dtype
        return hook

    for name in ("blocks.0", "vace_blocks.0", "blocks.0.attn1.to_q", "blocks.0.ffn.net.2", "patch_embedding"):
        half.get_submodule(name).register_forward_hook(record(name))
    with torch.no_grad():
        half(**transformer_inputs(half.config, torch.float16, 1.0))
    assert dtypes == {"patch_embedding": torch.float32, "vace_blocks.0": torch.float32, "blocks.0": torch.float32,
                      "blocks.0.attn1.to_q": torch.float16, "blocks.0.ffn.net.2": torch.float16}


def test_guard_is_installed_once_and_only_for_fp16(vace_dir):
    bf16 = load_vace_diffusers(vace_dir, device="cpu", dtype="bf16").transformer
    assert not getattr(bf16, MARKER, False)  # bf16 has fp32's range
    half = load_vace_diffusers(vace_dir, device="cpu", dtype="fp16").transformer
    assert keep_residual_stream_fp32(half) is False  # already in place
    hooks = sum(len(m._forward_pre_hooks) for m in half.modules())
    keep_residual_stream_fp32(half)
    assert sum(len(m._forward_pre_hooks) for m in half.modules()) == hooks


def test_single_file_fp16_load_gets_the_guard_too(tmp_path):
    from unison_runtime.testing.tiny_wan_files import build_tiny_comfy_models_dir
    from unison_runtime.vace.files import load_vace_from_files

    paths = build_tiny_comfy_models_dir(tmp_path / "models")
    models = load_vace_from_files(paths["transformer"], paths["vae"], paths["text_encoder"], device="cpu",
                                  dtype="fp16")
    assert getattr(models.transformer, MARKER) is True


def test_sampling_in_fp16_matches_fp32(vace_dir):
    plan = default_plan("text_to_video", width=32, height=32, num_frames=5)
    results = {}
    for dtype in ("fp32", "fp16"):
        models = load_vace_diffusers(vace_dir, device="cpu", dtype=dtype)
        torch.manual_seed(1)
        contexts = text_contexts(models, "a lion walking around in its habitat",
                                 torch.randn(1, 4, models.transformer.config.text_dim))
        results[dtype] = sample(models, plan, prepare_vace_inputs(plan, []), contexts.cond, contexts.neg,
                                SamplingOptions(steps=3, seed=3)).frames
    assert results["fp16"].isfinite().all()
    assert relative_error(results["fp16"], results["fp32"].float()) < 1e-2
