"""VACE inputs for each generation task: source frames, masks and reference images (DESIGN §3).

:func:`prepare_vace_inputs` turns a :class:`~unison_runtime.plan.Plan` and the user's decoded
media into :class:`VaceInputs`, as Unison's ``inference.py`` prepares them through VACE's
annotators (``process_vace_data``) and ``WanVaceProj.prepare_source``. The engine feeds them to
Wan2.1-VACE (``frames * 2 - 1`` is its [-1, 1] video); :func:`to_comfy_vace_inputs` hands the
same tensors to ComfyUI's ``WanVaceToVideo`` (which uses 0.5 as its neutral grey).

Conventions (one place, so both paths agree):

* Grey is 0.5 (zero in [-1, 1]); mask 1 = regenerate, 0 = keep.
* **Size and length** (:mod:`.framing`): a task with a source (editing, control, image-to-video)
  is generated at the source's own aspect ratio at the plan's area, from the whole clip resampled
  into the plan's frame budget; ``VaceInputs.size`` / ``num_frames`` say what was used and
  :meth:`VaceInputs.used_plan` gives the plan at that size. ``plan.fixed_size`` (a size the user
  asked for) keeps the plan's width and height; the source then covers them, centre-cropped.
* **Inpainting** (VACE's ``InpaintingVideoAnnotator``, mode ``mask`` / ``salient``,
  ``mask_color`` 128): every mask pixel whose Pillow ``L`` value is > 0 is regenerated, and the
  source is painted grey (128) there *before* resizing; the mask is resized with the frames, so its
  edges are soft. A single mask image applies to every frame. Without a mask, video editing masks
  the salient object of the first frame (:mod:`.salient`) when VACE's annotator file is installed.
* Filters (:mod:`.resize`): VACE's bicubic resize-and-crop on uint8 for frames and masks;
  Unison's bilinear, truncated, white-canvas placement for reference images.

Every adaptation (another size, fewer frames, a missing mask or annotator) is told in
``VaceInputs.notes`` so the node can show it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import MediaError, PlanError
from ..media import Medium
from ..plan import Plan, Task, frame_positions
from .framing import ClipFit, fit_clip
from .resize import contain_on_white, cover_frames, cover_mask, cover_size, luma_u8, nearest_resize

GREY = 0.5
#: The grey VACE's inpainting annotator paints over the masked area (``MASK_COLOR``).
MASK_COLOR = 128
#: Frames annotated at a time (grey fill + resize) to bound memory on long clips.
_CHUNK = 8
#: What a salient annotator is: uint8 RGB ``[H, W, 3]`` → uint8 saliency ``[H, W]`` (see :mod:`.salient`).
SalientFn = Callable[[np.ndarray], np.ndarray]
#: Said when video editing has neither a mask nor the annotator.
NO_SALIENT_NOTE = (
    "no mask given and VACE's salient annotator (VACE-Annotators/salient/u2net.pt) is not installed: the whole "
    "frame is editable and the source pixels are kept as guidance. This is not Unison's behaviour (it masks the "
    "main subject found by the annotator and paints it grey); add a mask, or put u2net.pt in the models folder"
)

#: The role and kind of the medium each task reads (editing tasks use the plan's indices instead).
_ROLE_KIND = {
    Task.IMAGE_CONTROLLABLE: ("control", "image"),
    Task.VIDEO_CONTROLLABLE: ("control", "video"),
    Task.IMAGE_REFERENCE: ("reference", "image"),
    Task.VIDEO_REFERENCE: ("reference", "image"),
    Task.IMAGE_TO_VIDEO: ("frame", "image"),
}


@dataclass
class VaceInputs:
    """What Wan2.1-VACE is conditioned on, at the size actually used (:attr:`size`).

    ``frames``: float32 ``[T,H,W,3]`` in 0..1 (0.5 = grey, i.e. zero in [-1, 1]);
    ``masks``: float32 ``[T,H,W]`` in 0..1, 1 = regenerate (soft only along resized mask edges);
    ``references``: float32 ``[R,H,W,3]`` in 0..1, each image aspect-kept on a white canvas (R may be 0);
    ``notes``: human-readable remarks on how the user's media were fitted.
    """

    frames: torch.Tensor
    masks: torch.Tensor
    references: torch.Tensor
    notes: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) actually used: the plan's, or the source's aspect ratio at the plan's area."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    def used_plan(self, plan: Plan) -> Plan:
        """``plan`` with the width, height and frame count these inputs were built at (the same plan if equal)."""
        (width, height), frames = self.size, self.num_frames
        if (width, height, frames) == (plan.width, plan.height, plan.num_frames):
            return plan
        return plan.with_changes(width=width, height=height, num_frames=frames)


# --------------------------------------------------------------------------- validation


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _label(index: int, medium: Medium) -> str:
    return f"media[{index}] ({medium.name!r})"


def _check_medium(index: int, medium: object, plan: Plan) -> None:
    ref = plan.media[index]
    if not isinstance(medium, Medium):
        raise MediaError(f"media[{index}] for {ref.path!r} must be a Medium, got {type(medium).__name__}")
    label = _label(index, medium)
    if medium.kind != ref.kind:
        raise MediaError(
            f"{label} is a decoded {medium.kind}, but plan.media[{index}] ({ref.path!r}) is {_a(ref.kind)}"
        )
    frames = medium.frames
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise MediaError(f"{label} frames must be a uint8 numpy array, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or min(frames.shape[:3]) < 1:
        raise MediaError(f"{label} frames must be [T,H,W,3] with T, H, W >= 1, got shape {tuple(frames.shape)}")
    if medium.kind == "image" and frames.shape[0] != 1:
        raise MediaError(f"{label} is an image but holds {frames.shape[0]} frames; expected 1")


def _role_indices(plan: Plan, role: str) -> list[int]:
    return [i for i, m in enumerate(plan.media) if m.role == role]


def check_vace_media(plan: Plan, media: Sequence[Medium]) -> None:
    """Refuse, before any pixel work, media that cannot feed ``plan``'s task.

    Raises :class:`PlanError` (naming the plan field) when the task has no stage-two inputs or
    the plan lacks a medium for a role, and :class:`MediaError` (naming the medium) when the
    media do not match ``plan.media`` in number, kind or array layout.
    """
    if not plan.task.is_generation:
        raise PlanError("task", f"{plan.task.value} is answered by stage one and has no VACE inputs", plan.task)
    if len(media) != len(plan.media):
        raise MediaError(
            f"got {len(media)} decoded media for the {len(plan.media)} in plan.media; "
            "expected one per plan.media entry, in the same order"
        )
    for i, medium in enumerate(media):
        _check_medium(i, medium, plan)

    task = plan.task
    if task not in _ROLE_KIND:  # editing reads the plan's own (validated) indices; text-to-X reads nothing
        return
    role, kind = _ROLE_KIND[task]
    found = _role_indices(plan, role)
    if not found:
        roles = [m.role for m in plan.media]
        raise PlanError(
            "media",
            f"{task.value} needs a medium with role {role!r} ({kind}), but the roles are {roles or 'none'}; "
            "plan.assign_roles gives media their roles",
        )
    for i in found:
        if plan.media[i].kind != kind:
            raise PlanError(
                "media",
                f"{task.value} reads plan.media[{i}] ({plan.media[i].path!r}) as {role}: expected "
                f"{_a(kind)}, got {_a(plan.media[i].kind)}",
            )


# --------------------------------------------------------------------------- recipes


def _blank(plan: Plan) -> VaceInputs:
    """Grey frames, an all-ones mask and no references: generate everything (text-to-image/video as is)."""
    n, h, w = plan.num_frames, plan.height, plan.width
    return VaceInputs(
        frames=torch.full((n, h, w, 3), GREY, dtype=torch.float32),
        masks=torch.ones((n, h, w), dtype=torch.float32),
        references=torch.zeros((0, h, w, 3), dtype=torch.float32),
    )


def _sizing_medium(plan: Plan) -> int | None:
    """The index of the medium whose shape sizes the output (the reference reads it as the source clip)."""
    if plan.task in (Task.IMAGE_EDITING, Task.VIDEO_EDITING):
        return plan.source_index
    role = {Task.IMAGE_CONTROLLABLE: "control", Task.VIDEO_CONTROLLABLE: "control", Task.IMAGE_TO_VIDEO: "frame"}
    if plan.task in role:
        return _role_indices(plan, role[plan.task])[0]
    return None


def _fit(plan: Plan, media: Sequence[Medium], notes: list[str]) -> tuple[Plan, ClipFit | None]:
    """The plan at the size (and, for a source clip, the length) stage two uses, and the clip's frame ids."""
    index = _sizing_medium(plan)
    if index is None:
        return plan, None
    medium = media[index]
    label = _label(index, medium)
    width, height = medium.size
    # Image-to-video builds its clip from the image (every frame but the given ones generated): only the size.
    clip_frames = medium.frames.shape[0] if plan.task is not Task.IMAGE_TO_VIDEO else plan.num_frames
    fit = fit_clip(width, height, clip_frames, plan_width=plan.width, plan_height=plan.height,
                   plan_frames=plan.num_frames, fixed_size=plan.fixed_size, fps=medium.fps, label=label)
    if plan.task is Task.IMAGE_TO_VIDEO:  # the plan's length, the image's aspect ratio
        fit = ClipFit(fit.width, fit.height, tuple(range(plan.num_frames)))
    used = plan.with_changes(width=fit.width, height=fit.height, num_frames=fit.num_frames)
    if (fit.width, fit.height) != (plan.width, plan.height):
        notes.append(f"output is {fit.width}x{fit.height}: the aspect ratio of {label} ({width}x{height}) at the "
                     f"plan's {plan.width}x{plan.height} area, as Unison sizes it (ask for a size, e.g. "
                     f"{plan.width}x{plan.height}, to keep the plan's)")
    if plan.task is not Task.IMAGE_TO_VIDEO and medium.kind == "video":
        count = medium.frames.shape[0]
        if fit.num_frames != plan.num_frames:
            why = ("a source clip is not extended" if fit.num_frames < plan.num_frames else
                   f"the token budget of {plan.num_frames} frames at the plan's area holds more at this size")
            notes.append(f"{label} has {count} frames: {fit.num_frames} frames are generated, as Unison does "
                         f"(the plan said {plan.num_frames}: {why})")
        if count != fit.num_frames:
            notes.append(f"{label}: its {count} frames are resampled to {fit.num_frames}, evenly over the whole clip")
    return used, (None if plan.task is Task.IMAGE_TO_VIDEO else fit)


def _crop_note(label: str, medium: Medium, plan: Plan) -> str | None:
    w, h = medium.size
    new_w, new_h = cover_size(w, h, plan.width, plan.height)
    if (new_w, new_h) == (plan.width, plan.height) or (w, h) == (plan.width, plan.height):
        return None
    return (f"{label} is {w}x{h}: scaled to {new_w}x{new_h} and centre-cropped to the "
            f"{plan.width}x{plan.height} output")


def _source_masks(plan: Plan, media: Sequence[Medium], fit: ClipFit, notes: list[str],
                  salient: SalientFn | None) -> tuple[np.ndarray | None, bool]:
    """Boolean masks at the source's size (``[1 or T, h, w]``, True = regenerate), or ``None``: no mask.

    The second value is False when no mask could be made (no mask, no annotator): the source is then
    kept, whole frame editable.
    """
    si = plan.source_index
    assert si is not None  # a Plan of an editing task always has one (plan validation)
    source = media[si]
    width, height = source.size
    if plan.mask_index is None:
        if plan.task is Task.VIDEO_EDITING and salient is not None:
            # VACE's salient mode: the first frame of the clip decides the mask of every frame.
            saliency = salient(np.ascontiguousarray(source.frames[0, :, :, :3]))
            notes.append(f"no mask given: the main subject of {_label(si, source)}'s first frame (VACE's salient "
                         "annotator) is regenerated, as Unison does")
            return (saliency > 0)[None], True
        video = plan.task is Task.VIDEO_EDITING
        notes.append(NO_SALIENT_NOTE if video else "no mask given: the whole frame is editable")
        return None, False

    mi = plan.mask_index
    mask_medium = media[mi]
    label = _label(mi, mask_medium)
    m_count = mask_medium.frames.shape[0]
    if m_count == 1:
        masks = luma_u8(mask_medium.frames[:1])
    else:
        ids = [i for i in fit.frame_ids if i < m_count]
        if len(ids) < len(fit.frame_ids):
            raise MediaError(f"mask {label} has {m_count} frames, fewer than the source's: give a mask video as long "
                             "as the source, or one mask image for every frame")
        if m_count != source.frames.shape[0]:
            notes.append(f"mask {label} has {m_count} frames and the source {source.frames.shape[0]}: mask frames "
                         "are taken at the source's frame ids")
        masks = luma_u8(mask_medium.frames[list(ids)])
    if mask_medium.size != source.size:
        notes.append(f"mask {label} ({mask_medium.size[0]}x{mask_medium.size[1]}) is resized (nearest) to the "
                     f"source's {width}x{height}")
        masks = nearest_resize(masks, width, height)
    bool_masks = masks > 0
    if not bool_masks.any():
        notes.append(f"mask {label} marks no pixel to regenerate (all black): the source frames are kept")
    return bool_masks, True


def _editing(plan: Plan, media: Sequence[Medium], inputs: VaceInputs, fit: ClipFit, salient: SalientFn | None) -> None:
    assert plan.source_index is not None
    source = media[plan.source_index]
    if note := _crop_note(_label(plan.source_index, source), source, plan):
        inputs.notes.append(note)
    masks, masked = _source_masks(plan, media, fit, inputs.notes, salient)
    ids = list(fit.frame_ids)
    for start in range(0, len(ids), _CHUNK):
        chunk_ids = ids[start : start + _CHUNK]
        frames = source.frames[chunk_ids, :, :, :3].copy()
        stop = start + len(chunk_ids)
        if masks is None:
            inputs.frames[start:stop] = cover_frames(frames, plan.width, plan.height)
            continue
        bool_masks = masks if masks.shape[0] == 1 else masks[start:stop]
        bool_masks = np.broadcast_to(bool_masks, frames.shape[:3])
        frames[bool_masks] = MASK_COLOR  # InpaintingVideoAnnotator.apply_plain_mask
        inputs.frames[start:stop] = cover_frames(frames, plan.width, plan.height)
        mask_u8 = np.where(bool_masks, np.uint8(255), np.uint8(0))
        inputs.masks[start:stop] = cover_mask(mask_u8, plan.width, plan.height)
    if not masked:
        inputs.masks.fill_(1.0)


def _controllable(plan: Plan, media: Sequence[Medium], inputs: VaceInputs, fit: ClipFit) -> None:
    found = _role_indices(plan, "control")
    i = found[0]
    if len(found) > 1:
        names = ", ".join(_label(j, media[j]) for j in found[1:])
        inputs.notes.append(f"{len(found)} control media given; only {_label(i, media[i])} is used, not {names}")
    if note := _crop_note(_label(i, media[i]), media[i], plan):
        inputs.notes.append(note)
    ids = list(fit.frame_ids)
    for start in range(0, len(ids), _CHUNK):
        chunk = media[i].frames[ids[start : start + _CHUNK]]
        inputs.frames[start : start + chunk.shape[0]] = cover_frames(chunk, plan.width, plan.height)


def _reference(plan: Plan, media: Sequence[Medium], inputs: VaceInputs) -> None:
    refs = [contain_on_white(media[i].frames[0], plan.width, plan.height) for i in _role_indices(plan, "reference")]
    inputs.references = torch.stack(refs)


def _image_to_video(plan: Plan, media: Sequence[Medium], inputs: VaceInputs) -> None:
    # Each frame image is placed, unmasked, at its position (first, last, or both ends: VACE's
    # first+last-frame recipe); every other frame is grey with mask 1.
    placed = frame_positions(plan)
    found = _role_indices(plan, "frame")
    if len(found) > len(placed):
        names = ", ".join(_label(j, media[j]) for j in found[len(placed):])
        inputs.notes.append(
            f"{len(found)} media have role 'frame'; {plan.frame_index!r} places {len(placed)}, not {names}"
        )
    for i, at in placed:
        if note := _crop_note(_label(i, media[i]), media[i], plan):
            inputs.notes.append(note)
        inputs.frames[at] = cover_frames(media[i].frames, plan.width, plan.height)[0]
        inputs.masks[at] = 0.0


#: What each task changes in the blank inputs; text-to-image and text-to-video keep them blank. Tasks
#: that read a source clip (editing, control) take its frame ids too (see prepare_vace_inputs).
_RECIPES = {
    Task.IMAGE_REFERENCE: _reference,
    Task.VIDEO_REFERENCE: _reference,
    Task.IMAGE_TO_VIDEO: _image_to_video,
}


def prepare_vace_inputs(plan: Plan, media: Sequence[Medium], *, salient: SalientFn | None = None) -> VaceInputs:
    """The VACE source frames, masks and reference images for ``plan`` (DESIGN §3).

    ``media`` are the decoded media in the order of ``plan.media``. Validation runs first
    (:func:`check_vace_media`); the recipe per task is in this module's docstring. ``salient``
    (e.g. ``SalientAnnotator(...).saliency`` from :mod:`.salient`) masks a video edit given no mask,
    as Unison does; without it such an edit keeps the source and says so in the notes. The
    result may be at another size or length than the plan: use :meth:`VaceInputs.used_plan`.
    """
    check_vace_media(plan, media)
    notes: list[str] = []
    plan, fit = _fit(plan, media, notes)
    inputs = _blank(plan)
    inputs.notes.extend(notes)
    if plan.task in (Task.IMAGE_EDITING, Task.VIDEO_EDITING):
        assert fit is not None
        _editing(plan, media, inputs, fit, salient)
    elif plan.task in (Task.IMAGE_CONTROLLABLE, Task.VIDEO_CONTROLLABLE):
        assert fit is not None
        _controllable(plan, media, inputs, fit)
    elif plan.task in _RECIPES:
        _RECIPES[plan.task](plan, media, inputs)
    return inputs


# --------------------------------------------------------------------------- ComfyUI tensors


def to_comfy_vace_inputs(inputs: VaceInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(control_video [T,H,W,3], control_masks [T,H,W], reference_image [1,H,W,3] | None)``.

    What ComfyUI's ``WanVaceToVideo`` takes as ``control_video`` (IMAGE, 0.5 = no control),
    ``control_masks`` (MASK, 1 = regenerate) and ``reference_image`` (IMAGE). Everything is at
    the plan's size already, so its own centre-crop resize leaves the values unchanged; wire the
    plan's width/height/num_frames into its width/height/length. ``WanVaceToVideo`` encodes only
    ``reference_image[:1]``, so only the first reference is returned (check
    ``inputs.references.shape[0]`` to tell the user when more were given).
    """
    reference = inputs.references[:1].clone() if inputs.references.shape[0] else None
    return inputs.frames.clone(), inputs.masks.clone(), reference


def _to_uint8(values: torch.Tensor) -> np.ndarray:
    return (values.detach().to("cpu", torch.float32).clamp(0.0, 1.0) * 255.0 + 0.5).floor().to(torch.uint8).numpy()


def medium_from_comfy_image(name: str, kind: str, image: torch.Tensor, fps: float | None = None) -> Medium:
    """A ComfyUI IMAGE (float ``[B,H,W,C]`` in 0..1) as a :class:`Medium` of ``kind``.

    ``kind="image"`` needs a batch of one; ``kind="video"`` reads the batch as frames in order.
    One channel is repeated to RGB, a fourth (alpha) is dropped.
    """
    if kind not in ("image", "video"):
        raise MediaError(f"input {name!r}: kind must be 'image' or 'video', got {kind!r}")
    if not isinstance(image, torch.Tensor):
        raise MediaError(f"input {name!r}: expected an IMAGE tensor [B,H,W,C], got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:3]) < 1:
        raise MediaError(
            f"input {name!r}: expected an IMAGE tensor [B,H,W,C] with C 1, 3 or 4, got {tuple(image.shape)}"
        )
    if kind == "image" and image.shape[0] != 1:
        raise MediaError(
            f"input {name!r}: an image input holds {image.shape[0]} images; expected 1 "
            "(pass it as a video, or pick one image from the batch)"
        )
    frames = _to_uint8(image)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return Medium(name=name, kind=kind, frames=np.ascontiguousarray(frames[..., :3]), fps=fps)


def medium_from_comfy_mask(name: str, mask: torch.Tensor, kind: str | None = None) -> Medium:
    """A ComfyUI MASK (``[B,H,W]`` or ``[H,W]``, 1 = regenerate) as a grey :class:`Medium`.

    ``kind`` defaults to ``"image"`` for one mask and ``"video"`` for a batch, the same rule the
    node should use for the matching ``MediaRef``.
    """
    if not isinstance(mask, torch.Tensor):
        raise MediaError(f"input {name!r}: expected a MASK tensor [B,H,W], got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or min(mask.shape) < 1:
        raise MediaError(f"input {name!r}: expected a MASK tensor [B,H,W], got {tuple(mask.shape)}")
    kind = kind or ("image" if mask.shape[0] == 1 else "video")
    if kind == "image" and mask.shape[0] != 1:
        raise MediaError(f"input {name!r}: an image mask holds {mask.shape[0]} masks; expected 1")
    if kind not in ("image", "video"):
        raise MediaError(f"input {name!r}: kind must be 'image' or 'video', got {kind!r}")
    frames = np.repeat(_to_uint8(mask)[..., None], 3, axis=-1)
    return Medium(name=name, kind=kind, frames=frames)
