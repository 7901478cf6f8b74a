"""Unison Speed: opt-in speed-ups for the Unison VACE Sampler (issue 19; the engine is ``vace/speed.py``)."""

from __future__ import annotations

from typing import Any

from ._runtime import runtime_module

#: The node's output type, read by the Unison VACE Sampler's optional ``speed`` input.
SPEED = "UNISON_SPEED"
#: vace.speed_args.CACHES without fastercache (refused on this transformer), repeated so INPUT_TYPES stays import-light.
CACHES = ("none", "first_block", "magcache", "taylorseer", "pab")
PRESET = -1.0  # the threshold widget's "use the cache's preset" value


class UnisonSpeed:
    DESCRIPTION = ("Speed settings for the Unison VACE Sampler: one of diffusers' step caches (skips transformer work "
                   "on steps that change little; results differ slightly), regional torch.compile of the transformer "
                   "blocks, and the exact text key/value cache (on by default). Wire it to the sampler's speed input; "
                   "not connected, the sampler runs uncached and uncompiled.")
    CATEGORY = "Unison"
    FUNCTION = "settings"
    RETURN_TYPES = (SPEED,)
    RETURN_NAMES = ("speed",)
    OUTPUT_TOOLTIPS = ("Speed settings for the Unison VACE Sampler's speed input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "cache": (list(CACHES), {
                    "default": "none",
                    "tooltip": "none: every step computed. first_block: First Block Cache (skip the other blocks "
                               "when the first block's change is below the threshold). magcache: MagCache "
                               "(magnitude ratios, published Wan2.1 1.3B ratios). taylorseer: TaylorSeer lite "
                               "(extrapolates the output between full steps). pab: Pyramid Attention Broadcast "
                               "(reuses self-attention within a timestep range)."}),
                "threshold": ("FLOAT", {
                    "default": PRESET, "min": PRESET, "max": 100.0, "step": 0.01, "round": 0.001,
                    "tooltip": "The cache's main setting; -1 = its preset for Wan 2.1 1.3B (first_block 0.04, "
                               "magcache 0.12, taylorseer interval 5, pab skip range 2). first_block/magcache: 0 "
                               "never skips; taylorseer/pab: a whole number, 1 never skips."}),
                "compile": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "torch.compile the repeated transformer blocks (the first steps are slow while it "
                               "compiles; needs a C++ compiler on the CPU, triton on a GPU)."}),
                "text_kv_cache": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Compute the cross-attention keys/values of the text once per run instead of every "
                               "step: the same result, less work, more memory (about 0.5 GiB per guidance branch "
                               "for the 1.3B model in bf16)."}),
            },
        }

    def settings(self, cache: str, threshold: float = PRESET, compile: bool = False,
                 text_kv_cache: bool = True) -> tuple[dict[str, Any]]:
        values: dict[str, Any] = {"cache": cache, "compile": bool(compile), "text_kv_cache": bool(text_kv_cache)}
        if cache != "none" and threshold != PRESET:
            values["cache_threshold"] = float(threshold)
        runtime_module("vace.sampler").SamplingOptions(**values)  # a bad combination fails here, on this node
        return (values,)
