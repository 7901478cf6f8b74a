"""Per-layer casts on the CPU reuse their buffers: the same values as a fresh cast, no fresh pages per call."""

from __future__ import annotations

import torch

from unison_runtime.vace import stored_precision as sp


def stored_model(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two copies of a small MLP: one converted to fp32 at load, one keeping fp16 matrices cast per layer."""
    torch.manual_seed(seed)
    reference = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                                    torch.nn.Linear(32, 16))
    for layer in reference:
        if isinstance(layer, torch.nn.Linear):
            layer.weight.data = layer.weight.data.half().float()  # values an fp16 file can hold
    kept = torch.nn.Sequential(*[torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                                 torch.nn.Linear(32, 16)])
    kept.load_state_dict(reference.state_dict())
    for layer in kept:
        if isinstance(layer, torch.nn.Linear):
            layer.weight.data = layer.weight.data.half()
    names = {f"{i}.weight": torch.float32 for i, layer in enumerate(kept) if isinstance(layer, torch.nn.Linear)}
    assert sp.apply_stored_precision(kept, names) == 3
    return reference, kept


def test_reused_buffers_give_the_converted_models_values() -> None:
    reference, kept = stored_model()
    x = torch.randn(4, 16)
    expected = reference(x)
    assert torch.equal(kept(x), expected)
    assert torch.equal(kept(x), expected)  # again, from the reused buffers
    assert all(layer.weight.dtype == torch.float16 for layer in kept if isinstance(layer, torch.nn.Linear))


def test_one_buffer_per_shape_is_kept_and_reused() -> None:
    _, kept = stored_model()
    seen: list[int] = []
    kept[2].register_forward_hook(lambda module, args, output: seen.append(module.weight.data_ptr()))
    x = torch.randn(2, 16)
    kept(x)
    buffers = sp.cast_buffers(kept)
    held = buffers.held_bytes()
    assert held == (32 * 16 + 32 * 32 + 16 * 32) * 4  # three shapes, one fp32 buffer each
    kept(x)
    assert seen[0] == seen[1] and buffers.held_bytes() == held  # the same buffer, nothing new
    assert sp.drop_cast_buffers(kept) == held and buffers.held_bytes() == 0
    kept(x)  # made again on the next forward
    assert buffers.held_bytes() == held


def test_layers_cast_together_get_buffers_of_their_own() -> None:
    buffers = sp.CastBuffers()
    first, second = buffers.take(torch.Size([3, 4]), torch.float32), buffers.take(torch.Size([3, 4]), torch.float32)
    assert first.data_ptr() != second.data_ptr()
    buffers.give(first)
    buffers.give(second)
    assert buffers.held_bytes() == 2 * 12 * 4
    assert buffers.take(torch.Size([3, 4]), torch.float32).data_ptr() in (first.data_ptr(), second.data_ptr())


def test_scaled_fp8_cast_into_a_buffer_is_the_load_time_arithmetic() -> None:
    stored = torch.randn(8, 4).to(torch.float8_e4m3fn)
    for scale in (torch.tensor(0.37), torch.rand(8) + 0.5):
        out = sp._cast_into(sp.CastBuffers(), stored, scale, torch.float32)
        assert torch.equal(out, sp.dequantize_weight(stored, scale, torch.float32))
    # Where the product would be rounded again (bf16 compute), the fresh path is kept.
    assert sp._cast_into(sp.CastBuffers(), stored, torch.tensor(0.5), torch.bfloat16) is None
    assert sp._cast_into(sp.CastBuffers(), stored.to("meta"), None, torch.float32) is None  # not the CPU
