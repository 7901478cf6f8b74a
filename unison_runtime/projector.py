"""The Unison projector and the assembly of stage two's text context.

Stage one's last hidden states (planning prompt, chat template, first token dropped; the
planner prepares them) go through a small MLP that reproduces the reference ``ProjMLP``
exactly and yields a few (4) tokens in umT5's embedding space. Those tokens follow the umT5
embedding of the instruction in the **conditional** context only; the negative context gets
none (DESIGN section 7-8).

Why the token position does not need to be fought over in ComfyUI: Wan's cross-attention puts
no positional encoding on the text context, so the result depends on which vectors are in the
context and how many zero-padding positions there are, not on their order. Appending the tokens
after ComfyUI's 512-position umT5 output and zero-padding both branches to the reference length
(2048) therefore gives the reference's context up to summation order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UnisonError, WeightsError
from .weights import DTYPE_NAMES, load_state_dict, read_safetensors_header, save_safetensors, strip_prefix

PROJECTOR_KEYS = (
    "ln_in.weight",
    "ln_in.bias",
    "net.0.weight",
    "net.0.bias",
    "net.3.weight",
    "net.3.bias",
    "ln_out.weight",
    "ln_out.bias",
    "seq_adjust.weight",
    "seq_adjust.bias",
)
DATA_PARALLEL_PREFIX = "module."
REFERENCE_DROPOUT = 0.1
REFERENCE_CONTEXT_LENGTH = 2048  # the reference raises Wan's text length to this (DESIGN section 8)


class ConditioningError(UnisonError, ValueError):
    """Hidden states, text embeddings or CONDITIONING of the wrong shape for the projector or context."""


@dataclass(frozen=True)
class ProjectorDims:
    """Sizes read from a projector's weights (the released one: 2048, 2048, 4096, 56, 4)."""

    input_dim: int  # stage one's hidden size
    hidden_dim: int
    t5_dim: int  # umT5 embedding size; also the size of each output token
    target_seq_len: int  # hidden states are zero-padded / truncated to this many positions
    out_tokens: int  # tokens appended to the text context


class UnisonProjector(nn.Module):
    """Reference ``ProjMLP``: LayerNorm → Linear → GELU → Dropout → Linear → LayerNorm, then the
    sequence is zero-padded or truncated to ``target_seq_len`` and a Linear over the sequence
    axis mixes it down to ``out_tokens`` tokens.

    Submodule names match the released state dict (``ln_in``, ``net.0``, ``net.3``, ``ln_out``,
    ``seq_adjust``) so it loads with ``strict=True``.
    """

    def __init__(
        self,
        input_dim: int,
        t5_dim: int,
        hidden_dim: int = 2048,
        target_seq_len: int = 56,
        out_tokens: int = 4,
        dropout: float = REFERENCE_DROPOUT,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dims = ProjectorDims(input_dim, hidden_dim, t5_dim, target_seq_len, out_tokens)
        self.ln_in = nn.LayerNorm(input_dim, **factory)
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden_dim, **factory),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, t5_dim, **factory),
        )
        self.ln_out = nn.LayerNorm(t5_dim, **factory)
        self.seq_adjust = nn.Linear(target_seq_len, out_tokens, **factory)
        self.source: str | None = None  # the file it came from, for messages and node displays

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, L, input_dim]`` → ``[B, out_tokens, t5_dim]`` for any ``L >= 1``."""
        dims = self.dims
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != dims.input_dim or hidden_states.shape[1] == 0:
            raise ConditioningError(
                f"projector input has shape {tuple(hidden_states.shape)}; expected [batch, tokens >= 1, "
                f"{dims.input_dim}] (the stage-one hidden size this projector was trained for)"
            )
        x = self.ln_out(self.net(self.ln_in(hidden_states)))
        x = fit_sequence_length(x, dims.target_seq_len)
        # seq_adjust is a Linear over positions: move the sequence axis last, mix, move it back.
        return self.seq_adjust(x.transpose(1, 2)).transpose(1, 2).contiguous()

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *, source: str | None = None) -> UnisonProjector:
        """Build a projector whose sizes are read from ``state_dict`` (keys may carry ``module.``).

        The module takes the given tensors as its parameters (no copy; meta tensors give a
        meta module, handy to check sizes without memory). Returned in eval mode.
        """
        where = f"projector weights {source}" if source else "projector state dict"
        state = strip_prefix(state_dict, DATA_PARALLEL_PREFIX)
        dims = infer_projector_dims(state, where=where)
        module = cls(
            dims.input_dim, dims.t5_dim, dims.hidden_dim, dims.target_seq_len, dims.out_tokens, device="meta"
        )
        module.load_state_dict(state, strict=True, assign=True)
        module.source = source
        return module.eval()


def fit_sequence_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad ``[B, L, D]`` at the end, or keep its first ``length`` positions, as the reference does."""
    current = x.shape[1]
    if current > length:
        return x[:, :length]
    if current < length:
        padding = x.new_zeros(x.shape[0], length - current, x.shape[2])
        return torch.cat([x, padding], dim=1)
    return x


def infer_projector_dims(
    state_dict: Mapping[str, torch.Tensor], *, where: str = "projector state dict"
) -> ProjectorDims:
    """Read the projector's sizes from its weights and check every tensor against them.

    Missing or unexpected keys, wrong ranks, inconsistent shapes and non-float tensors raise a
    :class:`WeightsError` that names the keys, ``where`` they came from and what was expected.
    """
    missing = [key for key in PROJECTOR_KEYS if key not in state_dict]
    unexpected = sorted(key for key in state_dict if key not in PROJECTOR_KEYS)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            shown = unexpected[:10] + ([f"... {len(unexpected) - 10} more"] if len(unexpected) > 10 else [])
            parts.append(f"unexpected keys {shown}")
        raise WeightsError(
            f"{where}: not a Unison projector: {'; '.join(parts)}; expected exactly {list(PROJECTOR_KEYS)}"
            " (optionally prefixed 'module.')"
        )
    for key in ("net.0.weight", "net.3.weight", "seq_adjust.weight"):
        if state_dict[key].dim() != 2:
            raise WeightsError(f"{where}: {key} has shape {tuple(state_dict[key].shape)}; expected a 2-D matrix")
    if state_dict["ln_in.weight"].dim() != 1:
        raise WeightsError(f"{where}: ln_in.weight has shape {tuple(state_dict['ln_in.weight'].shape)}; expected 1-D")
    hidden_dim = state_dict["net.0.weight"].shape[0]
    t5_dim = state_dict["net.3.weight"].shape[0]
    out_tokens, target_seq_len = state_dict["seq_adjust.weight"].shape
    dims = ProjectorDims(
        input_dim=int(state_dict["ln_in.weight"].shape[0]),
        hidden_dim=int(hidden_dim),
        t5_dim=int(t5_dim),
        target_seq_len=int(target_seq_len),
        out_tokens=int(out_tokens),
    )
    expected = {
        "ln_in.weight": (dims.input_dim,),
        "ln_in.bias": (dims.input_dim,),
        "net.0.weight": (dims.hidden_dim, dims.input_dim),
        "net.0.bias": (dims.hidden_dim,),
        "net.3.weight": (dims.t5_dim, dims.hidden_dim),
        "net.3.bias": (dims.t5_dim,),
        "ln_out.weight": (dims.t5_dim,),
        "ln_out.bias": (dims.t5_dim,),
        "seq_adjust.weight": (dims.out_tokens, dims.target_seq_len),
        "seq_adjust.bias": (dims.out_tokens,),
    }
    wrong = [
        f"{key} is {tuple(state_dict[key].shape)}, expected {shape}"
        for key, shape in expected.items()
        if tuple(state_dict[key].shape) != shape
    ]
    if wrong:
        raise WeightsError(f"{where}: inconsistent projector shapes: {'; '.join(wrong)}")
    not_float = [key for key in PROJECTOR_KEYS if not state_dict[key].is_floating_point()]
    if not_float:
        raise WeightsError(f"{where}: tensors {not_float} are not floating point; expected float weights")
    if min(asdict(dims).values()) < 1:
        raise WeightsError(f"{where}: a projector size is zero ({dims}); expected positive sizes")
    return dims


# --------------------------------------------------------------------------- loading


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise WeightsError(f"projector dtype {dtype!r}: expected one of {sorted(DTYPE_NAMES)} or a torch.dtype")


def load_projector(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
) -> UnisonProjector:
    """Load the released ``projector.pth`` (or a ``.safetensors`` copy) safely, in eval mode.

    ``dtype=None`` keeps the stored dtype (float32 when the file mixes dtypes); ``device=None``
    leaves it on the CPU.
    """
    path = Path(path)
    state = load_state_dict(path, what="projector", device="cpu")
    projector = UnisonProjector.from_state_dict(state, source=str(path))
    target = _as_dtype(dtype)
    if target is None:
        stored = {tensor.dtype for tensor in projector.parameters()}
        target = stored.pop() if len(stored) == 1 else torch.float32
    projector.to(device=device if device is not None else "cpu", dtype=target)
    return projector.requires_grad_(False).eval()


def project(projector: UnisonProjector, hidden_states: torch.Tensor) -> torch.Tensor:
    """Run the projector on ``[B, L, input_dim]`` (or ``[L, input_dim]``) hidden states.

    The input is moved to the projector's device and dtype; the result is ``[B, out_tokens,
    t5_dim]`` there. The caller passes the planning prompt's last hidden states with the first
    token already dropped, as the reference does.
    """
    parameter = next(projector.parameters())
    if hidden_states.dim() == 2:
        hidden_states = hidden_states.unsqueeze(0)
    with torch.no_grad():
        return projector(hidden_states.to(device=parameter.device, dtype=parameter.dtype))


def convert_projector(source: str | Path, target: str | Path) -> Path:
    """Rewrite a projector ``.pth`` as ``.safetensors`` (``module.`` removed), without running any pickle.

    The weights are validated by building the projector before anything is written, and the
    written header is checked afterwards.
    """
    source, target = Path(source), Path(target)
    if target.suffix.lower() != ".safetensors":
        raise WeightsError(f"projector conversion target {target}: expected a path ending in .safetensors")
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise WeightsError(f"projector conversion: source and target are the same file ({source})")
    projector = load_projector(source)
    metadata = {
        "format": "pt",
        "unison_kind": "projector",
        "unison_dims": json.dumps(asdict(projector.dims)),
        "unison_source": source.name,
    }
    save_safetensors(projector.state_dict(), target, metadata=metadata)
    header = read_safetensors_header(target, what="converted projector")
    written = sorted(key for key in header if key != "__metadata__")
    if written != sorted(PROJECTOR_KEYS):
        raise WeightsError(f"converted projector {target}: wrote keys {written}; expected {sorted(PROJECTOR_KEYS)}")
    return target


# --------------------------------------------------------------------------- context assembly


def _tokens_for(tokens: torch.Tensor, text: torch.Tensor, where: str) -> torch.Tensor:
    """Shape ``tokens`` ([N, D] or [1 or B, N, D]) to ``text``'s batch, dtype and device."""
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    batch, dim = text.shape[0], text.shape[2]
    if tokens.dim() != 3 or tokens.shape[2] != dim or tokens.shape[0] not in (1, batch):
        raise ConditioningError(
            f"{where}: projector tokens have shape {tuple(tokens.shape)}; expected [1 or {batch}, tokens, {dim}] "
            f"to go with text of shape {tuple(text.shape)}"
        )
    return tokens.to(device=text.device, dtype=text.dtype).expand(batch, -1, -1)


def _assemble(
    text: torch.Tensor, tokens: torch.Tensor | None, total_length: int | None, where: str
) -> torch.Tensor:
    if not isinstance(text, torch.Tensor) or text.dim() != 3:
        shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
        raise ConditioningError(f"{where}: text embeddings are {shape}; expected a tensor [batch, length, dim]")
    shaped = None if tokens is None else _tokens_for(tokens, text, where)
    text_length = text.shape[1]
    token_count = 0 if shaped is None else shaped.shape[1]
    length = text_length + token_count
    if total_length is not None:
        if total_length < 1:
            raise ConditioningError(f"{where}: total_length is {total_length}; expected a positive length")
        if length > total_length:
            raise ConditioningError(
                f"{where}: {text_length} text positions + {token_count} projector tokens = {length}, "
                f"longer than total_length {total_length}"
            )
        length = total_length
    if shaped is None and length == text_length:
        return text
    context = text.new_zeros(text.shape[0], length, text.shape[2])
    context[:, :text_length] = text
    if shaped is not None:
        context[:, text_length : text_length + token_count] = shaped
    return context


def build_context(
    text_embeddings: torch.Tensor, projector_tokens: torch.Tensor | None, total_length: int | None = None
) -> torch.Tensor:
    """Stage two's text context: the umT5 embedding, then the projector tokens, then zeros.

    ``text_embeddings`` is ``[B, L, D]`` holding the real tokens only (unpadded, as the reference
    builds it); ``projector_tokens`` is ``[1 or B, N, D]`` (or ``[N, D]``) and is cast to the
    text's dtype and device. For the negative branch pass ``None``: the text comes back as it
    is, only zero-padded when ``total_length`` (``REFERENCE_CONTEXT_LENGTH`` in the reference)
    is given. A context longer than ``total_length`` is refused.
    """
    return _assemble(text_embeddings, projector_tokens, total_length, "build_context")


def append_to_conditioning(
    conditioning: Sequence[Any], tokens: torch.Tensor | None, total_length: int | None = None
) -> list[list[Any]]:
    """Return a new ComfyUI CONDITIONING with ``tokens`` appended to every entry's tensor.

    ``conditioning`` is a list of ``[tensor [B, L, D], dict]``. Each entry's tensor gets the
    tokens (broadcast over its batch, in its dtype and device), then zeros up to
    ``total_length`` if given; ``tokens=None`` only pads (for the negative branch). Each dict is
    shallow-copied so entries such as ``vace_frames`` stay intact; an ``attention_mask`` of
    shape ``[B, L]`` is extended to match (ones for the tokens, zeros for padding). The input
    list, its dicts and its tensors are not modified.
    """
    if not isinstance(conditioning, (list, tuple)):
        raise ConditioningError(
            f"conditioning is a {type(conditioning).__name__}; expected a list of [tensor [B, L, D], dict]"
        )
    result: list[list[Any]] = []
    for index, entry in enumerate(conditioning):
        where = f"conditioning entry {index}"
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) < 2
            or not isinstance(entry[0], torch.Tensor)
            or not isinstance(entry[1], dict)
        ):
            raise ConditioningError(f"{where}: expected [tensor [B, L, D], dict]; got {type(entry).__name__}")
        text, extras = entry[0], dict(entry[1])
        context = _assemble(text, tokens, total_length, where)
        mask = extras.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(text.shape[:2]):
            extras["attention_mask"] = _extend_mask(mask, tokens, context.shape[1])
        result.append([context, extras, *entry[2:]])
    return result


def _extend_mask(mask: torch.Tensor, tokens: torch.Tensor | None, length: int) -> torch.Tensor:
    token_count = 0 if tokens is None else tokens.shape[-2]
    extended = mask.new_zeros(mask.shape[0], length)
    extended[:, : mask.shape[1]] = mask
    extended[:, mask.shape[1] : mask.shape[1] + token_count] = 1
    return extended
