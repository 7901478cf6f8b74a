"""VACE inputs for each generation task: source frames, masks and reference images (DESIGN §3).

:func:`prepare_vace_inputs` turns a :class:`~unison_runtime.plan.Plan` and the user's decoded
media into :class:`VaceInputs` at the plan's size and frame count. The engine feeds them to
Wan2.1-VACE (``frames * 2 - 1`` is its [-1, 1] video; ``inactive = video * (1 - mask)``,
``reactive = video * mask``); :func:`to_comfy_vace_inputs` hands the same recipe to ComfyUI's
``WanVaceToVideo`` (which uses 0.5 as its neutral grey and pads with 0.5 / mask 1 likewise).

Conventions (one place, so both paths agree):

* Grey is 0.5 (zero in [-1, 1]); mask 1 = regenerate, 0 = keep.
* Geometry and filters are those of :mod:`.resize`: media are centre-cropped to the target aspect
  and resized with antialiased bicubic; masks are binarized at 0.5 (brightest channel) and resized
  with nearest-exact; references are aspect-kept on a white canvas.
* Time: a video longer than the plan's ``num_frames`` contributes its **first** N frames (as
  ``WanVaceToVideo`` does with ``control_video[:length]``); no resampling by fps. A shorter source
  or control video is **padded with grey frames whose mask is 1**: the missing tail is generated
  freely, continuing the given frames (VACE's own extension recipe and ``WanVaceToVideo``'s
  padding). Repeating the last frame instead would pin the tail to a frozen picture.
* Masks in time: a single-frame mask (an image, or a 1-frame video) applies to every source
  frame; a mask video covers frame for frame, and source frames past its end are fully editable
  (mask 1, again as ``WanVaceToVideo`` pads). Frames past the source's end are always mask 1.

Every deviation from the plain recipe (cropping, truncation, padding, a missing mask) is told in
``VaceInputs.notes`` so the node can show it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import MediaError, PlanError
from ..media import Medium
from ..plan import Plan, Task, frame_positions
from .resize import center_crop_box, contain_on_white, cover_frames, cover_mask

GREY = 0.5

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
    """What Wan2.1-VACE is conditioned on, at the plan's size.

    ``frames``: float32 ``[T,H,W,3]`` in 0..1 (0.5 = grey, i.e. zero in [-1, 1]);
    ``masks``: float32 ``[T,H,W]`` in {0, 1}, 1 = regenerate;
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
        """(width, height)."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])


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


def _crop_note(label: str, medium: Medium, plan: Plan) -> str | None:
    w, h = medium.size
    _left, _top, cw, ch = center_crop_box(w, h, plan.width, plan.height)
    if (cw, ch) == (w, h):
        return None
    return f"{label} is {w}x{h}: centre-cropped to {cw}x{ch} to match the {plan.width}x{plan.height} target"


def _fitted_frames(label: str, medium: Medium, plan: Plan, notes: list[str], what: str) -> torch.Tensor:
    """The first ``num_frames`` frames of ``medium``, covered to the target size."""
    n = plan.num_frames
    count = medium.frames.shape[0]
    if medium.kind == "video" and count > n:
        notes.append(f"{what} {label} has {count} frames; the first {n} are used")
    if note := _crop_note(label, medium, plan):
        notes.append(note)
    return cover_frames(medium.frames[:n], plan.width, plan.height)


def _pad_note(notes: list[str], what: str, label: str, count: int, n: int, effect: str) -> None:
    if count < n:
        span = f"frame {count}" if count == n - 1 else f"frames {count}-{n - 1}"
        notes.append(f"{what} {label} has {count} frames, the plan asks for {n}: {span} {effect}")


def _editing(plan: Plan, media: Sequence[Medium], inputs: VaceInputs) -> None:
    notes, frames, masks = inputs.notes, inputs.frames, inputs.masks
    n = plan.num_frames
    si = plan.source_index
    assert si is not None  # a Plan of an editing task always has one (plan validation)
    source = media[si]
    src_label = _label(si, source)
    covered = _fitted_frames(src_label, source, plan, notes, "source")
    k = covered.shape[0]
    frames[:k] = covered
    _pad_note(notes, "source", src_label, k, n, "are grey and generated freely (mask 1)")

    if plan.mask_index is None:
        notes.append("no mask given: the whole frame is editable")
        return

    mi = plan.mask_index
    mask_medium = media[mi]
    mask_label = _label(mi, mask_medium)
    if mask_medium.size[0] * source.size[1] != mask_medium.size[1] * source.size[0]:
        notes.append(
            f"mask {mask_label} ({mask_medium.size[0]}x{mask_medium.size[1]}) and source {src_label} "
            f"({source.size[0]}x{source.size[1]}) differ in aspect ratio; each was centre-cropped to the "
            "target, so they may not line up"
        )
    m_count = mask_medium.frames.shape[0]
    fitted = cover_mask(mask_medium.frames[:k], plan.width, plan.height)
    if m_count == 1:
        masks[:k] = fitted.expand(k, -1, -1)
    else:
        masks[: fitted.shape[0]] = fitted
        if m_count > k:
            notes.append(f"mask {mask_label} has {m_count} frames; the first {k} (one per source frame) are used")
        _pad_note(notes, "mask", mask_label, m_count, k, "are fully editable (mask 1)")
    if not fitted.any():
        notes.append(f"mask {mask_label} marks no pixel to regenerate (all dark): the source frames are kept")


def _controllable(plan: Plan, media: Sequence[Medium], inputs: VaceInputs) -> None:
    found = _role_indices(plan, "control")
    i = found[0]
    if len(found) > 1:
        names = ", ".join(_label(j, media[j]) for j in found[1:])
        inputs.notes.append(f"{len(found)} control media given; only {_label(i, media[i])} is used, not {names}")
    label = _label(i, media[i])
    covered = _fitted_frames(label, media[i], plan, inputs.notes, "control")
    inputs.frames[: covered.shape[0]] = covered
    _pad_note(inputs.notes, "control", label, covered.shape[0], plan.num_frames, "have no control (grey, mask 1)")


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


#: What each task changes in the blank inputs; text-to-image and text-to-video keep them blank.
_RECIPES = {
    Task.IMAGE_EDITING: _editing,
    Task.VIDEO_EDITING: _editing,
    Task.IMAGE_CONTROLLABLE: _controllable,
    Task.VIDEO_CONTROLLABLE: _controllable,
    Task.IMAGE_REFERENCE: _reference,
    Task.VIDEO_REFERENCE: _reference,
    Task.IMAGE_TO_VIDEO: _image_to_video,
}


def prepare_vace_inputs(plan: Plan, media: Sequence[Medium]) -> VaceInputs:
    """The VACE source frames, masks and reference images for ``plan`` (DESIGN §3).

    ``media`` are the decoded media in the order of ``plan.media``. Validation runs first
    (:func:`check_vace_media`); the recipe per task is in this module's docstring.
    """
    check_vace_media(plan, media)
    inputs = _blank(plan)
    if plan.task in _RECIPES:
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
