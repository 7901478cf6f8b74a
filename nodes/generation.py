"""Stage two in the graph: Projector (hidden states → tokens), VACE Inputs (plan → native VACE
tensors) and the VACE Sampler (plan + models → frames)."""

from __future__ import annotations

import functools
import logging
from typing import Any

from . import comfy_bridge as comfy
from . import previews
from . import vram_estimate as estimate
from ._runtime import errors, runtime_module
from .packets import HIDDEN, PLAN, PROJECTOR, TOKENS, VACE, generation_packet
from .speed import SPEED

log = logging.getLogger(__name__)

NOISE_DEVICES = ("cpu", "device")  # vace.sampler.NOISE_DEVICES, repeated so INPUT_TYPES stays import-light
REFERENCE_CONTEXT_LENGTH = 2048  # projector.REFERENCE_CONTEXT_LENGTH, repeated so INPUT_TYPES stays import-light
# The editor holds numbers as JS doubles: above 2**53 a typed seed is not what is sent (ComfyUI's
# own 0xFFFFFFFFFFFFFFFF maximum even rounds up to 2**64, past the maximum), so the range stops there.
MAX_SEED = 2**53 - 1
_GENERATE_INSTEAD = "there is nothing to generate (wire the Task Router's image or video output here)"


# --------------------------------------------------------------------------- projector


class UnisonProjector:
    DESCRIPTION = ("Turns stage one's hidden states into Unison's extra text tokens. Optionally appends them to a "
                   "native Wan CONDITIONING (positive) and pads both branches to the reference context length, "
                   "for ComfyUI's own WanVaceToVideo + KSampler path.")
    CATEGORY = "Unison"
    FUNCTION = "project"
    RETURN_TYPES = (TOKENS, "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("tokens", "positive", "negative")
    OUTPUT_TOOLTIPS = (
        "The projector tokens [1, 4, 4096] for the Unison VACE Sampler (empty with the rule planner).",
        "The positive conditioning with the tokens appended (and zero-padded to context_length).",
        "The negative conditioning, zero-padded to context_length (no tokens: the reference adds none there).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "projector": (PROJECTOR, {"tooltip": "From Unison Projector Loader."}),
                "hidden": (HIDDEN, {"tooltip": "Stage one's hidden states from the Unison Planner (empty with the "
                                               "rule planner: then no tokens are added)."}),
                "context_length": ("INT", {
                    "default": REFERENCE_CONTEXT_LENGTH, "min": 0, "max": 8192,
                    "tooltip": "Zero-pad both conditionings to this many positions, as the reference does (2048); "
                               "0 = no padding."}),
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "Native Wan text conditioning (umT5 of the prompt) to append "
                                                         "the tokens to."}),
                "negative": ("CONDITIONING", {"tooltip": "Native Wan negative conditioning, padded the same way."}),
            },
        }

    def project(self, projector: Any, hidden: Any, context_length: int = REFERENCE_CONTEXT_LENGTH,
                positive: Any = None, negative: Any = None) -> dict[str, Any]:
        module = runtime_module("projector")
        notes = []
        tokens = None
        if hidden is None:
            notes.append("no hidden states (the rule planner decided): no projector tokens are added")
        else:
            tokens = module.project(projector, hidden)
            notes.append(f"projector tokens: {tuple(tokens.shape)}")
        total = context_length or None
        missing = "connect a CONDITIONING to the Unison Projector's {} input to use this output"
        pos = module.append_to_conditioning(positive, tokens, total) if positive is not None else \
            comfy.execution_blocker(missing.format("positive"))
        neg = module.append_to_conditioning(negative, None, total) if negative is not None else \
            comfy.execution_blocker(missing.format("negative"))
        return {"ui": {"text": ["\n".join(notes)]}, "result": (tokens, pos, neg)}


# --------------------------------------------------------------------------- VACE inputs


class UnisonVaceInputs:
    DESCRIPTION = ("Builds the plan's VACE inputs (source frames, masks, reference image) in the form ComfyUI's "
                   "WanVaceToVideo takes, so the native Wan path follows the same task recipe as Unison's sampler. "
                   "As in Unison, a source or control clip sets the output's aspect ratio (at the plan's area) and "
                   "length (the whole clip resampled); wire this node's width, height and length into "
                   "WanVaceToVideo. A masked edit paints the masked area grey, as VACE's annotator does. A video "
                   "edit without a mask uses VACE's salient annotator (models/VACE-Annotators/salient/u2net.pt) "
                   "when installed; without it the whole frame is editable and the source pixels are kept, which "
                   "is not Unison's behaviour (the node says so).")
    CATEGORY = "Unison"
    FUNCTION = "prepare"
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE", "INT", "INT", "INT")
    RETURN_NAMES = ("control_video", "control_masks", "reference_image", "width", "height", "length")
    OUTPUT_TOOLTIPS = (
        "Source / control frames at the size actually used (0.5 grey = nothing given); WanVaceToVideo's "
        "control_video.",
        "Masks, 1 = generate, 0 = keep (soft along resized edges); WanVaceToVideo's control_masks.",
        "The first reference image on a white canvas, for WanVaceToVideo's reference_image. Only reference tasks "
        "have one. For other tasks there is no image: inputs that are optional (WanVaceToVideo's) receive "
        "nothing, which they read as 'no reference'; a node that needs an image (Preview/Save Image) is blocked "
        "with a message saying the plan has no reference.",
        "Width actually used: the plan's, or a source's aspect ratio at the plan's area; WanVaceToVideo's width.",
        "Height actually used; WanVaceToVideo's height.",
        "Frames actually used (a source clip sets the length, as in Unison); WanVaceToVideo's length.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        tooltip = "A generation plan (the Task Router's plan, image or video output)."
        return {"required": {"plan": (PLAN, {"tooltip": tooltip})},
                "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    def prepare(self, plan: Any, prompt: dict[str, Any] | None = None, unique_id: Any = None) -> dict[str, Any]:
        packet = generation_packet(plan, "Unison VACE Inputs", on_text=_GENERATE_INSTEAD)
        sources = runtime_module("vace.sources")
        inputs = sources.prepare_vace_inputs(packet.plan, packet.ordered_media(), salient=_salient_for(packet.plan))
        control_video, control_masks, reference = sources.to_comfy_vace_inputs(inputs)
        notes = list(inputs.notes)
        if inputs.references.shape[0] > 1:
            notes.append(f"{inputs.references.shape[0]} reference images; WanVaceToVideo takes only the first "
                         "(the Unison VACE Sampler uses all)")
        if reference is None:
            reference = _no_reference(packet.plan, prompt, unique_id)
            if comfy.is_blocked(reference):
                notes.append("no reference image for this task: the node(s) wired to reference_image that need "
                             "an image are blocked")
        (width, height), length = inputs.size, inputs.num_frames
        text = "\n".join([f"{length} frame(s) {width}x{height}", *notes])
        return {"ui": {"text": [text]}, "result": (control_video, control_masks, reference, width, height, length)}


REFERENCE_SLOT = 2  # UnisonVaceInputs.RETURN_NAMES.index("reference_image")


def _no_reference(plan: Any, prompt: dict[str, Any] | None, unique_id: Any) -> Any:
    """What ``reference_image`` carries when the plan has no reference image.

    ``None`` is ComfyUI's "nothing connected" for an optional input, and WanVaceToVideo reads it as
    "no reference"; no IMAGE value means that (an empty batch breaks its VAE encode, and core Save /
    Preview Image read ``images[0]``). So when a consumer needs an image (a required input, e.g. Preview
    Image), the output is blocked with a message naming it instead of handing it ``None`` to crash on;
    one output value reaches every consumer, so a WanVaceToVideo on the same output is then blocked too.
    """
    needy = [f"{class_type} #{node_id}.{name}"
             for node_id, class_type, name in comfy.linked_consumers(prompt, unique_id, REFERENCE_SLOT)
             if not comfy.input_is_optional(class_type, name)]
    if not needy:
        return None
    return comfy.execution_blocker(
        f"Unison VACE Inputs: the plan's task {plan.task.value} has no reference image (only image_reference and "
        f"video_reference have one), so reference_image carries none; {', '.join(needy)} needs an image. Wire "
        "reference_image only to inputs that may be empty, such as WanVaceToVideo's reference_image.")


def _salient_for(plan: Any) -> Any:
    """VACE's salient annotator (``saliency`` function) for a video edit without a mask, when installed.

    Looked for in ComfyUI's models folder (``VACE-Annotators/salient/u2net.pt``, as the release is
    laid out) and in ``models/unison``; loaded for this run only (it is needed rarely), never downloaded.
    """
    plan_mod = runtime_module("plan")
    if plan.task is not plan_mod.Task.VIDEO_EDITING or plan.mask_index is not None:
        return None
    salient = runtime_module("vace.salient")
    fp = comfy.folder_paths()
    folders = ([fp.models_dir] if fp is not None else []) + comfy.model_folders(comfy.UNISON_FOLDER)
    path = salient.find_salient_model(folders)
    return salient.SalientAnnotator.from_file(path).saliency if path is not None else None


# --------------------------------------------------------------------------- sampler


SETTINGS_IN_COMFYUI = ("(in ComfyUI: width, height and frames are on the Unison Task Router; the text encoder "
                       "device on the Unison VACE Loader)")


class UnisonVaceSampler:
    DESCRIPTION = ("Stage two: generates the plan's image or video with Wan2.1-VACE, from the plan's media and the "
                   "instruction's umT5 embedding plus the projector tokens.")
    CATEGORY = "Unison"
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("frames", "fps")
    OUTPUT_TOOLTIPS = (
        "The generated frames (one for image tasks); Save Image, or Create Video → Save Video.",
        "Frames per second of the plan (for Create Video).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        negative = runtime_module("vace.text").WAN_NEGATIVE_PROMPT
        return {
            "required": {
                "vace": (VACE, {"lazy": True, "tooltip": "From a Unison VACE Loader (loaded only when this branch "
                                                         "runs)."}),
                "plan": (PLAN, {"tooltip": "A generation plan: the Task Router's image or video output."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Noise seed; the same seed gives the same result on the same device."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                                  "tooltip": "Denoising steps (the reference uses 50)."}),
                "guidance": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                       "tooltip": "Classifier-free guidance scale (reference 5.0; 1 = off, faster)."}),
                "shift": ("FLOAT", {"default": 5.0, "min": 0.1, "max": 50.0, "step": 0.1, "round": 0.01,
                                    "tooltip": "Flow-matching timestep shift (reference 5.0)."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": negative,
                                               "tooltip": "What to steer away from (Wan's default negative prompt)."}),
            },
            "optional": {
                "tokens": (TOKENS, {"lazy": True,
                                    "tooltip": "Projector tokens from the Unison Projector; appended to the "
                                               "instruction's embedding. Not connected: umT5 alone."}),
                "noise_device": (list(NOISE_DEVICES), {
                    "default": "cpu",
                    "tooltip": "Where the starting noise is drawn. cpu: the same noise for a seed on every machine "
                               "(as ComfyUI's own samplers). device: a generator on the sampling device, as the "
                               "Unison reference does (its exact noise on that GPU, different on another GPU)."}),
                "speed": (SPEED, {"tooltip": "From a Unison Speed node: step cache, torch.compile, text K/V cache. "
                                             "Not connected: no cache, no compile (text K/V computed once)."}),
            },
        }

    def check_lazy_status(self, **inputs: Any) -> list[str]:
        """Ask for the models only once the plan is known to be a generation plan.

        ``vace`` and ``tokens`` are lazy so that, when the Router blocks this branch (a question, or
        the other output kind), ComfyUI blocks this node without loading VACE or running the
        projector. Unevaluated linked inputs arrive as ``None`` (ComfyUI ignores names already
        evaluated, so ``tokens`` that came back ``None`` is not asked for twice); an unlinked
        ``tokens`` is absent and must not be asked for.
        """
        return [name for name in ("vace", "tokens") if name in inputs and inputs[name] is None]

    def sample(self, vace: Any, plan: Any, seed: int, steps: int, guidance: float, shift: float,
               negative_prompt: str, tokens: Any = None, noise_device: str = "cpu",
               speed: dict[str, Any] | None = None) -> dict[str, Any]:
        packet = generation_packet(plan, "Unison VACE Sampler", on_text=_GENERATE_INSTEAD)
        sources = runtime_module("vace.sources")
        sampler = runtime_module("vace.sampler")
        text = runtime_module("vace.text")
        inputs = sources.prepare_vace_inputs(packet.plan, packet.ordered_media(), salient=_salient_for(packet.plan))
        options = sampler.SamplingOptions(steps=steps, guidance=guidance, shift=shift, seed=seed,
                                          negative_prompt=negative_prompt, noise_device=noise_device, **(speed or {}))
        if str(vace.models.device).startswith("cpu"):
            _settle_cpu_heap()
        # No load here: the parts are loaded stage by stage in work() (umT5 to encode, then the rest).
        used = inputs.used_plan(packet.plan)  # a source may set another size or length (as in Unison)
        options, memory_note = _memory_preflight(used, vace.models, options)
        bar = comfy.progress_bar(steps)
        to_preview = previews.previewer(int(inputs.references.shape[0])) if bar is not None else None
        latest: list[Any] = [None]  # the preview of the step just computed, sent with its progress

        def on_step(step: int, total: int, x0: Any) -> None:
            latest[0] = to_preview(x0)

        def progress(step: int, total: int) -> None:
            if bar is not None:
                bar.update_absolute(step, total, latest[0])
                latest[0] = None

        def cancel() -> bool:
            comfy.throw_if_interrupted()  # raises ComfyUI's InterruptProcessingException
            return False

        faults = runtime_module("faults")
        p, m = used, vace.models

        def work() -> Any:
            # The contexts live in this frame: an out-of-memory error clears it before travelling on.
            # Staged through ComfyUI's model management: umT5 is asked for only to encode, the transformer
            # and VAE only to sample, so ComfyUI may offload umT5 to make room for them.
            comfy.load_for_use([vace.text_patcher], memory_required=estimate.text_encoding_bytes(m))
            contexts = text.text_contexts(m, p.prompt, tokens, negative_prompt=negative_prompt)
            # On the CPU ComfyUI's offload moves nothing: umT5's mapped pages are given back instead.
            text.release_encoder_pages(m)
            comfy.load_for_use(vace.sampling_patchers, memory_required=estimate.sampling_bytes(
                p, estimate.footprint(m), estimate.run_settings(m, options, int(inputs.references.shape[0]))))
            return sampler.sample(m, p, inputs, contexts.cond, contexts.neg, options, progress=progress,
                                  cancel=cancel, on_step=on_step if to_preview is not None else None,
                                  free_for_decode=lambda: comfy.unload([vace.transformer_patcher]))

        def advice(exc: BaseException) -> str:
            return faults.memory_advice(exc, stage="encoding the prompt with umT5", width=p.width, height=p.height,
                                        num_frames=p.num_frames, device=m.device, batch_cfg=None,
                                        guidance=guidance, text_device=m.text_device, where=SETTINGS_IN_COMFYUI)

        try:
            generation = faults.call_freeing_memory(work, advice, stage="encoding the prompt with umT5")
        except errors.OutOfMemory as exc:
            comfy.free_after_out_of_memory()  # as ComfyUI does for its own nodes: other models make room
            if SETTINGS_IN_COMFYUI in str(exc):
                raise
            raise errors.OutOfMemory(f"{exc}\n{SETTINGS_IN_COMFYUI}", exc.stage) from None
        notes = [*inputs.notes, *generation.notes, *memory_note]
        frames = generation.frames
        summary = f"{frames.shape[0]} frame(s) {frames.shape[2]}x{frames.shape[1]} @ {generation.fps} fps"
        return {"ui": {"text": ["\n".join([summary, *notes])]}, "result": (frames, float(generation.fps))}


def _memory_preflight(plan: Any, models: Any, options: Any) -> tuple[Any, list[str]]:
    """The plan's memory check (``vram_estimate.preflight``), counting what ComfyUI can offload as free.

    On a GPU that is the models ComfyUI holds there. On the CPU offloading moves nothing: what the
    run's own transformer and VAE hold in private memory is counted as theirs already, while pages
    mapped from their files count as available RAM already (the kernel can drop them).
    """
    device = str(models.device)
    if device.startswith("cpu"):
        pages = runtime_module("mapped_pages")
        held = pages.private_bytes(pages.tensors_of(models.transformer, models.vae))
    else:
        held = comfy.evictable_bytes(device)
    return estimate.preflight(plan, models, options, evictable=held)


@functools.cache
def _settle_cpu_heap() -> bool:
    """On the CPU, freed tensors go back to the OS (once per server; the CLI does the same).

    Sampling on the CPU casts stored fp8/fp16 weights layer by layer and keeps the text K/V for the
    run; under glibc's dynamic mmap threshold the freed casts leave resident holes between the kept
    blocks (about 1.8 GiB at released size, BENCHMARKS.md section 8). ``unison_runtime.heap`` fixes
    the threshold at 4 MiB for the process; a ``MALLOC_MMAP_THRESHOLD_`` the user set is left alone.
    """
    settled = runtime_module("heap").unmap_large_blocks()
    if settled:
        log.info("Unison: sampling on the CPU: blocks of 4 MiB and more are returned to the OS when freed "
                 "(glibc mmap threshold fixed; set MALLOC_MMAP_THRESHOLD_ to choose another)")
    return settled
