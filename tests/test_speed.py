"""Stage-two speed-ups (issue 19): text K/V once (exact), diffusers' step caches, regional compile.

Every comparison runs the real sampler on a tiny random VACE model (4 layers, VACE blocks on 0 and 2)
against the same sampler with the speed-up off, on the same seed and contexts.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from unison_runtime.errors import SamplingCancelled, UnisonError
from unison_runtime.plan import MediaRef, default_plan
from unison_runtime.testing.tiny_wan import TinyVaceDims, build_tiny_vace_diffusers
from unison_runtime.vace import sampler, speed, text_kv
from unison_runtime.vace.loading import load_vace_diffusers
from unison_runtime.vace.sources import VaceInputs

DIMS = TinyVaceDims(num_layers=4, vace_layers=(0, 2))
CONTEXT = 516  # umT5's 512 positions + Unison's 4 projector tokens (the reference pads to 2048: same code path)
STEPS = 5
CACHES = ("first_block", "magcache", "taylorseer", "pab")
#: Settings that skip work on this tiny random model (the published presets rarely trigger on random weights).
SKIPPING = {"first_block": 0.5, "magcache": 0.3, "taylorseer": 3, "pab": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is as fast, and spares the shared machine OpenMP's spin-waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return load_vace_diffusers(build_tiny_vace_diffusers(tmp_path_factory.mktemp("vace") / "vace", dims=DIMS),
                               device="cpu")


def _task(kind: str) -> tuple:
    if kind == "t2v":
        plan = default_plan("text_to_video", width=32, height=32, num_frames=5)
        refs = torch.zeros(0, 32, 32, 3)
    else:  # a reference task: two reference images prepended in time
        media = tuple(MediaRef(f"r{i}.png", "image", "reference") for i in range(2))
        plan = default_plan("video_reference", media, width=32, height=32, num_frames=5)
        refs = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    inputs = VaceInputs(frames=torch.full((5, 32, 32, 3), 0.5), masks=torch.ones(5, 32, 32), references=refs)
    return plan, inputs


def _contexts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, CONTEXT, DIMS.text_dim, generator=g), torch.randn(1, CONTEXT, DIMS.text_dim, generator=g)


def _sample(models, kind: str, contexts=None, **options) -> sampler.Generation:
    plan, inputs = _task(kind)
    cond, neg = contexts or _contexts()
    return sampler.sample(models, plan, inputs, cond, neg, sampler.SamplingOptions(steps=STEPS, **options))


_PREPARED: dict[str, sampler.PreparedLatents] = {}


def _denoise(models, kind: str, contexts=None, **options) -> torch.Tensor:
    """The denoising loop alone (final latents): the VAE is not part of what is compared here."""
    if kind not in _PREPARED:
        _PREPARED[kind] = sampler.prepare_latents(models, _task(kind)[1], 0)
    cond, neg = contexts or _contexts()
    hooks = {name: options.pop(name) for name in ("notes", "progress", "cancel") if name in options}
    return sampler.denoise(models, _PREPARED[kind], cond, neg, sampler.SamplingOptions(steps=STEPS, **options),
                           **hooks)


def _hook_names(transformer) -> set[str]:
    names = set()
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            names.update(registry.hooks)
    return names


# --------------------------------------------------------------------------- text K/V once


@pytest.mark.parametrize("batch_cfg", [False, True], ids=["two-pass", "batched"])
@pytest.mark.parametrize("kind", ["t2v", "reference"])
def test_text_kv_once_gives_bit_identical_frames(models, kind, batch_cfg) -> None:
    slow = _sample(models, kind, batch_cfg=batch_cfg, text_kv_cache=False)
    fast = _sample(models, kind, batch_cfg=batch_cfg)
    assert torch.equal(slow.frames, fast.frames)


@pytest.mark.parametrize("batch_cfg", [False, True], ids=["two-pass", "batched"])
def test_text_kv_is_computed_once_per_context_and_reused_every_later_step(models, batch_cfg) -> None:
    _plan, inputs = _task("t2v")
    prepared = sampler.prepare_latents(models, inputs, 0)
    cond, neg = _contexts()
    seen = []
    real = text_kv.text_kv_once

    def spy(transformer, enabled=True):
        context = real(transformer, enabled)

        class Wrapped:
            def __enter__(self):
                seen.append(context.__enter__())
                return seen[-1]

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Wrapped()

    options = sampler.SamplingOptions(steps=STEPS, batch_cfg=batch_cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speed, "text_kv_once", spy)
        sampler.denoise(models, prepared, cond, neg, options)
    stats = seen[0]
    attentions = len(text_kv.cross_attentions(models.transformer))
    assert stats.modules == attentions == DIMS.num_layers + len(DIMS.vace_layers)
    contexts = 1 if batch_cfg else 2  # [cond; neg] as one tensor, or each alone
    per_call = 1 + attentions  # the text embedding + K/V of every cross-attention
    assert stats.computed == contexts * per_call
    assert stats.reused == (STEPS - 1) * contexts * per_call
    assert stats.passed_through == 0


def _instance_forwards(transformer) -> list[str]:
    return [name for name, module in transformer.named_modules() if "forward" in module.__dict__]


def test_text_kv_hooks_are_removed_after_a_run_and_after_an_interrupt(models) -> None:
    before = _hook_names(models.transformer)
    _denoise(models, "t2v")
    assert _hook_names(models.transformer) == before
    assert _instance_forwards(models.transformer) == []  # every module is back to its class's forward
    calls = []

    def cancel() -> bool:
        calls.append(1)
        inside = _hook_names(models.transformer)
        assert {text_kv.TEXT_EMBEDDING_HOOK, text_kv.CROSS_ATTENTION_HOOK} <= inside or len(calls) == 1
        return len(calls) == 3

    with pytest.raises(SamplingCancelled):
        _denoise(models, "t2v", cancel=cancel)
    assert _hook_names(models.transformer) == before


def test_another_context_in_the_next_run_is_not_served_the_old_keys(models) -> None:
    other = _contexts(seed=7)
    _denoise(models, "t2v")  # fills (and must drop) the memo for the first contexts
    fast = _denoise(models, "t2v", contexts=other)
    slow = _denoise(models, "t2v", contexts=other, text_kv_cache=False)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("inference_mode", [False, True], ids=["no_grad", "inference_mode"])
def test_a_context_changed_in_place_during_the_run_is_computed_again(models, inference_mode) -> None:
    """Keyed by the tensor's memory and version counter; under inference mode (ComfyUI) only memory
    counts, so there the test changes the context by handing a new tensor instead."""
    _plan, inputs = _task("t2v")
    prepared = sampler.prepare_latents(models, inputs, 0)

    def run(text_kv_cache: bool) -> torch.Tensor:
        cond, neg = _contexts()
        options = sampler.SamplingOptions(steps=STEPS, batch_cfg=False, text_kv_cache=text_kv_cache)

        def progress(step: int, total: int) -> None:
            if step == 2 and not inference_mode:
                cond.mul_(0.5)  # the sampler holds this very tensor (fp32 on the CPU)

        scope = torch.inference_mode() if inference_mode else torch.no_grad()
        with scope:
            if inference_mode:
                cond, neg = cond.clone(), neg.clone()
            return sampler.denoise(models, prepared, cond, neg, options, progress=progress)

    assert torch.equal(run(True), run(False))


def test_cache_bytes_counts_embedding_and_keys_values_of_every_cross_attention(models) -> None:
    per_row = CONTEXT * DIMS.heads * DIMS.head_dim * 4  # fp32
    assert text_kv.cache_bytes(models.transformer, CONTEXT) == (2 * 6 + 1) * 2 * per_row


# --------------------------------------------------------------------------- step caches


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("batch_cfg", [False, True], ids=["two-pass", "batched"])
@pytest.mark.parametrize("kind", ["t2v", "reference"])
def test_a_cache_that_never_skips_gives_the_uncached_frames(models, cache, batch_cfg, kind) -> None:
    off = speed.PRESETS[cache].off_value
    base = _denoise(models, kind, batch_cfg=batch_cfg)
    cached = _denoise(models, kind, batch_cfg=batch_cfg, cache=cache, cache_threshold=off)
    assert torch.equal(base, cached)


def _count_block_calls(monkeypatch) -> dict[str, int]:
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    from diffusers.models.transformers.transformer_wan_vace import WanVACETransformerBlock

    counts = {"main": 0, "vace": 0}
    for key, cls in (("main", WanTransformerBlock), ("vace", WanVACETransformerBlock)):
        original = cls.forward

        def counted(self, *args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    return counts


@pytest.mark.parametrize("cache", ["first_block", "magcache", "taylorseer"])
def test_skipped_steps_skip_the_transformer_blocks_vace_blocks_included(models, cache, monkeypatch) -> None:
    counts = _count_block_calls(monkeypatch)
    notes: list[str] = []
    _denoise(models, "t2v", batch_cfg=False, cache=cache, cache_threshold=SKIPPING[cache], notes=notes)
    calls = 2 * STEPS  # two-pass guidance
    assert 0 < counts["main"] < calls * DIMS.num_layers
    assert 0 < counts["vace"] < calls * len(DIMS.vace_layers)
    note = [n for n in notes if n.startswith(f"cache {cache}")]
    assert note and f"of {calls} transformer calls" in note[0]
    ran = int(note[0].split("ran in ")[1].split(" of")[0])
    assert ran < calls
    layers, vace = DIMS.num_layers, len(DIMS.vace_layers)
    if cache == "first_block":  # the first block (and the VACE block feeding it) runs every call to decide
        assert counts == {"main": calls + ran * (layers - 1), "vace": calls + ran * (vace - 1)}
    else:  # decided before any block runs (magcache) / whole blocks predicted (taylorseer lite)
        assert counts == {"main": ran * layers, "vace": ran * vace}


def test_pab_skips_self_attention_calls(models, monkeypatch) -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    calls = {"self": 0}
    original = WanAttnProcessor.__call__

    def counted(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None:
            calls["self"] += 1
        return original(self, attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(WanAttnProcessor, "__call__", counted)
    _denoise(models, "t2v", batch_cfg=False, cache="pab", cache_threshold=1)
    every = calls["self"]
    calls["self"] = 0
    _denoise(models, "t2v", batch_cfg=False, cache="pab", cache_threshold=2)
    assert 0 < calls["self"] < every


@pytest.mark.parametrize("cache", CACHES)
def test_the_branches_keep_separate_cache_state(models, cache) -> None:
    """Two passes ("cond", "uncond") and one batched call ("cond_uncond") decide alike when each branch
    keeps its own state; a state shared between the passes would hand the negative pass the
    conditional pass's cached values and move the result far away."""
    two_pass = _denoise(models, "t2v", batch_cfg=False, cache=cache, cache_threshold=SKIPPING[cache])
    batched = _denoise(models, "t2v", batch_cfg=True, cache=cache, cache_threshold=SKIPPING[cache])
    uncached = _denoise(models, "t2v")
    torch.testing.assert_close(two_pass, batched, atol=1e-4, rtol=1e-4)
    assert (two_pass - uncached).abs().max() > 1e-3  # the setting really skipped something


@pytest.mark.parametrize("cache", CACHES)
def test_cache_hooks_are_attached_during_the_run_and_removed_after_it_and_after_an_interrupt(models, cache) -> None:
    transformer = models.transformer
    before = _hook_names(transformer)
    inside: list[set[str]] = []

    def progress(step: int, total: int) -> None:
        inside.append(_hook_names(transformer))
        assert transformer.is_cache_enabled

    _denoise(models, "t2v", cache=cache, progress=progress)
    assert len(inside) == STEPS and inside[0] - before
    assert _hook_names(transformer) == before and not transformer.is_cache_enabled

    def cancel() -> bool:
        return transformer.is_cache_enabled  # stop at the first step that has the cache on

    with pytest.raises(SamplingCancelled):
        _denoise(models, "t2v", cache=cache, cache_threshold=SKIPPING[cache], cancel=cancel)
    assert _hook_names(transformer) == before and not transformer.is_cache_enabled
    assert _instance_forwards(transformer) == []
    # the next run starts clean: the same as a run after a finished one
    after_interrupt = _denoise(models, "t2v", cache=cache, cache_threshold=SKIPPING[cache])
    after_finished = _denoise(models, "t2v", cache=cache, cache_threshold=SKIPPING[cache])
    assert torch.equal(after_interrupt, after_finished)


def test_fastercache_is_refused_with_the_reason() -> None:
    with pytest.raises(UnisonError, match=r"fastercache cannot be used.*\[uncond; cond\].*wrong half"):
        sampler.SamplingOptions(cache="fastercache")


@pytest.mark.parametrize("fields, message", [
    ({"cache": "teacache"}, "cache='teacache': expected one of none, first_block"),
    ({"cache": "first_block", "cache_threshold": -1}, "cache_threshold=-1: expected a finite number >= 0"),
    ({"cache_threshold": 0.1}, "cache_threshold=0.1 is set but no cache is chosen"),
    ({"cache": "taylorseer", "cache_threshold": 2.5}, "an integer >= 1"),
    ({"cache": "pab", "cache_threshold": 0}, "an integer >= 1"),
    ({"cache": "first_block", "cache_ratios": (1.0,)}, "cache_ratios is for cache=magcache only"),
    ({"cache": "magcache", "cache_ratios": (1.0, -2.0)}, "positive magnitude ratios"),
    ({"calibrate_cache": "x.json"}, "calibration is for cache=magcache only"),
    ({"compile": "yes"}, "compile='yes': expected true or false"),
])
def test_bad_speed_options_are_one_clear_error(fields, message) -> None:
    with pytest.raises(UnisonError, match=message.replace("[", r"\[").replace("(", r"\(")):
        sampler.SamplingOptions(**fields)


def test_magcache_calibration_writes_ratios_that_a_run_can_use(models, tmp_path) -> None:
    path = tmp_path / "ratios.json"
    calibrating = _denoise(models, "t2v", cache="magcache", calibrate_cache=str(path))
    assert torch.equal(calibrating, _denoise(models, "t2v"))  # calibration never skips
    data = json.loads(path.read_text())
    assert data["steps"] == STEPS and len(data["mag_ratios"]) == STEPS and data["mag_ratios"][0] == 1.0
    ratios = speed.read_calibration(path)
    assert all(r > 0 for r in ratios)
    _denoise(models, "t2v", cache="magcache", cache_ratios=ratios)


def test_calibration_ratios_are_the_residual_norm_ratios(models, tmp_path) -> None:
    """Checked independently: ratio_t = mean over tokens of |r_t| / |r_{t-1}|, r = last block out - first block in."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    residuals: list[torch.Tensor] = []
    first, last = models.transformer.blocks[0], models.transformer.blocks[-1]
    held = {}
    h1 = first.register_forward_pre_hook(lambda m, a: held.__setitem__("in", a[0]))
    h2 = last.register_forward_hook(lambda m, a, out: residuals.append(out - held["in"]))
    assert isinstance(first, WanTransformerBlock)
    try:
        _denoise(models, "t2v", batch_cfg=True, cache="magcache", calibrate_cache=str(tmp_path / "r.json"))
    finally:
        h1.remove()
        h2.remove()
    measured = json.loads((tmp_path / "r.json").read_text())["mag_ratios"]
    expected = [1.0] + [float((torch.linalg.norm(b.float(), dim=-1) / (torch.linalg.norm(a.float(), dim=-1) + 1e-8))
                              .mean()) for a, b in itertools.pairwise(residuals)]
    assert measured == pytest.approx(expected, rel=1e-5)


def test_read_calibration_refuses_a_bad_file(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"mag_ratios": "fast"}')
    with pytest.raises(UnisonError, match=r"bad.json: expected"):
        speed.read_calibration(bad)
    with pytest.raises(UnisonError, match="cannot read it as JSON"):
        speed.read_calibration(tmp_path / "missing.json")


def test_published_ratios_are_one_per_step_of_the_50_step_run() -> None:
    assert len(speed.WAN21_T2V_13B_MAG_RATIOS) == 50 and speed.WAN21_T2V_13B_MAG_RATIOS[0] == 1.0


# --------------------------------------------------------------------------- compile


def test_compile_without_a_compiler_is_one_clear_line(models, monkeypatch) -> None:
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnisonError, match=r"^torch.compile is not available here: compiling for the CPU needs a "
                                          r"C\+\+ compiler .*; run without --compile"):
        _denoise(models, "t2v", compile=True)
    assert all(block._compiled_call_impl is None for block in speed.repeated_blocks(models.transformer))


def test_a_compile_failure_is_reported_clearly_and_the_blocks_go_back_to_eager(models, monkeypatch) -> None:
    def failing_backend(graph, example_inputs):
        raise RuntimeError("simulated: the C++ compiler crashed")

    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend=failing_backend))
    torch._dynamo.reset()
    with pytest.raises(UnisonError, match=r"^torch.compile failed on this platform \(BackendCompilerFailed, "
                                          r"RuntimeError: simulated: the C\+\+ compiler crashed\); run without "
                                          r"--compile"):
        _denoise(models, "t2v", compile=True)
    assert all(block._compiled_call_impl is None for block in speed.repeated_blocks(models.transformer))
    torch._dynamo.reset()
    assert torch.equal(_denoise(models, "t2v"), _denoise(models, "t2v", text_kv_cache=False))


def test_magcache_threshold_zero_never_skips_even_on_ratios_of_exactly_one(models) -> None:
    notes: list[str] = []
    cached = _denoise(models, "t2v", cache="magcache", cache_threshold=0.0, cache_ratios=(1.0,) * STEPS, notes=notes)
    assert torch.equal(cached, _denoise(models, "t2v"))
    assert f"ran in {STEPS} of {STEPS} transformer calls" in " ".join(notes)  # batched: one call per step


def test_caches_and_compile_are_refused_under_context_parallelism(models, monkeypatch) -> None:
    """The other ranks run the transformer without these hooks: a skipped block would leave them waiting."""
    monkeypatch.setattr(models.transformer, "_parallel_config", object(), raising=False)
    with pytest.raises(UnisonError, match="cannot run with context parallelism"):
        _denoise(models, "t2v", cache="first_block")
    assert torch.equal(_denoise(models, "t2v"), _denoise(models, "t2v", text_kv_cache=False))  # K/V once: local, exact


def test_magcache_two_passes_continue_at_the_step_batched_guidance_reached(models, monkeypatch) -> None:
    from diffusers.hooks.mag_cache import MagCacheHeadHook

    seen: list[tuple[str, int]] = []
    original = MagCacheHeadHook.new_forward

    def recorded(self, module, *args, **kwargs):
        seen.append((self.state_manager._context.name, self.state_manager.get_state().step_index))
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(MagCacheHeadHook, "new_forward", recorded)
    batched_calls = []

    def oom_at_third_batched_step(module, args, kwargs):
        if kwargs["hidden_states"].shape[0] == 2:
            batched_calls.append(1)
            if len(batched_calls) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = models.transformer.register_forward_pre_hook(oom_at_third_batched_step, with_kwargs=True)
    notes: list[str] = []
    try:
        _denoise(models, "t2v", cache="magcache", cache_threshold=SKIPPING["magcache"], notes=notes)
    finally:
        handle.remove()
    assert any("ran out of memory at step 3" in note for note in notes)
    steps = {name: [step for branch, step in seen if branch == name] for name in ("cond_uncond", "cond", "uncond")}
    assert steps["cond_uncond"] == [0, 1]  # the third batched forward failed before any block ran
    # The ratio table goes on at step index 2 for both branches, not at 0 again.
    assert steps["cond"] == steps["uncond"] == list(range(2, STEPS))
