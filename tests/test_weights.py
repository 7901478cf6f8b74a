"""The safe state-dict loader: real files in every supported format, and hostile ones."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unison_runtime.errors import WeightsError
from unison_runtime.weights import (
    MAX_SAFETENSORS_HEADER_BYTES,
    load_state_dict,
    read_safetensors_header,
    save_safetensors,
    strip_prefix,
)


def _sample() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(3, 4, generator=generator),
        "a.bias": torch.randn(3, generator=generator),
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "half": torch.randn(5, generator=generator).to(torch.float16),
    }


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert sorted(left) == sorted(right)
    for key in left:
        assert left[key].dtype == right[key].dtype, key
        assert torch.equal(left[key], right[key]), key


# --------------------------------------------------------------------------- hostile pickles


class _RunsShell:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _RunsExec:
    """Unpickling this would exec Python code that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("payload_class", [_RunsShell, _RunsExec])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("suffix", [".pth", ".bin", ".ckpt", ".pt"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload_class, writer, suffix):
    marker = tmp_path / "marker"
    path = tmp_path / f"evil{suffix}"
    payload = {"ln_in.weight": torch.zeros(2), "evil": payload_class(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(WeightsError) as info:
        load_state_dict(path, what="projector")
    message = str(info.value)
    assert str(path) in message
    assert "not a plain state dict" in message
    assert "weights_only=False" not in message  # never advise the unsafe load
    assert not marker.exists()


def test_malicious_payload_is_live(tmp_path):
    """Control for the test above: the payload does run under an unrestricted unpickler."""
    marker = tmp_path / "marker"
    data = pickle.dumps(_RunsExec(marker))
    pickle.loads(data)
    assert marker.read_text() == "ran"


def test_pickled_object_that_is_not_a_tensor_is_refused(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"w": torch.zeros(1), "module": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(WeightsError, match="not a plain state dict"):
        load_state_dict(path, what="projector")


# --------------------------------------------------------------------------- pickle formats


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
def test_pickle_formats_load_flat_state_dict(tmp_path, suffix):
    sd = _sample()
    path = tmp_path / f"w{suffix}"
    torch.save(sd, path)
    loaded = load_state_dict(path, what="test")
    assert type(loaded) is dict
    _assert_same(loaded, sd)


def test_legacy_non_zip_torch_save_loads(tmp_path):
    sd = _sample()
    path = tmp_path / "legacy.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    _assert_same(load_state_dict(path, what="test"), sd)


def test_ordered_dict_and_parameters_become_plain_tensors(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(OrderedDict([("p", torch.nn.Parameter(torch.ones(2))), ("t", torch.zeros(1))]), path)
    loaded = load_state_dict(path, what="test")
    assert type(loaded) is dict
    assert not isinstance(loaded["p"], torch.nn.Parameter)
    assert torch.equal(loaded["p"], torch.ones(2))


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "anything"])
def test_single_wrapper_level_is_unwrapped(tmp_path, wrapper):
    sd = _sample()
    path = tmp_path / "wrapped.ckpt"
    torch.save({wrapper: sd}, path)
    _assert_same(load_state_dict(path, what="test"), sd)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, "'state_dict' (dict)"),  # extra non-tensor entry
        ({"state_dict": {"w": torch.zeros(1), "step": 7}}, "'step' (int)"),  # non-tensor inside the wrapper
        ({"outer": {"inner": {"w": torch.zeros(1)}}}, "'inner' (dict)"),  # two levels deep
        ({1: torch.zeros(1)}, "1 (Tensor)"),  # non-string key
        ({"w": [torch.zeros(1)]}, "'w' (list)"),
    ],
)
def test_not_flat_is_refused_naming_entries(tmp_path, payload, needle):
    path = tmp_path / "w.pth"
    torch.save(payload, path)
    with pytest.raises(WeightsError, match="not a flat state dict") as info:
        load_state_dict(path, what="test")
    assert needle in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("payload", "needle"), [([torch.zeros(1)], "holds a list"), ({}, "holds no tensors")])
def test_non_mapping_or_empty_is_refused(tmp_path, payload, needle):
    path = tmp_path / "w.pt"
    torch.save(payload, path)
    with pytest.raises(WeightsError, match=needle):
        load_state_dict(path, what="test")


def test_truncated_pickle_checkpoint_names_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(_sample(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt") as info:
        load_state_dict(path, what="projector")
    assert str(path) in str(info.value)
    assert "projector" in str(info.value)


def test_garbage_pth_is_refused(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint at all\n" * 4)
    with pytest.raises(WeightsError) as info:
        load_state_dict(path, what="test")
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_with_metadata(tmp_path):
    sd = _sample()
    path = save_safetensors(sd, tmp_path / "sub" / "w.safetensors", metadata={"kind": "test"})
    assert path == tmp_path / "sub" / "w.safetensors"
    _assert_same(load_state_dict(path, what="test"), sd)
    header = read_safetensors_header(path)
    assert header["__metadata__"] == {"kind": "test"}
    assert header["a.weight"]["shape"] == [3, 4]
    assert header["a.weight"]["dtype"] == "F32"
    assert header["half"]["dtype"] == "F16"
    assert header["b"]["dtype"] == "I64"
    assert not list(path.parent.glob(".*tmp"))  # no temporary file left behind


def test_save_handles_shared_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    matrix = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    sd = {"first": base[:6], "second": base[6:], "whole": base, "same": base, "transposed": matrix.t()}
    # safetensors alone refuses this dict; the helper must not.
    with pytest.raises(RuntimeError):
        save_file(sd, str(tmp_path / "raw.safetensors"))
    path = save_safetensors(sd, tmp_path / "shared.safetensors")
    loaded = load_state_dict(path, what="test")
    assert torch.equal(loaded["first"], torch.arange(6.0))
    assert torch.equal(loaded["second"], torch.arange(6.0, 12.0))
    assert torch.equal(loaded["whole"], base) and torch.equal(loaded["same"], base)
    assert torch.equal(loaded["transposed"], matrix.t())
    assert torch.equal(base, torch.arange(12, dtype=torch.float32))  # caller's tensors untouched


def test_save_refuses_bad_metadata_and_entries(tmp_path):
    with pytest.raises(WeightsError, match="strings to strings"):
        save_safetensors({"a": torch.zeros(1)}, tmp_path / "m.safetensors", metadata={"n": 1})
    with pytest.raises(WeightsError, match="'a' is not name -> tensor"):
        save_safetensors({"a": 3}, tmp_path / "e.safetensors")


def test_truncated_safetensors_names_file(tmp_path):
    path = save_safetensors(_sample(), tmp_path / "full.safetensors")
    data = path.read_bytes()
    for cut in (len(data) - 3, 40, 5):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="truncated or not a safetensors file") as info:
            load_state_dict(truncated, what="VACE transformer")
        assert str(truncated) in str(info.value)
        assert "VACE transformer" in str(info.value)
        with pytest.raises(WeightsError, match="truncated or not a safetensors file"):
            read_safetensors_header(truncated)


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    path = tmp_path / "sneaky.safetensors"
    torch.save(_sample(), path)
    with pytest.raises(WeightsError, match="truncated or not a safetensors file"):
        load_state_dict(path, what="test")


def test_header_size_is_bounded_before_reading(tmp_path):
    path = tmp_path / "huge_header.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_SAFETENSORS_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(WeightsError, match="header length"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ([1, 2], "JSON list"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, "ends at byte 800"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, "shape"),
        ({"w": {"shape": [2], "data_offsets": [0, 8]}}, "no dtype"),
        ({"__metadata__": {"k": 5}}, "__metadata__"),
    ],
)
def test_malformed_headers_are_refused(tmp_path, header, needle):
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(WeightsError, match=needle):
        read_safetensors_header(path)


def test_header_read_does_not_need_the_tensors(tmp_path):
    """A header with consistent offsets is readable and returns names, dtypes and shapes only."""
    path = save_safetensors({"x": torch.zeros(2, 3, dtype=torch.bfloat16)}, tmp_path / "x.safetensors")
    header = read_safetensors_header(path)
    assert header == {"x": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}


# --------------------------------------------------------------------------- paths and helpers


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "projector.pth"
    with pytest.raises(WeightsError, match="file not found") as info:
        load_state_dict(path, what="projector")
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError, match="file not found"):
        read_safetensors_header(tmp_path / "none.safetensors")


def test_directory_and_unknown_extension_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="not a regular file"):
        load_state_dict(tmp_path, what="test")
    path = tmp_path / "w.npz"
    path.write_bytes(b"PK")
    with pytest.raises(WeightsError, match=r"unsupported file type '\.npz'") as info:
        load_state_dict(path, what="test")
    assert ".safetensors" in str(info.value) and ".pth" in str(info.value)


def test_strip_prefix():
    sd = {"module.a": torch.zeros(1), "module.b.c": torch.ones(1), "other": torch.zeros(2)}
    stripped = strip_prefix(sd, "module.")
    assert list(stripped) == ["a", "b.c", "other"]
    assert stripped["a"] is sd["module.a"]
    assert list(sd) == ["module.a", "module.b.c", "other"]  # input untouched
    assert strip_prefix(sd, "") == sd
    with pytest.raises(WeightsError, match="two entries named 'a'"):
        strip_prefix({"module.a": torch.zeros(1), "a": torch.zeros(1)}, "module.")


def test_first_line_quotes_the_message_without_the_libraries_advice():
    from unison_runtime.errors import first_line

    text = "Weights only load failed. Please use weights_only=False if you trust it\nTraceback (most recent call last)"
    assert first_line(text) == "Weights only load failed"
    assert first_line(RuntimeError("size mismatch for a.weight\n\tmore")) == "size mismatch for a.weight"
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line("x" * 1000) == "x" * 300
