"""Converting loads: tensor-by-tensor reading, dtype rules equal to from_pretrained, fp8 scales, tied names.

The memory these loads save is measured by ``bench/bench_memory.py``; here we check what decides it
(a tensor that changes dtype is read as a private copy, one used as stored is a view of the file)
and that the numbers are the libraries' own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from unison_runtime.errors import WeightsError
from unison_runtime.testing import tiny_wan_files as tw
from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers
from unison_runtime.vace import loading
from unison_runtime.vace.converting_load import SafetensorsSource, dtype_rule, load_converted, needs_conversion
from unison_runtime.weights import SafetensorsFile, save_safetensors

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
              torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8) if tensor.numel() else tensor


@pytest.fixture
def every_dtype_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for dtype in ALL_DTYPES:
        values = torch.randn(3, 5, generator=generator) * 50
        state[str(dtype)] = values > 0 if dtype == torch.bool else values.to(dtype)
    state["empty"] = torch.empty(0, 4)
    return save_safetensors(state, tmp_path / "all.safetensors"), state


# --------------------------------------------------------------------------- SafetensorsFile


def test_copy_and_mapped_read_every_dtype_bit_for_bit(every_dtype_file):
    path, state = every_dtype_file
    file = SafetensorsFile(path, what="test")
    assert sorted(file.names()) == sorted(state)
    for name, expected in state.items():
        for got in (file.copy(name), file.mapped(name)):
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(_bits(got), _bits(expected)), name


def test_copy_is_private_memory(every_dtype_file):
    path, state = every_dtype_file
    file = SafetensorsFile(path)
    copy = file.copy("torch.float32")
    copy.add_(1)  # a private copy can be changed without touching the file
    assert torch.equal(file.copy("torch.float32"), state["torch.float32"])
    assert torch.equal(file.mapped("torch.float32"), state["torch.float32"])


def test_tensor_whose_byte_range_disagrees_with_its_shape_is_refused(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
    text = json.dumps(header).encode()
    raw = struct.pack("<Q", len(text)) + text + bytes(12)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(WeightsError, match=r"bad.safetensors.*'w' holds 12 bytes; its dtype and shape need 16"):
        SafetensorsFile(path, what="VACE transformer").copy("w")


def test_truncated_file_is_refused_when_opened(every_dtype_file, tmp_path):
    path, _ = every_dtype_file
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(WeightsError, match=r"cut\.safetensors: truncated or not a safetensors file"):
        SafetensorsFile(cut, what="Wan VAE")


# --------------------------------------------------------------------------- load_converted


class _CountingSource(SafetensorsSource):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str]] = []

    def as_stored(self, name):
        self.calls.append(("as_stored", name))
        return super().as_stored(name)

    def converted(self, name, dtype, scale, device):
        self.calls.append(("converted", name))
        return super().converted(name, dtype, scale, device)


def test_tensors_that_change_dtype_are_converted_and_the_rest_mapped(tmp_path):
    state = {"a.weight": torch.randn(4, 4).half(), "b.weight": torch.randn(4).float(), "ids": torch.arange(3)}
    path = save_safetensors(state, tmp_path / "m.safetensors")
    source = _CountingSource([path], what="test")
    rule = dtype_rule(torch.nn.Module, torch.float32)
    out = load_converted(source, {name: name for name in state}, rule)
    assert {name: t.dtype for name, t in out.items()} == {"a.weight": torch.float32, "b.weight": torch.float32,
                                                         "ids": torch.int64}
    assert sorted(source.calls) == [("as_stored", "b.weight"), ("as_stored", "ids"), ("converted", "a.weight")]
    assert torch.equal(out["a.weight"], state["a.weight"].float())


def test_scaled_fp8_is_dequantized_in_float32_then_cast(tmp_path):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 16, generator=generator)
    scale = weight.abs().max() / 448.0
    stored = (weight / scale).to(torch.float8_e4m3fn)
    path = save_safetensors({"lin.weight": stored, "lin.scale_weight": scale.reshape(()),
                             "lin.bias": torch.randn(8, generator=generator).half()}, tmp_path / "q.safetensors")
    source = SafetensorsSource([path], what="test")
    names = {"lin.weight": "lin.weight", "lin.bias": "lin.bias"}
    rule = dtype_rule(torch.nn.Module, torch.bfloat16)
    assert needs_conversion(source, names, rule)
    out = load_converted(source, names, rule)
    expected = (stored.to(torch.float64) * scale.double()).to(torch.bfloat16)  # independent: in float64
    assert out["lin.weight"].dtype == torch.bfloat16 and torch.equal(out["lin.weight"], expected)
    assert out["lin.bias"].dtype == torch.bfloat16


def test_two_model_names_for_one_stored_tensor_share_it(tmp_path):
    path = save_safetensors({"emb": torch.randn(10, 4).half()}, tmp_path / "t.safetensors")
    out = load_converted(SafetensorsSource([path], what="t"), {"shared.weight": "emb", "encoder.embed.weight": "emb"},
                         dtype_rule(torch.nn.Module, torch.float32))
    assert out["shared.weight"] is out["encoder.embed.weight"]


def test_missing_stored_tensor_is_named(tmp_path):
    path = save_safetensors({"a": torch.zeros(2)}, tmp_path / "t.safetensors")
    with pytest.raises(WeightsError, match="tensor 'b' is missing"):
        load_converted(SafetensorsSource([path], what="t"), {"x": "b"}, dtype_rule(torch.nn.Module, torch.float32))


def test_dtype_rules_follow_each_library():
    from diffusers import WanVACETransformer3DModel
    from transformers import UMT5EncoderModel

    diffusers_bf16 = dtype_rule(WanVACETransformer3DModel, torch.bfloat16)
    assert diffusers_bf16("blocks.0.scale_shift_table", torch.float32) == torch.float32  # kept for any dtype
    assert diffusers_bf16("blocks.0.attn1.to_q.weight", torch.float32) == torch.bfloat16
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert dtype_rule(UMT5EncoderModel, torch.float16)(wo, torch.float32) == torch.float32  # fp16 only
    assert dtype_rule(UMT5EncoderModel, torch.bfloat16)(wo, torch.float32) == torch.bfloat16


# --------------------------------------------------------------------------- diffusers / transformers folders


@pytest.fixture(scope="module")
def vace_dir(tmp_path_factory) -> Path:
    return build_tiny_vace_diffusers(tmp_path_factory.mktemp("vace") / "Wan2.1-VACE-1.3B-diffusers", seed=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_converting_folder_loads_equal_from_pretrained(vace_dir, dtype):
    from diffusers import AutoencoderKLWan, WanVACETransformer3DModel
    from transformers import UMT5EncoderModel

    pairs = [
        (loading.load_transformer(vace_dir / "transformer", dtype=dtype, device="cpu"),
         WanVACETransformer3DModel.from_pretrained(vace_dir / "transformer", torch_dtype=dtype)),
        (loading.load_vae(vace_dir / "vae", dtype=dtype, device="cpu"),
         AutoencoderKLWan.from_pretrained(vace_dir / "vae", torch_dtype=dtype)),
        (loading.load_text_encoder(vace_dir / "text_encoder", dtype=dtype, device="cpu"),
         UMT5EncoderModel.from_pretrained(vace_dir / "text_encoder", dtype=dtype)),
    ]
    for got, reference in pairs:
        assert type(got) is type(reference) and not got.training
        want = {n: t.dtype for n, t in [*reference.named_parameters(), *reference.named_buffers()]}
        assert {n: t.dtype for n, t in [*got.named_parameters(), *got.named_buffers()]} == want
        ref_state, got_state = reference.state_dict(), got.state_dict()
        assert ref_state.keys() == got_state.keys()
        assert all(torch.equal(got_state[k], ref_state[k]) for k in ref_state), type(got).__name__


def test_umt5_folder_with_a_decoder_loads_the_encoder_only(tmp_path):
    # google/umt5-xxl holds the whole encoder-decoder; the encoder takes its own tensors.
    from transformers import UMT5ForConditionalGeneration

    encoder, _, _ = tw.build_tiny_umt5(seed=4)
    full = UMT5ForConditionalGeneration(encoder.config).eval()
    full.encoder.load_state_dict(encoder.encoder.state_dict())
    full.shared.weight.data.copy_(encoder.shared.weight)
    full.save_pretrained(tmp_path / "umt5-xxl")
    got = loading.load_text_encoder(tmp_path / "umt5-xxl", dtype=torch.bfloat16, device="cpu")
    assert not any(name.startswith("decoder") for name in got.state_dict())
    assert torch.equal(got.shared.weight, encoder.shared.weight.to(torch.bfloat16))
    block = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    assert torch.equal(got.state_dict()[block], encoder.state_dict()[block].to(torch.bfloat16))


def test_copy_rows_reads_exactly_those_rows(tmp_path):
    generator = torch.Generator().manual_seed(5)
    state = {"m": torch.randn(7, 3, 2, generator=generator), "v": torch.randn(9, generator=generator).half(),
             "s": torch.tensor(2.5)}
    file = SafetensorsFile(save_safetensors(state, tmp_path / "r.safetensors"), what="test")
    assert torch.equal(file.copy_rows("m", 2, 5), state["m"][2:5])
    assert torch.equal(file.copy_rows("v", 8, 9), state["v"][8:9])
    assert file.copy_rows("m", 3, 3).shape == (0, 3, 2)
    assert torch.equal(file.copy_rows("s", 0, 1), state["s"])  # a 0-d tensor is one row
    with pytest.raises(WeightsError, match=r"rows 5:8 of tensor 'm' \(it has 7\)"):
        file.copy_rows("m", 5, 8)


@pytest.mark.parametrize("per_row_scale", [False, True])
def test_large_tensors_are_converted_in_bounded_pieces(tmp_path, monkeypatch, per_row_scale):
    from unison_runtime.vace import converting_load

    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(37, 24, generator=generator)
    scale = (weight.abs().amax(dim=1, keepdim=True) if per_row_scale else weight.abs().max()) / 448.0
    stored = (weight / scale).to(torch.float8_e4m3fn)
    path = save_safetensors({"w.weight": stored, "w.scale_weight": scale}, tmp_path / "p.safetensors")
    monkeypatch.setattr(converting_load, "CONVERT_PIECE_BYTES", 5 * 24 * 4)  # 5 rows of float32 work per piece
    pieces: list[int] = []
    original = SafetensorsFile.copy_rows

    def spy(self, name, start, stop, **options):
        pieces.append(stop - start)
        return original(self, name, start, stop, **options)

    monkeypatch.setattr(SafetensorsFile, "copy_rows", spy)
    out = load_converted(SafetensorsSource([path], what="t"), {"w.weight": "w.weight"},
                         dtype_rule(torch.nn.Module, torch.bfloat16))["w.weight"]
    assert pieces == [5, 5, 5, 5, 5, 5, 5, 2]  # never more than the bound at once
    expected = (stored.to(torch.float64) * scale.double()).to(torch.bfloat16)  # independent, whole, float64
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_staging_buffers_are_reused_across_tensors_of_any_size(tmp_path):
    generator = torch.Generator().manual_seed(8)
    state, scales = {}, {}
    for name, rows in (("big", 40), ("small", 3), ("mid", 17)):
        weight = torch.randn(rows, 8, generator=generator)
        scales[name] = weight.abs().max() / 448.0
        state[f"{name}.weight"] = (weight / scales[name]).to(torch.float8_e4m3fn)
        state[f"{name}.scale_weight"] = scales[name]
    state["plain.weight"] = torch.randn(5, 8, generator=generator).half()
    source = SafetensorsSource([save_safetensors(state, tmp_path / "s.safetensors")], what="t")
    names = {name: name for name in ("big.weight", "small.weight", "mid.weight", "plain.weight")}
    out = load_converted(source, names, dtype_rule(torch.nn.Module, torch.float32))
    for name in ("big", "small", "mid"):
        expected = (state[f"{name}.weight"].double() * scales[name].double()).float()
        assert torch.equal(out[f"{name}.weight"], expected), name
    assert torch.equal(out["plain.weight"], state["plain.weight"].float())
