"""Wan2.1-VACE sampling: VACE inputs + text contexts → float frames.

The loop runs over the same parts as diffusers' ``WanVACEPipeline`` and prepares the latents the
same way (so, with ``batch_cfg=False``, it reproduces that pipeline's output for the same inputs and
noise), with three differences that matter to Unison:

* guidance can run the conditional and unconditional passes as **one batched forward**
  (``batch_cfg``; same result within float tolerance, faster where memory allows);
* several reference images are placed in the order given (``r0, r1, ..., video``), as Wan's VACE
  code does (diffusers prepends each in turn, which reverses them);
* a ``progress(step, total)`` callback and a ``cancel()`` check run every step.

Where it reproduces the reference (Unison ``module.py`` ``WanVaceProj.generate``, which is VACE's
``WanVace.generate`` plus the projector tokens): the scheduler samples on Wan's sigma grid
(:mod:`.scheduler`), the guidance combine runs in float32 on float32 predictions (Wan's model
returns ``.float()`` outputs), and the scheduler steps float32 latents.

Conventions (VACE's, ``WanVace.vace_encode_frames`` / ``vace_encode_masks``): the source video is in
[-1, 1] (grey 0.5 → 0), the mask in [0, 1] with 1 = regenerate; the VAE encodes ``video * (1 - m)``
(kept) and ``video * m`` (to regenerate) separately with ``m`` the mask thresholded at 0.5, while the
mask channels carry the mask as given (a soft mask stays soft there, as in VACE): it is
pixel-unshuffled 8x8 into 64 channels and resized in time to the latent
frames; each reference image is encoded alone, paired with zeros, and prepended in time, with a
zero mask. The noise is drawn from ``seed`` on the CPU by default, so a seed means the same noise on
every machine (as in ComfyUI); ``noise_device="device"`` draws it on the sampling device as the
reference does (on a GPU that gives the reference's noise, which differs between GPU models).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import MediaError, SamplingCancelled, UnisonError
from ..faults import call_freeing_memory, is_out_of_memory, memory_advice, reset_model_caches
from ..plan import Plan
from .models import VaceModels
from .speed import check_options as check_speed_options
from .speed import continue_in_branches, sampling_speedups, write_calibration
from .stored_precision import give_back_ram

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
StepFn = Callable[[int, int, torch.Tensor], None]  # (step, total, predicted clean latents [1, C, T, h, w])

#: Where the starting noise is drawn: a CPU generator (default) or one on the sampling device (the reference's).
NOISE_DEVICES = ("cpu", "device")
StageFn = Callable[[str], None]

#: The most steps the CLI and the Sampler node accept (every count up to it runs: see ``denoise``).
MAX_STEPS = 1000


class VaceInputsLike(Protocol):
    """What the sampler reads from :class:`unison_runtime.vace.sources.VaceInputs`."""

    frames: torch.Tensor  # [T, H, W, 3] float 0..1, grey 0.5
    masks: torch.Tensor  # [T, H, W] float 0..1, 1 = regenerate (thresholded at 0.5 for the VAE split)
    references: torch.Tensor  # [R, H, W, 3] float 0..1 on a white canvas


@dataclass
class SamplingOptions:
    """Stage-two settings; the defaults are the reference's (DESIGN section 8).

    ``negative_prompt`` is used by whoever builds the negative context (``None``: Wan's default).
    ``batch_cfg`` runs both guidance branches in one forward; turn it off to halve peak activations.
    ``fps`` overrides the plan's frame rate (``None``: the plan's, 24 unless a planner or user set it).
    ``noise_device``: ``"cpu"`` (default) draws the starting noise with a CPU generator, the same on
    every machine for a seed (like ComfyUI); ``"device"`` draws it with a generator on the sampling
    device, as the reference (``WanVaceProj.generate``) does: the reference's exact noise on that
    device, but a different one on another GPU model or on the CPU. On the CPU both are the same.
    """

    steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0
    seed: int = 0
    negative_prompt: str | None = None
    context_scale: float = 1.0
    batch_cfg: bool = True
    fps: int | None = None
    noise_device: str = "cpu"
    vae_tiling: bool = False
    # Speed (issue 19; see vace/speed.py): text K/V once is exact and on; caches and compile are opt-in.
    text_kv_cache: bool = True
    cache: str = "none"
    cache_threshold: float | None = None
    cache_ratios: tuple[float, ...] | None = None
    calibrate_cache: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise UnisonError(f"sampling option steps={self.steps!r}: expected an integer from 1 to {MAX_STEPS}")
        if not _finite(self.shift) or not self.shift > 0:
            raise UnisonError(f"sampling option shift={self.shift!r}: expected a finite positive number")
        if not _finite(self.guidance) or self.guidance < 0:
            raise UnisonError(f"sampling option guidance={self.guidance!r}: expected a finite number >= 0 "
                              "(1 = no guidance)")
        if not _finite(self.context_scale):
            raise UnisonError(f"sampling option context_scale={self.context_scale!r}: expected a finite number")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise UnisonError(f"sampling option seed={self.seed!r}: expected an integer in [0, 2**64)")
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, int) or self.fps < 1):
            raise UnisonError(f"sampling option fps={self.fps!r}: expected >= 1")
        if self.noise_device not in NOISE_DEVICES:
            raise UnisonError(f"sampling option noise_device={self.noise_device!r}: expected one of "
                              f"{', '.join(NOISE_DEVICES)} (cpu: the same noise on every machine; device: the "
                              "sampling device's generator, as the reference)")
        check_speed_options(self)

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance runs when the scale is above 1, as in diffusers."""
        return self.guidance > 1.0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Generation:
    """The result: ``frames`` float32 ``[T, H, W, 3]`` in 0..1 on the CPU (T == 1 for images), and its fps."""

    frames: torch.Tensor
    fps: int
    notes: list[str] = field(default_factory=list)


@dataclass
class PreparedLatents:
    """Everything the denoising loop needs besides the contexts (exposed for tests and benchmarks)."""

    control: torch.Tensor  # [1, 2*z + 64, R + F, h, w]: inactive, reactive latents and the mask
    noise: torch.Tensor  # [1, z, R + F, h, w] float32
    num_references: int


# --------------------------------------------------------------------------- geometry


def vae_scales(models: VaceModels) -> tuple[int, int]:
    """(temporal, spatial) compression of the VAE: 4 and 8 for Wan2.1's."""
    down = list(models.vae.config.temperal_downsample)
    return 2 ** sum(bool(d) for d in down), 2 ** len(down)


def check_inputs(models: VaceModels, plan: Plan, inputs: VaceInputsLike) -> None:
    """Refuse inputs that do not match the plan or the model before any heavy work."""
    if plan.output == "text":
        raise UnisonError(f"task {plan.task.value} is an understanding task; there is nothing to sample")
    if models.transformer is None or models.vae is None:
        raise UnisonError("the VACE transformer/VAE were released (or never loaded); load the VACE models again")
    t, h, w = plan.num_frames, plan.height, plan.width
    frames, masks, refs = inputs.frames, inputs.masks, inputs.references
    if tuple(frames.shape) != (t, h, w, 3):
        raise MediaError(f"VACE source frames are {tuple(frames.shape)}; the plan needs [{t}, {h}, {w}, 3]")
    if tuple(masks.shape) != (t, h, w):
        raise MediaError(f"VACE masks are {tuple(masks.shape)}; the plan needs [{t}, {h}, {w}]")
    if refs.dim() != 4 or tuple(refs.shape[1:]) != (h, w, 3):
        raise MediaError(f"VACE reference images are {tuple(refs.shape)}; expected [R, {h}, {w}, 3]")
    temporal, spatial = vae_scales(models)
    step = spatial * models.transformer.config.patch_size[1]
    if h % step or w % step:
        raise MediaError(f"size {w}x{h} is not a multiple of {step}, which this VACE model needs")
    if (t - 1) % temporal:
        raise MediaError(f"{t} frames: this VACE model needs {temporal}k+1 frames")


# --------------------------------------------------------------------------- latents


def _latent_stats(models: VaceModels, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    config = models.vae.config
    mean = torch.tensor(config.latents_mean, device=device, dtype=torch.float32).view(1, config.z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(config.latents_std, device=device, dtype=torch.float32).view(1, config.z_dim, 1, 1, 1)
    return mean, inv_std


def _encode(models: VaceModels, video: torch.Tensor) -> torch.Tensor:
    """Normalised VAE latents (the distribution's mode, as VACE uses) of a [1, 3, T, H, W] video in [-1, 1]."""
    vae = models.vae
    latents = vae.encode(video.to(vae.dtype)).latent_dist.mode()
    mean, inv_std = _latent_stats(models, latents.device)
    return ((latents.float() - mean) * inv_std).to(vae.dtype)


def _mask_latents(mask: torch.Tensor, latent_frames: int, spatial: int, patch: int) -> torch.Tensor:
    """[T, H, W] mask → [spatial², F, h, w]: 8x8 pixel blocks become channels; time is resized (nearest-exact)."""
    t, h, w = mask.shape
    lh, lw = h // (spatial * patch) * patch, w // (spatial * patch) * patch
    blocks = mask.view(t, lh, spatial, lw, spatial).permute(2, 4, 0, 1, 3).flatten(0, 1)
    return torch.nn.functional.interpolate(blocks[None], size=(latent_frames, lh, lw), mode="nearest-exact")[0]


def draw_noise(shape: tuple[int, ...], seed: int, device: str | torch.device,
               noise_device: str = "cpu") -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` on ``device`` from ``seed``.

    As the reference (``WanVaceProj.generate``): ``torch.randn(z, F, h, w, dtype=float32,
    generator=torch.Generator(device).manual_seed(seed))``; a leading batch axis of 1 does not change
    the values. ``noise_device`` picks the generator's device: ``"cpu"`` or the sampling ``"device"``.
    """
    if noise_device not in NOISE_DEVICES:
        raise UnisonError(f"noise_device={noise_device!r}: expected one of {', '.join(NOISE_DEVICES)}")
    where = torch.device("cpu") if noise_device == "cpu" else torch.device(device)
    generator = torch.Generator(device=where).manual_seed(seed)
    noise = torch.randn(shape, generator=generator, device=where, dtype=torch.float32)
    return noise.to(device)


def prepare_latents(models: VaceModels, inputs: VaceInputsLike, seed: int,
                    noise_device: str = "cpu") -> PreparedLatents:
    """VACE's control latents (source, mask, references) and the starting noise, on ``models.device``."""
    device = torch.device(models.device)
    temporal, spatial = vae_scales(models)
    patch = models.transformer.config.patch_size[1]
    video = (inputs.frames.to(device=device, dtype=torch.float32) * 2.0 - 1.0).permute(3, 0, 1, 2)[None]
    given_mask = inputs.masks.to(device=device, dtype=torch.float32)
    mask = torch.where(given_mask > 0.5, 1.0, 0.0)  # the kept / regenerated split (vace_encode_frames)
    refs = inputs.references.to(device=device, dtype=torch.float32) * 2.0 - 1.0
    num_refs = int(refs.shape[0])

    with torch.no_grad():
        video_mask = mask[None, None].to(models.vae.dtype)
        video = video.to(models.vae.dtype)
        inactive = _encode(models, video * (1 - video_mask))
        reactive = _encode(models, video * video_mask)
        source = torch.cat([inactive, reactive], dim=1)  # [1, 2z, F, h, w]
        parts = []
        for ref in refs:
            latent = _encode(models, ref.permute(2, 0, 1)[None, :, None])  # [1, z, 1, h, w]
            parts.append(torch.cat([latent, torch.zeros_like(latent)], dim=1))
        source = torch.cat([*parts, source], dim=2)

    latent_frames = (inputs.frames.shape[0] - 1) // temporal + 1
    mask_latent = _mask_latents(given_mask, latent_frames, spatial, patch)  # as given (vace_encode_masks)
    if num_refs:
        mask_latent = torch.cat([mask_latent.new_zeros(mask_latent.shape[0], num_refs, *mask_latent.shape[2:]),
                                 mask_latent], dim=1)
    control = torch.cat([source, mask_latent[None].to(source.dtype)], dim=1).to(models.transformer.dtype)

    z = models.transformer.config.in_channels
    shape = (1, z, latent_frames + num_refs, inputs.frames.shape[1] // spatial, inputs.frames.shape[2] // spatial)
    noise = draw_noise(shape, seed, device, noise_device)
    return PreparedLatents(control=control, noise=noise, num_references=num_refs)


def make_scheduler(models: VaceModels, shift: float) -> Any:
    """A fresh UniPC flow scheduler on Wan's sigma grid with ``flow_shift = shift`` (see :mod:`.scheduler`)."""
    from .scheduler import wan_unipc_scheduler  # imports diffusers: only when sampling

    return wan_unipc_scheduler(models.scheduler_config, shift)


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` in float32, whatever dtype the transformer ran in.

    The reference's model returns float32 (``[u.float() for u in x]`` in Wan's ``WanModel.forward``),
    so ``WanVaceProj.generate`` combines and steps in float32; combining bf16 outputs in bf16 would
    round the difference ``cond - uncond`` before it is scaled by 5.
    """
    cond, uncond = cond.float(), uncond.float()
    return uncond + scale * (cond - uncond)


# --------------------------------------------------------------------------- denoising


def _forward(transformer: Any, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
             control: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    batch = context.shape[0]
    x = latents.to(transformer.dtype)
    if batch != x.shape[0]:
        x = x.expand(batch, -1, -1, -1, -1)
        control = control.expand(batch, -1, -1, -1, -1)
    # diffusers' cache hooks (first-block cache etc.) key their state on this name; a no-op otherwise.
    scope = transformer.cache_context(name) if hasattr(transformer, "cache_context") else nullcontext()
    with scope:
        return transformer(
            hidden_states=x,
            timestep=t.expand(batch),
            encoder_hidden_states=context,
            control_hidden_states=control,
            control_hidden_states_scale=scale,
            return_dict=False,
        )[0]


def _context(models: VaceModels, context: torch.Tensor | None, name: str) -> torch.Tensor:
    if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[0] != 1:
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else context
        raise UnisonError(f"{name} context is {shape}; expected a tensor [1, length, text_dim]")
    text_dim = models.transformer.config.text_dim
    if context.shape[2] != text_dim:
        raise UnisonError(f"{name} context has width {context.shape[2]}; this VACE model's text_dim is {text_dim} "
                          "(the umT5 encoder and projector must match it)")
    return context.to(device=models.device, dtype=models.transformer.dtype)


def denoise(
    models: VaceModels,
    prepared: PreparedLatents,
    cond_context: torch.Tensor,
    neg_context: torch.Tensor | None,
    options: SamplingOptions,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    notes: list[str] | None = None,
    state: dict[str, Any] | None = None,
    on_step: StepFn | None = None,
) -> torch.Tensor:
    """The flow-matching UniPC loop with classifier-free guidance; returns the final float32 latents.

    ``on_step(step, total, x0)``, when given, receives after each step the current estimate of the
    clean latents (``x0 = x_t - sigma_t * v``, reference frames included), e.g. for live previews;
    without it nothing extra is computed.

    ``state``, when given, is kept up to date with the step being computed (``"step"``) and whether
    guidance still runs batched (``"batched"``), for error messages.
    """
    transformer = models.transformer
    predictions: list[torch.Tensor] = []
    cond = _context(models, cond_context, "conditional")
    guided = options.uses_guidance
    neg = _context(models, neg_context, "negative") if guided else None
    batched = guided and options.batch_cfg
    if batched and cond.shape[1] != neg.shape[1]:
        # Padding one to the other's length would change what it means (zeros are attended to), so no batching.
        batched = False
        if notes is not None:
            notes.append(f"conditional ({cond.shape[1]}) and negative ({neg.shape[1]}) contexts differ in length: "
                         "guidance ran as two passes")
    both = torch.cat([cond, neg]) if batched else None
    scale = torch.full((len(transformer.config.vace_layers),), float(options.context_scale),
                       device=models.device, dtype=transformer.dtype)
    scheduler = make_scheduler(models, options.shift)
    # WanGridUniPCScheduler.set_timesteps also pins the begin index to 0 (equal int timesteps at many steps).
    scheduler.set_timesteps(options.steps, device=models.device)
    latents = prepared.noise
    control = prepared.control
    total = len(scheduler.timesteps)
    # Cache hooks (first-block cache, ...) compare each step with the last: start clean, and leave
    # nothing for the next run however this one ends (finished, cancelled, out of memory).
    reset_model_caches(transformer)
    try:
        with torch.no_grad(), sampling_speedups(transformer, options) as speed:
            for i, t in enumerate(scheduler.timesteps):
                if cancel is not None and cancel():
                    raise SamplingCancelled(f"sampling cancelled before step {i + 1} of {total}")
                if state is not None:
                    state.update(step=i + 1, batched=batched)
                if batched and not _batched_step(transformer, latents, t, both, control, scale, predictions):
                    batched, both = False, None
                    if options.cache == "magcache":
                        continue_in_branches(transformer)  # its ratio table follows the step
                    if state is not None:
                        state["batched"] = False
                    if notes is not None:
                        notes.append(f"batched guidance ran out of memory at step {i + 1}; continued with two passes")
                    # Only now: the failed forward's activations went with its exception.
                    _empty_cache(models.device)
                if not batched:
                    predictions[:] = [_forward(transformer, latents, t, cond, control, scale, "cond")]
                    if guided:
                        predictions.append(_forward(transformer, latents, t, neg, control, scale, "uncond"))
                if guided:
                    noise_pred = combine_guidance(predictions[0], predictions[1], options.guidance)
                else:
                    noise_pred = predictions[0].float()
                predictions.clear()
                if on_step is not None:
                    on_step(i + 1, total, latents - scheduler.sigmas[i].to(latents.device) * noise_pred)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if progress is not None:
                    progress(i + 1, total)
        if notes is not None:
            notes.extend(speed.notes)
        if speed.calibration is not None:
            write_calibration(options.calibrate_cache, speed.calibration, options.steps)
    finally:
        reset_model_caches(transformer)
    return latents


def _batched_step(transformer: Any, latents: torch.Tensor, t: torch.Tensor, both: torch.Tensor,
                  control: torch.Tensor, scale: torch.Tensor, predictions: list[torch.Tensor]) -> bool:
    """One forward for both guidance branches into ``predictions``; False when it ran out of memory."""
    try:
        predictions[:] = _forward(transformer, latents, t, both, control, scale, "cond_uncond").chunk(2)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        return False
    return True


def _empty_cache(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def vae_tiling(vae: Any, on: bool) -> Iterator[None]:
    """diffusers' ``AutoencoderKLWan`` tiling switched on for the block (and back as it was after)."""
    if not on or not hasattr(vae, "enable_tiling"):
        yield
        return
    was = bool(getattr(vae, "use_tiling", False))
    vae.enable_tiling()
    try:
        yield
    finally:
        if not was:
            vae.disable_tiling()


#: Tile sizes (pixels: min height, min width, stride height, stride width) for the decode retries after an
#: out-of-memory error: diffusers' defaults, then half of them.
DECODE_TILES = ((256, 256, 192, 192), (128, 128, 96, 96))


def decode(models: VaceModels, latents: torch.Tensor, num_references: int, *,
           free_memory: Callable[[], None] | None = None, notes: list[str] | None = None) -> torch.Tensor:
    """Drop the reference frames, undo the latent normalisation, decode: float32 [T, H, W, 3] in 0..1 on the CPU.

    Finished latents are never thrown away by the decode: if decoding runs out of memory, what is
    not needed is freed (``free_memory()``, e.g. the transformer; the device cache) and the VAE
    decodes again in tiles (``AutoencoderKLWan.enable_tiling``), then in smaller tiles. Only when
    the smallest tiles fail too does the error travel on (the caller still holds ``latents``).
    """
    vae = models.vae
    latents = latents[:, :, num_references:].to(vae.dtype)
    mean, inv_std = _latent_stats(models, latents.device)
    latents = (latents / inv_std.to(latents.dtype) + mean.to(latents.dtype))
    tilings: list[tuple[int, int, int, int] | None] = [None, *DECODE_TILES]
    if not hasattr(vae, "enable_tiling"):
        tilings = [None]
    for attempt, tiles in enumerate(tilings):
        last = attempt == len(tilings) - 1
        try:
            video = _decode_once(vae, latents, tiles)
            break
        except (RuntimeError, MemoryError) as exc:
            if last or not is_out_of_memory(exc):
                raise
        # Outside the except clause: the failed attempt's activations went with its exception.
        if attempt == 0 and free_memory is not None:
            free_memory()
        _empty_cache(models.device)
        if notes is not None:
            h, w = tilings[attempt + 1][:2]
            notes.append(f"decoding ran out of memory; decoded again in {w}x{h} tiles (same latents)")
    frames = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)
    return frames.cpu().contiguous()


def _decode_once(vae: Any, latents: torch.Tensor, tiles: tuple[int, int, int, int] | None) -> torch.Tensor:
    """One VAE decode, tiled when ``tiles`` is given; the VAE's own tiling setting is restored afterwards."""
    names = ("use_tiling", "tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
             "tile_sample_stride_width")
    before = {name: getattr(vae, name) for name in names if hasattr(vae, name)}
    if tiles is not None:
        height, width, stride_h, stride_w = tiles
        vae.enable_tiling(tile_sample_min_height=height, tile_sample_min_width=width,
                          tile_sample_stride_height=stride_h, tile_sample_stride_width=stride_w)
    try:
        with torch.no_grad():
            return vae.decode(latents, return_dict=False)[0]  # [1, 3, T, H, W] in [-1, 1]
    finally:
        if tiles is not None:
            for name, value in before.items():
                setattr(vae, name, value)


def sample(
    models: VaceModels,
    plan: Plan,
    inputs: VaceInputsLike,
    cond_context: torch.Tensor,
    neg_context: torch.Tensor | None,
    options: SamplingOptions | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    on_step: StepFn | None = None,
    on_stage: StageFn | None = None,
    free_for_decode: Callable[[], None] | None = None,
) -> Generation:
    """Generate the plan's image or video from VACE inputs and the two text contexts.

    ``cond_context`` / ``neg_context`` are ``[1, L, text_dim]`` (see :mod:`.text`); ``neg_context``
    may be ``None`` when ``options.guidance <= 1``. ``progress(step, total)`` is called after each
    step, ``cancel()`` before each (a true result raises :class:`SamplingCancelled`), ``on_step`` as in
    :func:`denoise`. Deterministic
    for a given seed on a given device.

    Running out of memory raises :class:`~unison_runtime.errors.OutOfMemory` naming the settings
    to lower, after the latents of this call were let go; the models stay usable. ``on_stage(text)``
    is told when encoding, sampling and decoding start (for a host's progress display).
    ``options.vae_tiling`` encodes and decodes in tiles, for frames too large for the VAE whole. A
    decode that runs out of memory is first retried in tiles, after ``free_for_decode()`` freed what
    decoding does not need (see :func:`decode`), so finished latents are not lost to the decode.
    """
    options = options or SamplingOptions()
    announce = on_stage or (lambda text: None)
    check_inputs(models, plan, inputs)
    if options.uses_guidance and neg_context is None:
        raise UnisonError(f"guidance {options.guidance} needs a negative context (or set guidance to 1)")
    notes: list[str] = []
    if cancel is not None and cancel():
        raise SamplingCancelled("sampling cancelled before it started")
    stage = ["encoding the VACE inputs with the VAE"]
    state: dict[str, Any] = {"step": 0, "batched": options.batch_cfg}
    on_cpu = str(models.device).startswith("cpu")  # stored weights' pages are given back while the VAE works

    def work() -> torch.Tensor:
        # Everything this call allocates lives in this frame, which an out-of-memory error clears.
        with vae_tiling(models.vae, options.vae_tiling):
            announce(stage[0] + (" (tiled)" if options.vae_tiling else ""))
            if on_cpu:  # the VAE works while the transformer waits: its pages need not be resident yet
                give_back_ram("VACE transformer", models.transformer, after="before the VAE encoding")
            prepared = prepare_latents(models, inputs, options.seed, options.noise_device)
            stage[0] = "sampling"
            announce(f"sampling {options.steps} steps")
            latents = denoise(models, prepared, cond_context, neg_context, options, progress=progress,
                              cancel=cancel, notes=notes, state=state, on_step=on_step)
            stage[0] = "decoding with the VAE"
            num_references = prepared.num_references
            del prepared  # the control latents are not needed to decode
            if on_cpu:  # nor the transformer's weights: their RAM goes to the decode
                give_back_ram("VACE transformer", models.transformer, after="before decoding")
            frames = plan.num_frames
            announce(f"decoding {frames} frame{'s' if frames != 1 else ''} with the VAE"
                     + (" (tiled)" if options.vae_tiling else ""))
            return decode(models, latents, num_references, free_memory=free_for_decode, notes=notes)

    def where() -> str:
        return f"sampling, step {state['step']} of {options.steps}" if stage[0] == "sampling" else stage[0]

    def advice(exc: BaseException) -> str:
        denoising = stage[0] == "sampling"  # guidance and batching only matter to the transformer's passes
        return memory_advice(exc, stage=where(), width=plan.width, height=plan.height, num_frames=plan.num_frames,
                             device=models.device, batch_cfg=state["batched"] if denoising else None,
                             guidance=options.guidance if denoising else None, text_device=models.text_device)

    frames = call_freeing_memory(work, advice, stage=where, devices=(models.device,))
    return Generation(frames=frames, fps=options.fps or plan.fps, notes=notes)
