"""Opt-in speed-ups for stage two, attached to the transformer for one sampling run only.

:func:`sampling_speedups` wraps the denoising loop (``vace/sampler.py``) and, for that run only:

1. computes the text side of cross-attention once (:mod:`.text_kv`; exact, on by default);
2. turns on one of diffusers' step caches (``options.cache``; off by default): First Block Cache,
   MagCache, TaylorSeer (lite) or Pyramid Attention Broadcast. FasterCache is refused (see
   :data:`REFUSED`);
3. compiles the repeated transformer blocks with ``torch.compile`` (``options.compile``; off by default).

Everything is removed on exit, however the run ends (finished, cancelled, error), so nothing leaks
into the next run; the sampler calls each guidance branch inside ``transformer.cache_context(name)``,
which keeps a separate cache state per branch ("cond", "uncond", or "cond_uncond" when batched).

**The VACE hint path.** diffusers' ``WanVACETransformer3DModel`` runs all VACE blocks first and adds
their hints after main blocks 0, 2, 4, ... in its own ``forward``. First Block Cache and MagCache hook
only the main blocks: a skipped step would still run every VACE block and would add the hints onto a
state that already contains them. :class:`_LazyVaceHints` therefore moves each VACE block *into* the
main block that consumes its hint (the VACE block's call only records its inputs and hands back a
zero hint; the main block computes it and adds ``hint * scale`` itself). Same operations on the same
values, so the result is bit-identical without a cache; with one, a skipped step skips the VACE blocks
too and adds no hint twice.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnisonError
from .speed_args import CACHES, read_calibration, write_calibration
from .text_kv import TextKVStats, restore_forwards, text_kv_once

__all__ = ["CACHES", "read_calibration", "sampling_speedups", "write_calibration"]



@dataclass(frozen=True)
class CachePreset:
    """A cache's main setting for Wan 2.1 1.3B and where the number comes from."""

    knob: str  # what --cache-threshold sets for this cache
    value: float
    off_value: float  # the setting at which the cache never skips (== uncached result)
    source: str


#: Starting settings for Wan 2.1 1.3B (480P, 50 steps), from published runs where there are any; none was tuned
#: here (no GPU, no real weights).
PRESETS: dict[str, CachePreset] = {
    "first_block": CachePreset(
        "threshold (relative L1 change of the first block's residual)", 0.04, 0.0,
        "github.com/testdummyvt/diffsynth-wan-cache README: 0.03-0.04 usable for Wan2.1 1.3B (I2V), 0.06 not; "
        "diffusers' FirstBlockCacheConfig default is 0.05"),
    "magcache": CachePreset(
        "threshold (accumulated magnitude error E; K=2 skips in a row, retention 0.2)", 0.12, 0.0,
        "github.com/Zehong-Ma/MagCache MagCache4Wan2.1/README.md: Wan2.1 T2V 1.3B 480P E012K2R02 (~87 s vs ~189 s, "
        "A800) and E012K4R02 (~68 s)"),
    "taylorseer": CachePreset(
        "cache_interval (steps per full computation; 1 = never predict)", 5.0, 1.0,
        "no published Wan 1.3B setting: diffusers 0.42 apply_taylorseer_cache docstring example (FLUX.1-dev): "
        "cache_interval=5, max_order=1, disable_cache_before_step=3 (lite mode here: only the output projection is "
        "extrapolated)"),
    "pab": CachePreset(
        "spatial_attention_block_skip_range (self-attention computed every N calls; 1 = always)", 2.0, 1.0,
        "no published Wan 1.3B setting: huggingface.co/docs/diffusers/en/api/cache, PyramidAttentionBroadcastConfig "
        "example (CogVideoX-5b): spatial_attention_block_skip_range=2, timestep range (100, 800)"),
}

#: MagCache's published magnitude ratios for Wan2.1 T2V 1.3B, conditional branch, 50 steps (the first is the
#: padding 1.0): github.com/Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py, ``mag_ratios`` for
#: 'T2V-1.3B' (interleaved cond/uncond there; the even entries are taken, the odd ones differ by < 1e-3).
#: Calibrated on Wan2.1 T2V-1.3B, not on VACE-1.3B: calibrate for the model at hand (``--calibrate-cache``).
WAN21_T2V_13B_MAG_RATIOS = (
    1.0, 1.0124, 1.00166, 0.99791, 0.99682, 0.99634, 0.99567, 0.99416, 0.99578, 0.9957, 0.99511, 0.99535,
    0.99552, 0.99541, 0.9954, 0.99489, 0.99518, 0.99484, 0.99481, 0.99415, 0.99419, 0.99396, 0.99388, 0.99349,
    0.99309, 0.9927, 0.99228, 0.99171, 0.99137, 0.99068, 0.99005, 0.98944, 0.98849, 0.98758, 0.98644, 0.98504,
    0.9836, 0.98202, 0.97977, 0.97717, 0.9741, 0.97003, 0.96538, 0.9593, 0.95086, 0.94013, 0.92402, 0.90241,
    0.86821, 0.81838,
)

#: Caches that cannot run correctly on this transformer with this sampler, and why.
REFUSED = {
    "fastercache": "FasterCache approximates the unconditional branch from a batch laid out [uncond; cond] in one "
                   "forward (diffusers' FasterCacheDenoiserHook takes the second half as the conditional); the "
                   "pack's guidance runs [cond; neg] batched or as two separate passes, so it would reuse the wrong "
                   "half. Use first_block, magcache, taylorseer or pab.",
}

COMPILE_UNAVAILABLE = "torch.compile is not available here"


def check_options(options: Any) -> None:
    """Validate the speed fields of ``SamplingOptions`` (one clear error per field)."""
    if options.cache not in CACHES:
        raise UnisonError(f"sampling option cache={options.cache!r}: expected one of {', '.join(CACHES)}")
    if options.cache in REFUSED:
        raise UnisonError(f"cache {options.cache} cannot be used with the VACE transformer: "
                          f"{REFUSED[options.cache]}")
    value = options.cache_threshold
    if value is not None and options.cache == "none":
        raise UnisonError(f"sampling option cache_threshold={value!r} is set but no cache is chosen (cache=none)")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UnisonError(f"sampling option cache_threshold={value!r}: expected a finite number >= 0")
        if options.cache in ("taylorseer", "pab") and (value < 1 or value != int(value)):
            raise UnisonError(f"sampling option cache_threshold={value!r}: for {options.cache} it is "
                              f"{PRESETS[options.cache].knob}, an integer >= 1")
    if options.cache_ratios is not None:
        ratios = options.cache_ratios
        if options.cache != "magcache":
            raise UnisonError("sampling option cache_ratios is for cache=magcache only")
        if not ratios or not all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in ratios):
            raise UnisonError("sampling option cache_ratios: expected a non-empty list of positive magnitude ratios")
    if options.calibrate_cache is not None and options.cache != "magcache":
        raise UnisonError("sampling option calibrate_cache: calibration is for cache=magcache only")
    for name in ("text_kv_cache", "compile"):
        if not isinstance(getattr(options, name), bool):
            raise UnisonError(f"sampling option {name}={getattr(options, name)!r}: expected true or false")
    if options.compile and (problem := compile_problem()) is not None:
        raise UnisonError(f"{problem}; run without --compile (the Unison Speed node's compile off)")


def cache_setting(options: Any) -> float | None:
    """The cache's main setting: the given threshold or the preset's (``None`` without a cache)."""
    if options.cache == "none":
        return None
    return PRESETS[options.cache].value if options.cache_threshold is None else float(options.cache_threshold)


@dataclass
class SpeedReport:
    """What the speed-ups did in one run (notes, tests, benchmarks)."""

    text_kv: TextKVStats | None = None
    cache: str = "none"
    setting: float | None = None
    transformer_calls: int = 0  # forwards of the whole transformer
    tail_block_calls: int = 0  # forwards that really ran the last main block (a skipped step does not)
    compiled: int = 0  # blocks compiled
    calibration: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def skipped_calls(self) -> int:
        return self.transformer_calls - self.tail_block_calls


# --------------------------------------------------------------------------- hooks


def _registry(module: torch.nn.Module) -> Any:
    from diffusers.hooks.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(module)


@contextmanager
def _hook(module: torch.nn.Module, hook: Any, name: str) -> Iterator[Any]:
    _registry(module).register_hook(hook, name)
    try:
        yield hook
    finally:
        _registry(module).remove_hook(name, recurse=False)


def _model_hook() -> type:
    from diffusers.hooks.hooks import ModelHook

    return ModelHook


def _counting_hook(report: SpeedReport) -> Any:
    class CountCalls(_model_hook()):
        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            report.tail_block_calls += 1
            return self.fn_ref.original_forward(*args, **kwargs)

    return CountCalls()


class _HintState:
    """Inputs the VACE blocks were called with in the current forward, and the VACE stream so far."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[Any, ...]] = {}
        self.control: torch.Tensor | None = None
        self.scales: tuple[torch.Tensor, ...] | None = None
        self.runners: dict[int, Any] = {}

    def clear(self) -> None:
        self.pending.clear()
        self.control = self.scales = None


@contextmanager
def _lazy_vace_hints(transformer: torch.nn.Module) -> Iterator[None]:
    """Compute each VACE block inside the main block that consumes its hint (see the module docstring)."""
    layers = list(transformer.config.vace_layers)
    state = _HintState()
    ModelHook = _model_hook()

    class RecordVaceInputs(ModelHook):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

        def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Any,
                        control_hidden_states: torch.Tensor, temb: Any, rotary_emb: Any) -> Any:
            state.pending[self.index] = (hidden_states, encoder_hidden_states, temb, rotary_emb)
            if self.index == 0:
                state.control = control_hidden_states
            # A zero hint: the transformer's own "+ hint * scale" then adds exact zeros.
            return hidden_states.new_zeros(()), control_hidden_states

        def run(self) -> torch.Tensor:
            hidden_states, context, temb, rotary = state.pending.pop(self.index)
            hint, state.control = self.fn_ref.original_forward(hidden_states, context, state.control, temb, rotary)
            return hint

    class AddHint(ModelHook):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            out = self.fn_ref.original_forward(*args, **kwargs)
            hint = state.runners[self.index].run()
            # diffusers' WanVACETransformer3DModel.forward: hidden_states + control_hint.to(device) * scale
            return out + hint.to(out.device) * state.scales[self.index]

    def capture_scales(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        scale = kwargs.get("control_hidden_states_scale")
        if scale is None:
            control = kwargs.get("control_hidden_states")
            scale = control.new_ones(len(layers))  # the forward's own default
        state.clear()
        state.scales = torch.unbind(scale)

    with ExitStack() as stack:
        handle = transformer.register_forward_pre_hook(capture_scales, with_kwargs=True)
        stack.callback(handle.remove)
        stack.callback(state.clear)
        for k, block in enumerate(transformer.vace_blocks):
            state.runners[k] = stack.enter_context(_hook(block, RecordVaceInputs(k), "unison_vace_record"))
        for k, layer in enumerate(layers):
            stack.enter_context(_hook(transformer.blocks[layer], AddHint(k), "unison_vace_hint"))
        yield


@contextmanager
def _timestep_tracker(transformer: torch.nn.Module) -> Iterator[list[float]]:
    """The timestep of the forward being run (for Pyramid Attention Broadcast's timestep range)."""
    current = [1000.0]

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(timestep, torch.Tensor):
            current[0] = float(timestep.flatten()[0])

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield current
    finally:
        handle.remove()


def _per_branch_pab(transformer: torch.nn.Module) -> None:
    """Give each Pyramid Attention Broadcast hook one state per guidance branch.

    diffusers' ``PyramidAttentionBroadcastHook`` keeps a single state per attention layer, so with
    two-pass guidance the negative pass would take the conditional pass's cached attention. A
    ``StateManager`` on the hook is what ``transformer.cache_context(name)`` switches per branch.
    """
    from diffusers.hooks.hooks import StateManager
    from diffusers.hooks.pyramid_attention_broadcast import (
        _PYRAMID_ATTENTION_BROADCAST_HOOK,
        PyramidAttentionBroadcastHook,
        PyramidAttentionBroadcastState,
    )

    class PerBranchPAB(PyramidAttentionBroadcastHook):
        @property
        def state(self) -> Any:
            return self.state_manager.get_state()

        @state.setter
        def state(self, value: Any) -> None:  # initialize_hook's single state is not used
            pass

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            self.state_manager.reset()
            return module

    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK) if registry is not None else None
        if hook is not None:
            hook.state_manager = StateManager(PyramidAttentionBroadcastState)
            hook.__class__ = PerBranchPAB


def continue_in_branches(transformer: torch.nn.Module, batched: str = "cond_uncond",
                         branches: tuple[str, ...] = ("cond", "uncond")) -> None:
    """Start the two-pass branches' MagCache states at the step the batched one reached.

    When batched guidance runs out of memory mid-run, the sampler goes on with one forward per
    branch under new cache contexts, whose states diffusers creates fresh. MagCache's
    ``step_index`` indexes its magnitude ratios and its never-skipped first steps: from 0 again,
    the rest of the run would use the early steps' ratios. The fresh state has no residual yet, so
    its first step computes either way. The other caches need no handover: First Block Cache keys
    on no step, and TaylorSeer and PAB warm up again from a fresh state (computing, never guessing).
    """
    from diffusers.hooks.hooks import CacheContext, StateManager
    from diffusers.hooks.mag_cache import MagCacheState

    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in (registry.hooks.values() if registry is not None else ()):
            for manager in [value for value in vars(hook).values() if isinstance(value, StateManager)]:
                manager.set_context(CacheContext(batched))
                reached = manager.get_state()
                if isinstance(reached, MagCacheState):
                    for name in branches:
                        manager.set_context(CacheContext(name))
                        manager.get_state().step_index = reached.step_index
                manager.set_context(None)


def cache_config(options: Any, timestep: list[float] | None = None) -> Any:
    """The diffusers config object for ``options.cache`` at its setting (``None`` for ``none``)."""
    name, value = options.cache, cache_setting(options)
    if name == "none":
        return None
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    if name == "first_block":
        return FirstBlockCacheConfig(threshold=value)
    if name == "magcache":
        if options.calibrate_cache is not None:
            # One more step than the run: diffusers resets (and forgets) the ratios after the last step.
            return MagCacheConfig(calibrate=True, num_inference_steps=options.steps + 1)
        ratios = list(options.cache_ratios or WAN21_T2V_13B_MAG_RATIOS)
        # A ratio of exactly 1 adds no error, so threshold 0 alone could still skip: 0 means never (K = 0).
        return MagCacheConfig(threshold=value, max_skip_steps=2 if value > 0 else 0, retention_ratio=0.2,
                              num_inference_steps=options.steps, mag_ratios=ratios)
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=int(value), disable_cache_before_step=3, max_order=1,
                                     taylor_factors_dtype=torch.float32, use_lite_mode=True)
    if name == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(value),
                                               spatial_attention_timestep_skip_range=(100, 800),
                                               current_timestep_callback=lambda: (timestep or [1000.0])[0])
    raise UnisonError(f"cache {name!r} is not available")


@contextmanager
def _step_cache(transformer: torch.nn.Module, options: Any, report: SpeedReport) -> Iterator[None]:
    if options.cache == "none":
        yield
        return
    if not hasattr(transformer, "enable_cache") or not hasattr(transformer, "vace_blocks"):
        raise UnisonError(f"cache {options.cache}: this transformer ({type(transformer).__name__}) is not diffusers' "
                          "WanVACETransformer3DModel")
    if transformer.is_cache_enabled:
        raise UnisonError(f"cache {options.cache}: another cache is already enabled on this transformer "
                          f"({type(transformer._cache_config).__name__}); disable it first")
    with ExitStack() as stack:
        if options.cache in ("first_block", "magcache"):
            stack.enter_context(_lazy_vace_hints(transformer))
        timestep = stack.enter_context(_timestep_tracker(transformer)) if options.cache == "pab" else None
        transformer.enable_cache(cache_config(options, timestep))
        stack.callback(transformer.disable_cache)
        if options.cache == "pab":
            _per_branch_pab(transformer)
        yield
        if options.calibrate_cache is not None:
            report.calibration = _calibrated_ratios(transformer)


def _calibrated_ratios(transformer: torch.nn.Module) -> list[float]:
    """MagCache's measured ratios of this run, conditional branch (batched: both branches together)."""
    from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK

    hook = _registry(transformer.blocks[0]).get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK)
    states = hook.state_manager._state_cache if hook is not None else {}
    for name in ("cond", "cond_uncond", *states):
        if name in states and states[name].calibration_ratios:
            return [float(r) for r in states[name].calibration_ratios]
    raise UnisonError("MagCache calibration measured nothing (was the transformer called?)")


# --------------------------------------------------------------------------- compile


def compile_problem() -> str | None:
    """Why ``torch.compile`` cannot work on this machine, or ``None`` when it may."""
    if not hasattr(torch, "compile"):
        return f"{COMPILE_UNAVAILABLE} (torch {torch.__version__} has no torch.compile)"
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return f"{COMPILE_UNAVAILABLE}: its GPU code generator needs the triton package, which is not installed"
        return None
    if not any(shutil.which(cc) for cc in (os.environ.get("CXX", "") or "g++", "g++", "c++", "clang++", "cl")):
        return f"{COMPILE_UNAVAILABLE}: compiling for the CPU needs a C++ compiler (g++, clang++ or cl) on PATH"
    return None


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks regional compilation compiles (diffusers' ``_repeated_blocks`` classes)."""
    names = set(getattr(transformer, "_repeated_blocks", ()) or ())
    return [m for m in transformer.modules() if type(m).__name__ in names]


def _is_compile_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or "torch._dynamo" in str(type(exc))


@contextmanager
def _compiled(transformer: torch.nn.Module, on: bool, report: SpeedReport) -> Iterator[None]:
    """Regional compilation (each repeated block through ``torch.compile``) for the block, undone after."""
    if not on:
        yield
        return
    problem = compile_problem()
    if problem is not None:
        raise UnisonError(f"{problem}; run without --compile (the Unison Speed node's compile off)")
    blocks = repeated_blocks(transformer)
    if not blocks:
        raise UnisonError(f"--compile: {type(transformer).__name__} declares no repeated blocks to compile")
    try:
        for block in blocks:
            block.compile()
        report.compiled = len(blocks)
        yield
    except Exception as exc:
        if _is_compile_error(exc):
            cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
            lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
            reason = f"{type(cause).__name__}: {lines[0][:300]}" if lines else type(cause).__name__
            raise UnisonError(f"torch.compile failed on this platform ({type(exc).__name__}, {reason}); "
                              "run without --compile (the Unison Speed node's compile off)") from exc
        raise
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # back to eager: nn.Module.compile keeps the compiled call here


# --------------------------------------------------------------------------- the run


@contextmanager
def sampling_speedups(transformer: torch.nn.Module, options: Any) -> Iterator[SpeedReport]:
    """Attach the run's speed-ups to ``transformer`` for the block; everything is removed on exit."""
    report = SpeedReport(cache=options.cache, setting=cache_setting(options))

    def count_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        report.transformer_calls += 1

    if getattr(transformer, "_parallel_config", None) is not None and (options.cache != "none" or options.compile):
        # Context parallelism (unison_runtime/parallel): the other ranks run the transformer without these
        # hooks, and a cache decides from this rank's shard: skipped blocks would leave their collectives waiting.
        raise UnisonError("a step cache or --compile cannot run with context parallelism (the other processes would "
                          "not skip or compile the same blocks); run without --cache/--compile, or on one process")
    with ExitStack() as stack:
        stack.callback(restore_forwards, transformer)  # last: after every hook below is gone
        report.text_kv = stack.enter_context(text_kv_once(transformer, options.text_kv_cache))
        if options.cache != "none":
            handle = transformer.register_forward_pre_hook(count_call, with_kwargs=True)
            stack.callback(handle.remove)
            stack.enter_context(_hook(transformer.blocks[-1], _counting_hook(report), "unison_count_calls"))
        stack.enter_context(_step_cache(transformer, options, report))
        stack.enter_context(_compiled(transformer, options.compile, report))
        yield report
    if options.cache != "none" and report.transformer_calls:
        report.notes.append(f"cache {options.cache} ({PRESETS[options.cache].knob.split(' (')[0]} {report.setting:g}): "
                            f"the blocks ran in {report.tail_block_calls} of {report.transformer_calls} transformer "
                            "calls")
