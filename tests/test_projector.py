"""Projector parity with the reference math, loading/conversion, and context assembly."""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from unison_runtime.__main__ import main
from unison_runtime.errors import WeightsError
from unison_runtime.projector import (
    PROJECTOR_KEYS,
    REFERENCE_CONTEXT_LENGTH,
    ConditioningError,
    ProjectorDims,
    UnisonProjector,
    append_to_conditioning,
    build_context,
    convert_projector,
    load_projector,
    project,
)
from unison_runtime.testing.tiny_projector import build_tiny_projector, tiny_projector_state_dict
from unison_runtime.weights import load_state_dict, read_safetensors_header

# --------------------------------------------------------------------------- reference math


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm written out: biased variance, eps 1e-5 (torch's default, which ProjMLP uses)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, nn.GELU's default."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_projection(sd: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """DESIGN section 7, computed independently of the module from the raw state-dict tensors."""
    x = _layer_norm(hidden, sd["ln_in.weight"], sd["ln_in.bias"])
    x = x @ sd["net.0.weight"].T + sd["net.0.bias"]
    x = _gelu(x)  # dropout is the identity at inference
    x = x @ sd["net.3.weight"].T + sd["net.3.bias"]
    x = _layer_norm(x, sd["ln_out.weight"], sd["ln_out.bias"])
    batch, length, dim = x.shape
    target = sd["seq_adjust.weight"].shape[1]
    if length < target:
        x = torch.cat([x, torch.zeros(batch, target - length, dim, dtype=x.dtype)], dim=1)
    else:
        x = x[:, :target]
    # Output token t, channel d = sum over positions s of W[t, s] * x[s, d] + b[t].
    return torch.einsum("ts,bsd->btd", sd["seq_adjust.weight"], x) + sd["seq_adjust.bias"][None, :, None]


def _hidden(batch: int, length: int, dim: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_pth(tmp_path) -> Path:
    return build_tiny_projector(tmp_path / "projector.pth")


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("length", [1, 13, 55, 56, 57, 90])
def test_parity_with_reference_math_float64(tiny_pth, length):
    projector = load_projector(tiny_pth, dtype=torch.float64)
    sd = {key: value.double() for key, value in tiny_projector_state_dict().items()}
    hidden = _hidden(2, length).double()
    expected = reference_projection(sd, hidden)
    got = project(projector, hidden)
    assert got.shape == (2, 4, 64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("length", [20, 56, 70])
def test_parity_with_reference_math_float32(tiny_pth, length):
    projector = load_projector(tiny_pth)
    assert next(projector.parameters()).dtype == torch.float32
    hidden = _hidden(1, length)
    torch.testing.assert_close(project(projector, hidden), reference_projection(tiny_projector_state_dict(), hidden))


def test_padding_is_zeros_after_the_sequence_and_truncation_keeps_the_first_positions(tiny_pth):
    projector = load_projector(tiny_pth, dtype=torch.float64)
    sd = {key: value.double() for key, value in tiny_projector_state_dict().items()}
    hidden = _hidden(1, 80).double()
    # Everything past position 56 is dropped: changing it changes nothing.
    changed = hidden.clone()
    changed[:, 56:] = torch.randn(1, 24, 64, dtype=torch.float64)
    torch.testing.assert_close(project(projector, changed), project(projector, hidden), rtol=0, atol=0)
    # A short sequence is padded with zeros *after* the MLP and LayerNorm: the padded positions
    # contribute nothing, so the output is seq_adjust applied to the real positions only.
    short = hidden[:, :10]
    x = _layer_norm(short, sd["ln_in.weight"], sd["ln_in.bias"])
    x = _gelu(x @ sd["net.0.weight"].T + sd["net.0.bias"]) @ sd["net.3.weight"].T + sd["net.3.bias"]
    x = _layer_norm(x, sd["ln_out.weight"], sd["ln_out.bias"])
    manual = torch.einsum("ts,bsd->btd", sd["seq_adjust.weight"][:, :10], x) + sd["seq_adjust.bias"][None, :, None]
    torch.testing.assert_close(project(projector, short), manual, rtol=0, atol=1e-12)


def test_unbatched_hidden_states_and_dtype_cast(tiny_pth):
    projector = load_projector(tiny_pth)
    hidden = _hidden(1, 30)
    out = project(projector, hidden[0].double())  # [L, D] in float64 is moved to the projector's dtype
    assert out.shape == (1, 4, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, project(projector, hidden))


def test_module_layout_matches_reference(tiny_pth):
    projector = load_projector(tiny_pth)
    assert sorted(projector.state_dict()) == sorted(PROJECTOR_KEYS)
    assert isinstance(projector.net[1], torch.nn.GELU) and projector.net[1].approximate == "none"
    assert isinstance(projector.net[2], torch.nn.Dropout) and projector.net[2].p == pytest.approx(0.1)
    assert not projector.training
    assert not any(p.requires_grad for p in projector.parameters())
    assert projector.source == str(tiny_pth)


def test_wrong_input_size_is_refused(tiny_pth):
    projector = load_projector(tiny_pth)
    with pytest.raises(ConditioningError, match=r"expected \[batch, tokens >= 1, 64\]"):
        project(projector, torch.zeros(1, 5, 48))
    with pytest.raises(ConditioningError, match="tokens >= 1"):
        project(projector, torch.zeros(1, 0, 64))


# --------------------------------------------------------------------------- dimensions


def _meta_state_dict(input_dim: int, hidden: int, t5: int, seq: int = 56, tokens: int = 4) -> dict:
    shapes = {
        "ln_in.weight": (input_dim,),
        "ln_in.bias": (input_dim,),
        "net.0.weight": (hidden, input_dim),
        "net.0.bias": (hidden,),
        "net.3.weight": (t5, hidden),
        "net.3.bias": (t5,),
        "ln_out.weight": (t5,),
        "ln_out.bias": (t5,),
        "seq_adjust.weight": (tokens, seq),
        "seq_adjust.bias": (tokens,),
    }
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


@pytest.mark.parametrize(
    ("input_dim", "hidden", "t5", "seq", "tokens"),
    [(2048, 2048, 4096, 56, 4), (3584, 2048, 4096, 56, 4), (1536, 1024, 4096, 32, 8)],
)
def test_dimensions_are_read_from_weights(input_dim, hidden, t5, seq, tokens):
    """The released 3B sizes and other stage-one sizes, checked on meta tensors (no memory)."""
    projector = UnisonProjector.from_state_dict(_meta_state_dict(input_dim, hidden, t5, seq, tokens))
    assert projector.dims == ProjectorDims(input_dim, hidden, t5, seq, tokens)
    assert projector.net[0].in_features == input_dim and projector.net[3].out_features == t5
    out = projector(torch.empty(2, 70, input_dim, device="meta"))
    assert out.shape == (2, tokens, t5)


@pytest.mark.parametrize("sizes", [(32, 16, 48, 56, 4), (64, 32, 64, 12, 2)])
def test_tiny_builder_sizes_round_trip(tmp_path, sizes):
    input_dim, hidden, t5, seq, tokens = sizes
    path = build_tiny_projector(tmp_path / "p.pth", input_dim, hidden, t5, seq, tokens, seed=5)
    projector = load_projector(path)
    assert projector.dims == ProjectorDims(input_dim, hidden, t5, seq, tokens)
    sd = load_state_dict(path, what="projector")
    hidden_states = _hidden(1, seq + 3, input_dim)
    torch.testing.assert_close(project(projector, hidden_states), reference_projection(sd, hidden_states))


# --------------------------------------------------------------------------- loading errors


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = tiny_projector_state_dict()
    del sd["seq_adjust.bias"]
    sd["extra.weight"] = torch.zeros(2)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as info:
        load_projector(path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys ['seq_adjust.bias']" in message
    assert "unexpected keys ['extra.weight']" in message


def test_inconsistent_shapes_are_named(tmp_path):
    sd = tiny_projector_state_dict()
    sd["net.3.bias"] = torch.zeros(63)
    path = tmp_path / "shapes.safetensors"
    from unison_runtime.weights import save_safetensors

    save_safetensors(sd, path)
    with pytest.raises(WeightsError, match=r"net\.3\.bias is \(63,\), expected \(64,\)") as info:
        load_projector(path)
    assert str(path) in str(info.value)


def test_a_different_model_is_not_taken_for_a_projector(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(4, 4).state_dict(), path)
    with pytest.raises(WeightsError, match="not a Unison projector"):
        load_projector(path)


def test_malicious_projector_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    sd: dict = dict(tiny_projector_state_dict())
    sd["ln_in.weight"] = Payload()
    path = tmp_path / "projector.pth"
    with open(path, "wb") as handle:
        pickle.dump(sd, handle, protocol=2)
    with pytest.raises(WeightsError, match="not a plain state dict"):
        load_projector(path)
    with pytest.raises(WeightsError, match="not a plain state dict"):
        convert_projector(path, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_truncated_projector_names_file(tmp_path):
    path = build_tiny_projector(tmp_path / "p.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated or not a safetensors file") as info:
        load_projector(path)
    assert str(path) in str(info.value) and "projector" in str(info.value)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("prefix", ["", "module."])
def test_round_trip_pth_to_safetensors(tmp_path, prefix):
    source = build_tiny_projector(tmp_path / "projector.pth", prefix=prefix, seed=7)
    assert all(key.startswith(prefix) for key in torch.load(source, weights_only=True))
    first = load_projector(source)
    target = convert_projector(source, tmp_path / "out" / "projector.safetensors")
    assert target == tmp_path / "out" / "projector.safetensors"
    header = read_safetensors_header(target)
    assert sorted(k for k in header if k != "__metadata__") == sorted(PROJECTOR_KEYS)  # no "module."
    assert header["__metadata__"]["unison_kind"] == "projector"
    second = load_projector(target)
    assert second.dims == first.dims
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    hidden = _hidden(2, 40)
    assert torch.equal(project(first, hidden), project(second, hidden))


def test_convert_refuses_non_safetensors_target_and_same_file(tmp_path, tiny_pth):
    with pytest.raises(WeightsError, match=r"expected a path ending in \.safetensors"):
        convert_projector(tiny_pth, tmp_path / "out.pth")
    st = build_tiny_projector(tmp_path / "p.safetensors")
    with pytest.raises(WeightsError, match="same file"):
        convert_projector(st, st)


def test_load_projector_dtype_and_device(tiny_pth):
    half = load_projector(tiny_pth, device="cpu", dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    out = project(half, _hidden(1, 8))
    assert out.dtype == torch.bfloat16
    full = project(load_projector(tiny_pth), _hidden(1, 8))
    torch.testing.assert_close(out.float(), full, rtol=0.05, atol=0.05)
    with pytest.raises(WeightsError, match="projector dtype 'fp8'"):
        load_projector(tiny_pth, dtype="fp8")


def test_cli_convert_projector_end_to_end(tmp_path, capsys):
    source = build_tiny_projector(tmp_path / "projector.pth", prefix="module.", seed=11)
    target = tmp_path / "projector.safetensors"
    out = io.StringIO()
    assert main(["convert-projector", str(source), str(target)], out=out) == 0
    assert out.getvalue().strip() == f"wrote {target}"
    hidden = _hidden(1, 60)
    assert torch.equal(project(load_projector(target), hidden), project(load_projector(source), hidden))
    # A refusal is one clear line on stderr and exit code 2, not a traceback.
    assert main(["convert-projector", str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pth" in err and "file not found" in err


# --------------------------------------------------------------------------- build_context


def test_build_context_order_and_padding():
    text = torch.randn(2, 7, 16)
    tokens = torch.randn(2, 4, 16)
    context = build_context(text, tokens, total_length=20)
    assert context.shape == (2, 20, 16)
    assert torch.equal(context[:, :7], text)
    assert torch.equal(context[:, 7:11], tokens)
    assert torch.count_nonzero(context[:, 11:]) == 0
    unpadded = build_context(text, tokens)
    assert unpadded.shape == (2, 11, 16) and torch.equal(unpadded, context[:, :11])


def test_build_context_broadcasts_and_casts_tokens():
    text = torch.randn(3, 5, 8, dtype=torch.float64)
    tokens = torch.randn(4, 8)  # [N, D], float32
    context = build_context(text, tokens, total_length=REFERENCE_CONTEXT_LENGTH)
    assert context.shape == (3, REFERENCE_CONTEXT_LENGTH, 8) and context.dtype == torch.float64
    for b in range(3):
        assert torch.equal(context[b, 5:9], tokens.double())


def test_build_context_negative_branch_untouched():
    text = torch.randn(1, 9, 8)
    original = text.clone()
    assert torch.equal(build_context(text, None), original)
    padded = build_context(text, None, total_length=12)
    assert padded.shape == (1, 12, 8)
    assert torch.equal(padded[:, :9], original) and torch.count_nonzero(padded[:, 9:]) == 0
    assert torch.equal(text, original)


def test_build_context_too_long_and_bad_shapes():
    too_long = r"10 text positions \+ 4 projector tokens = 14, longer than total_length 12"
    with pytest.raises(ConditioningError, match=too_long):
        build_context(torch.zeros(1, 10, 8), torch.zeros(1, 4, 8), total_length=12)
    with pytest.raises(ConditioningError, match="longer than total_length 5"):
        build_context(torch.zeros(1, 6, 8), None, total_length=5)
    with pytest.raises(ConditioningError, match=r"expected \[1 or 2, tokens, 8\]"):
        build_context(torch.zeros(2, 3, 8), torch.zeros(3, 4, 8))
    with pytest.raises(ConditioningError, match=r"expected \[1 or 1, tokens, 8\]"):
        build_context(torch.zeros(1, 3, 8), torch.zeros(1, 4, 16))
    with pytest.raises(ConditioningError, match=r"expected a tensor \[batch, length, dim\]"):
        build_context(torch.zeros(3, 8), None)


def test_projector_output_feeds_build_context(tiny_pth):
    tokens = project(load_projector(tiny_pth), _hidden(1, 20))
    text = torch.randn(1, 12, 64)
    context = build_context(text, tokens, total_length=32)
    assert torch.equal(context[:, 12:16], tokens)


# --------------------------------------------------------------------------- ComfyUI CONDITIONING


def _native_conditioning() -> list:
    vace_frames = [torch.randn(1, 32, 2, 4, 4)]
    return [
        [torch.randn(1, 512, 16), {"pooled_output": None, "vace_frames": vace_frames, "vace_strength": [1.0]}],
        [torch.randn(2, 300, 16, dtype=torch.float16), {"strength": 0.5}],
    ]


def test_append_to_conditioning_shapes_order_and_dicts():
    conditioning = _native_conditioning()
    originals = [(entry[0].clone(), dict(entry[1])) for entry in conditioning]
    tokens = torch.randn(1, 4, 16)
    result = append_to_conditioning(conditioning, tokens)
    assert isinstance(result, list) and len(result) == 2
    assert result[0][0].shape == (1, 516, 16)
    assert result[1][0].shape == (2, 304, 16) and result[1][0].dtype == torch.float16
    assert torch.equal(result[0][0][:, :512], originals[0][0])
    assert torch.equal(result[0][0][:, 512:], tokens)
    for b in range(2):
        assert torch.equal(result[1][0][b, :300], originals[1][0][b])
        assert torch.equal(result[1][0][b, 300:], tokens[0].half())
    # Dicts: new objects with the same entries; VACE inputs are the very same objects.
    assert result[0][1] == originals[0][1] and result[0][1] is not conditioning[0][1]
    assert result[0][1]["vace_frames"] is conditioning[0][1]["vace_frames"]
    assert result[1][1] == {"strength": 0.5}
    # Input untouched: same list, same dicts, same tensor values and shapes.
    assert len(conditioning) == 2
    for entry, (tensor, extras) in zip(conditioning, originals, strict=True):
        assert torch.equal(entry[0], tensor) and entry[1] == extras
    result[0][1]["new"] = 1
    assert "new" not in conditioning[0][1]


def test_append_to_conditioning_pads_to_reference_length_and_negative_branch():
    conditioning = _native_conditioning()
    tokens = torch.randn(4, 16)
    positive = append_to_conditioning(conditioning, tokens, total_length=REFERENCE_CONTEXT_LENGTH)
    assert positive[0][0].shape == (1, REFERENCE_CONTEXT_LENGTH, 16)
    assert torch.equal(positive[0][0][0, 512:516], tokens)
    assert torch.count_nonzero(positive[0][0][:, 516:]) == 0
    negative = append_to_conditioning(conditioning, None, total_length=REFERENCE_CONTEXT_LENGTH)
    assert negative[1][0].shape == (2, REFERENCE_CONTEXT_LENGTH, 16)
    assert torch.equal(negative[1][0][:, :300], conditioning[1][0])
    assert torch.count_nonzero(negative[1][0][:, 300:]) == 0
    unchanged = append_to_conditioning(conditioning, None)
    assert unchanged[0][0] is conditioning[0][0] and unchanged is not conditioning


def test_append_to_conditioning_extends_attention_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    conditioning = [[torch.randn(1, 5, 8), {"attention_mask": mask}]]
    result = append_to_conditioning(conditioning, torch.randn(1, 4, 8), total_length=12)
    assert result[0][1]["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0]]
    assert conditioning[0][1]["attention_mask"] is mask and mask.tolist() == [[1, 1, 1, 0, 0]]


def test_append_to_conditioning_refuses_bad_input():
    with pytest.raises(ConditioningError, match="expected a list"):
        append_to_conditioning(torch.zeros(1, 2, 3), None)
    with pytest.raises(ConditioningError, match=r"conditioning entry 1: expected \[tensor"):
        append_to_conditioning([[torch.zeros(1, 2, 8), {}], [torch.zeros(1, 2, 8)]], None)
    with pytest.raises(ConditioningError, match="conditioning entry 0: projector tokens"):
        append_to_conditioning([[torch.zeros(1, 2, 8), {}]], torch.zeros(1, 4, 4096))
    with pytest.raises(ConditioningError, match="conditioning entry 0: 510 text positions"):
        append_to_conditioning([[torch.zeros(1, 510, 8), {}]], torch.zeros(4, 8), total_length=512)
