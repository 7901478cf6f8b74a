"""Compute the text side of cross-attention once per run, exactly.

The text context does not change while sampling, yet every step of diffusers'
``WanVACETransformer3DModel`` embeds it again (``condition_embedder.text_embedder`` over 2048
positions) and, in every block (the VACE blocks too), projects it again into the cross-attention's
keys and values (``attn2.to_k`` / ``to_v`` + ``norm_k``). :func:`text_kv_once` attaches two kinds of
diffusers model hooks for the length of one run:

* on the text embedder: its output is remembered per input context;
* on every cross-attention (``attn2``): the normalised keys and the values are remembered per
  embedded context, and only the query side runs each step.

Both remember a result under the *tensor* that went in (the same memory, shape and strides, held
alive by the memo, with an unchanged version counter), never under a name: the conditional, the
negative and the batched ``[cond; neg]`` contexts are three different tensors, so each gets its own
keys and values, and a context changed in place is computed again. Nothing is kept after the run
(the hooks are removed and the memos dropped on any exit: finished, cancelled, error). The first
step computes exactly what later steps would compute (same modules, same inputs, same shapes), so
the result is bit-identical to running without the hooks.

The attention itself runs as diffusers' ``WanAttnProcessor`` runs it (same backend, via
``dispatch_attention_fn``); a cross-attention whose processor is another class, or that has an
image branch (``add_k_proj``, Wan I2V), is left to its own processor, uncached.

Context parallelism: diffusers' Wan processor never shards the cross-attention
(``parallel_config=None`` when ``encoder_hidden_states`` is given), so each rank caches the full
text keys and values for its own sequence shard of queries; if a parallel plan split or copied the
context each step, the memo would miss every step (still exact, no gain) and keep at most
:data:`MEMO_CAPACITY` entries.

Memory: the cache holds, per context, one ``[B, L, dim]`` embedding plus keys and values of the same
size for every cross-attention: ``(2 * blocks + 1) * B * L * dim`` elements (see :func:`cache_bytes`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

#: Names of the hooks in diffusers' ``HookRegistry`` (one per module).
TEXT_EMBEDDING_HOOK = "unison_text_embedding_once"
CROSS_ATTENTION_HOOK = "unison_text_kv_once"
#: Contexts remembered per module: conditional, negative and batched [cond; neg] (after a fallback).
MEMO_CAPACITY = 3


@dataclass
class TextKVStats:
    """What the hooks did in one run (for tests and benchmarks)."""

    computed: int = 0  # text K/V (or embeddings) computed
    reused: int = 0  # ... taken from the memo instead
    passed_through: int = 0  # cross-attention calls left to their own processor (unsupported form)
    modules: int = 0  # cross-attentions hooked


def _region(x: torch.Tensor) -> tuple[Any, ...]:
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x.device)


def _version(x: torch.Tensor) -> int | None:
    # Inference tensors (ComfyUI runs nodes under torch.inference_mode) have no version counter.
    return None if x.is_inference() else x._version


class _Memo:
    """Results keyed by the input tensor: same memory region, held alive here, same version."""

    def __init__(self, stats: TextKVStats) -> None:
        self.entries: list[tuple[torch.Tensor, tuple[Any, ...], int | None, Any]] = []
        self.stats = stats

    def get(self, x: torch.Tensor) -> Any:
        region, version = _region(x), _version(x)
        for _, key, seen, value in self.entries:
            if key == region and seen == version:
                self.stats.reused += 1
                return value
        return None

    def put(self, x: torch.Tensor, value: Any) -> Any:
        self.stats.computed += 1
        self.entries.append((x, _region(x), _version(x), value))
        del self.entries[:-MEMO_CAPACITY]
        return value

    def clear(self) -> None:
        self.entries.clear()


class _TextEmbeddingOnce:
    """``text_embedder(context)``: computed once per context tensor."""

    def __init__(self, memo: _Memo) -> None:
        super().__init__()
        self.memo = memo

    def new_forward(self, module: torch.nn.Module, caption: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not isinstance(caption, torch.Tensor):
            return self.fn_ref.original_forward(caption, *args, **kwargs)
        cached = self.memo.get(caption)
        if cached is None:
            cached = self.memo.put(caption, self.fn_ref.original_forward(caption))
        return cached


class _CrossAttentionKVOnce:
    """A cross-attention whose text keys and values are computed once per embedded context."""

    def __init__(self, memo: _Memo, processor_class: type) -> None:
        super().__init__()
        self.memo = memo
        self.processor_class = processor_class

    def new_forward(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None, rotary_emb: Any = None, **kwargs: Any) -> Any:
        if (encoder_hidden_states is None or attention_mask is not None or rotary_emb is not None or kwargs
                or attn.add_k_proj is not None or type(attn.processor) is not self.processor_class):
            self.memo.stats.passed_through += 1
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                                **kwargs)
        kv = self.memo.get(encoder_hidden_states)
        if kv is None:
            kv = self.memo.put(encoder_hidden_states, _text_keys_values(attn, encoder_hidden_states))
        return _attend(attn, hidden_states, *kv)


# The two functions below are diffusers' WanAttnProcessor.__call__ (models/transformers/transformer_wan.py,
# with _get_qkv_projections) for cross-attention without an image branch, split at the text side.


def _text_keys_values(attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(context), attn.to_v(context)
    key = attn.norm_k(key)
    return key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))


def _attend(attn: Any, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                backend=attn.processor._attention_backend, parallel_config=None)
    out = out.flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](out))


@functools.cache
def _hook_classes() -> tuple[type, type]:
    """The two hooks as diffusers ``ModelHook`` subclasses (diffusers is imported only when sampling)."""
    from diffusers.hooks.hooks import ModelHook

    return (type("TextEmbeddingOnceHook", (_TextEmbeddingOnce, ModelHook), {}),
            type("CrossAttentionKVOnceHook", (_CrossAttentionKVOnce, ModelHook), {}))


def cross_attentions(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every text cross-attention of a diffusers Wan(VACE) transformer (main and VACE blocks)."""
    blocks = [*getattr(transformer, "blocks", []), *getattr(transformer, "vace_blocks", [])]
    return [block.attn2 for block in blocks if getattr(getattr(block, "attn2", None), "is_cross_attention", False)]


def cache_bytes(transformer: torch.nn.Module, context_length: int, contexts: int = 2) -> int:
    """Bytes the cache holds during a run: embedding + K + V per cross-attention, per context row.

    ``contexts`` counts context rows (2 for guidance, two-pass or batched; 1 without guidance).
    """
    config = transformer.config
    dim = config.num_attention_heads * config.attention_head_dim
    itemsize = torch.empty((), dtype=transformer.dtype).element_size()
    return (2 * len(cross_attentions(transformer)) + 1) * contexts * context_length * dim * itemsize


def restore_forwards(root: torch.nn.Module) -> None:
    """Drop the instance ``forward`` diffusers' ``HookRegistry.remove_hook`` leaves behind once no hook is left.

    Removing the last hook sets ``module.forward`` to the bound class method it captured: equivalent,
    but it would hide a later patch of the class's ``forward`` (by a host or a test). Modules are left
    as they were found.
    """
    for module in root.modules():
        registry = getattr(module, "_diffusers_hook", None)
        bound = module.__dict__.get("forward")
        if (registry is not None and not registry.hooks and bound is not None
                and getattr(bound, "__func__", None) is type(module).forward and getattr(bound, "__self__", None)
                is module):
            del module.__dict__["forward"]


@contextmanager
def text_kv_once(transformer: torch.nn.Module, enabled: bool = True) -> Iterator[TextKVStats | None]:
    """Within the block, the transformer computes each text context's embedding and K/V once.

    Yields the run's :class:`TextKVStats` (``None`` when disabled, or when the model has no Wan text
    embedder / cross-attention, or the hooks are already attached by an enclosing run).
    """
    embedder = getattr(getattr(transformer, "condition_embedder", None), "text_embedder", None)
    attentions = cross_attentions(transformer) if enabled else []
    if not enabled or embedder is None or not attentions:
        yield None
        return
    from diffusers.hooks.hooks import HookRegistry
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    if HookRegistry.check_if_exists_or_initialize(embedder).get_hook(TEXT_EMBEDDING_HOOK) is not None:
        yield None  # an enclosing run already caches
        return
    embedding_hook, attention_hook = _hook_classes()
    stats = TextKVStats(modules=len(attentions))
    memos: list[_Memo] = []
    attached: list[tuple[Any, str]] = []

    def attach(module: torch.nn.Module, hook: Any, name: str) -> None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        attached.append((module, name))

    try:
        memos.append(_Memo(stats))
        attach(embedder, embedding_hook(memos[-1]), TEXT_EMBEDDING_HOOK)
        for attn in attentions:
            memos.append(_Memo(stats))
            attach(attn, attention_hook(memos[-1], WanAttnProcessor), CROSS_ATTENTION_HOOK)
        yield stats
    finally:
        for module, name in reversed(attached):
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
            restore_forwards(module)
        for memo in memos:
            memo.clear()
