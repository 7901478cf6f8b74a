"""Find the model files Unison needs in ComfyUI-style model folders.

The same sub-folder names serve both worlds: inside ComfyUI the node adapters pass the folders
``folder_paths`` knows (``diffusion_models``, ``vae``, ``text_encoders`` and the pack's own
``unison``); outside it, ``--models DIR`` means ``DIR/diffusion_models``, ``DIR/vae``,
``DIR/text_encoders``, ``DIR/unison`` (ComfyUI's legacy ``unet``/``clip`` names count too). This
module never imports ComfyUI: callers hand it lists of folders.

Files are recognised by what they hold (their safetensors header, read in microseconds), not by
their names, so a renamed Comfy-Org file is found and a plain Wan T2V model is never picked as
the VACE model. Pickle files (``.pth``), which have no header, are recognised by Wan's release names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UnisonError, WeightsError

KINDS = ("diffusion_models", "vae", "text_encoders", "unison")
#: ComfyUI's legacy folder names (``folder_paths.py`` maps them the same way).
LEGACY = {"unet": "diffusion_models", "clip": "text_encoders"}
SAFETENSORS = ".safetensors"
MAX_DEPTH = 3  # ComfyUI lists sub-folders too; deeper trees are not model folders
WEIGHT_SUFFIXES = (SAFETENSORS, ".pth", ".pt", ".bin", ".ckpt")

EXPECTED = {
    "transformer": "a Wan2.1-VACE transformer, e.g. Comfy-Org's wan2.1_vace_1.3B_fp16.safetensors or Wan's "
    "diffusion_pytorch_model.safetensors (in a Wan2.1-VACE-1.3B folder)",
    "vae": "the Wan 2.1 VAE: wan_2.1_vae.safetensors or Wan's Wan2.1_VAE.pth",
    "text_encoder": "umT5-XXL: umt5_xxl_fp16.safetensors / umt5_xxl_fp8_e4m3fn_scaled.safetensors, Wan's "
    "models_t5_umt5-xxl-enc-bf16.pth, or an HF umt5-xxl folder",
}
FOLDER_OF = {"transformer": "diffusion_models", "vae": "vae", "text_encoder": "text_encoders"}


@dataclass
class ModelPaths:
    """Where each model is; ``None`` when not found (stage-one parts are optional)."""

    transformer: Path | None = None
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None  # only when the text encoder carries none (Wan's .pth)
    diffusers_dir: Path | None = None  # a whole diffusers Wan-VACE folder, if the user has one
    planner_model: Path | None = None  # Qwen2.5-VL folder: the base for the LoRA, or a merged planner
    planner_lora: Path | None = None  # the Unison planning LoRA adapter folder
    projector: Path | None = None
    looked_in: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def has_generation(self) -> bool:
        return self.diffusers_dir is not None or None not in (self.transformer, self.vae, self.text_encoder)

    def require_generation(self) -> ModelPaths:
        """Raise a :class:`WeightsError` naming the folder searched and the file expected for each
        missing stage-two model; return ``self`` otherwise."""
        if self.diffusers_dir is not None:
            return self
        problems = []
        for part in ("transformer", "vae", "text_encoder"):
            if getattr(self, part) is None:
                folders = self.looked_in.get(FOLDER_OF[part], [])
                where = ", ".join(str(f) for f in folders) or f"(no {FOLDER_OF[part]} folder given)"
                problems.append(f"no {part.replace('_', ' ')} found in {where}; expected {EXPECTED[part]}")
        if problems:
            extra = "; ".join(self.notes)
            raise WeightsError("; ".join(problems) + (f" ({extra})" if extra else ""))
        return self


@dataclass(frozen=True)
class Found:
    """One candidate file or folder and what it is (for node dropdowns and error messages)."""

    path: Path
    kind: str
    summary: str
    size: str | None = None
    dtype: str = "?"


# --------------------------------------------------------------------------- folders


def folders_in(models_dir: str | Path) -> dict[str, list[Path]]:
    """The ComfyUI-style sub-folders of ``models_dir`` that exist, per kind."""
    root = Path(models_dir)
    if not root.is_dir():
        raise WeightsError(f"models folder {root} does not exist; expected a folder with diffusion_models/, vae/, "
                           "text_encoders/ and unison/ inside")
    out: dict[str, list[Path]] = {kind: [] for kind in KINDS}
    for name in (*KINDS, *LEGACY):
        folder = root / name
        if folder.is_dir():
            out[LEGACY.get(name, name)].append(folder)
    for kind in KINDS:
        if not out[kind]:
            out[kind] = [root / kind]  # named in messages even when absent
    return out


def walk_models(folder: Path) -> Iterator[Path]:
    """Files and folders under ``folder`` (sorted, hidden ones skipped, at most MAX_DEPTH deep)."""
    if not folder.is_dir():
        return
    base_depth = len(folder.parts)
    for current, dirs, names in os.walk(folder, followlinks=True):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if len(here.parts) - base_depth >= MAX_DEPTH:
            dirs[:] = []
        for d in dirs:
            yield here / d
        for name in sorted(names):
            if not name.startswith("."):
                yield here / name


def _header_identity(path: Path) -> Any:
    from .vace.wan_keys import identify, shapes_from_header
    from .weights import read_safetensors_header

    try:
        return identify(shapes_from_header(read_safetensors_header(path, what="model")))
    except (WeightsError, KeyError, IndexError, TypeError, ValueError):
        return None


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _scan(folders: Sequence[Path]) -> list[Found]:
    """Recognise every model file and folder under ``folders``."""
    found: list[Found] = []
    for folder in folders:
        for path in walk_models(Path(folder)):
            item = _recognise(path)
            if item is not None:
                found.append(item)
    return found


def is_lora_dir(path: Path) -> bool:
    """A peft adapter folder, as the Unison planning LoRA is released."""
    return path.is_dir() and (path / "adapter_config.json").is_file()


def is_projector_name(name: str) -> bool:
    """A Unison projector file, told by its name: its weights (a small MLP) have no telling header."""
    return "projector" in name.lower() and name.lower().endswith(WEIGHT_SUFFIXES)


def _recognise(path: Path) -> Found | None:
    name = path.name.lower()
    if path.is_dir():
        index = _json(path / "model_index.json")
        if index.get("_class_name") == "WanVACEPipeline":
            return Found(path, "wan-vace-diffusers", "Wan2.1-VACE in the diffusers layout")
        if is_lora_dir(path):
            return Found(path, "lora", "LoRA adapter")
        config = _json(path / "config.json")
        if config.get("model_type") == "qwen2_5_vl":
            return Found(path, "qwen2_5_vl", "Qwen2.5-VL model folder")
        if config.get("model_type") == "umt5":
            return Found(path, "umt5-dir", "umT5 text encoder (transformers folder)")
        return None
    if is_projector_name(name):
        return Found(path, "projector", "Unison projector")
    if name.endswith(SAFETENSORS):
        identity = _header_identity(path)
        if identity is None or identity.kind == "unknown":
            return None
        return Found(path, identity.kind, identity.summary, identity.size, identity.dtype)
    if name.endswith(WEIGHT_SUFFIXES):
        if "vae" in name and "wan" in name:
            return Found(path, "wan-vae", "Wan VAE (Wan's .pth)")
        if "umt5" in name:
            return Found(path, "umt5-wan", "umT5-XXL text encoder (Wan's .pth)")
    return None


# --------------------------------------------------------------------------- choosing


def _precision_rank(item: Found) -> int:
    # Full precision first: fp8 is a fallback for small GPUs, not a default.
    return {"BF16": 0, "F16": 0, "F32": 1}.get(item.dtype, 2)


def pick_transformer(found: Sequence[Found]) -> Found | None:
    """The VACE transformer to use by default: 1.3B (what Unison was trained with) first, then
    higher precision, then the name."""
    vace = [f for f in found if f.kind == "wan-vace"]
    return min(vace, key=lambda f: (f.size != "1.3B", _precision_rank(f), str(f.path)), default=None)


def pick_vae(found: Sequence[Found]) -> Found | None:
    vaes = [f for f in found if f.kind == "wan-vae" and "2.2" not in f.summary]
    return min(vaes, key=lambda f: (not str(f.path).endswith(SAFETENSORS), str(f.path)), default=None)


def pick_text_encoder(found: Sequence[Found]) -> Found | None:
    encoders = [f for f in found if f.kind in ("umt5", "umt5-dir", "umt5-wan")]
    return min(encoders, key=lambda f: (_precision_rank(f) if f.kind == "umt5" else 1, str(f.path)), default=None)


def _pick_planner(found: Sequence[Found]) -> tuple[Path | None, Path | None]:
    """(Qwen2.5-VL folder, LoRA folder). With a LoRA, the base its adapter_config names; without
    one, a merged planner (a Qwen folder named like Unison / merged) before a plain base."""
    qwens = sorted((f.path for f in found if f.kind == "qwen2_5_vl"), key=str)
    loras = sorted((f.path for f in found if f.kind == "lora"), key=lambda p: ("unison" not in p.name.lower(), str(p)))
    lora = loras[0] if loras else None

    def merged(path: Path) -> bool:
        return any(word in path.name.lower() for word in ("unison", "merged"))

    if lora is not None:
        base_name = Path(str(_json(lora / "adapter_config.json").get("base_model_name_or_path") or "")).name.lower()
        named = [q for q in qwens if base_name and q.name.lower() == base_name]
        plain = [q for q in qwens if not merged(q)]
        return (named or plain or qwens or [None])[0], lora
    preferred = [q for q in qwens if merged(q)] or qwens
    return (preferred[0] if preferred else None), None


def _projector(found: Sequence[Found]) -> Path | None:
    projectors = [f.path for f in found if f.kind == "projector"]
    return min(projectors, key=lambda p: (p.suffix != SAFETENSORS, str(p)), default=None)


def find_models_in(
    folders: Mapping[str, Sequence[str | Path]],
    *,
    explicit: Mapping[str, str | Path | None] | None = None,
    require_generation: bool = False,
) -> ModelPaths:
    """Choose the models from per-kind folder lists (what ComfyUI's ``folder_paths`` gives).

    ``explicit`` paths (keys as :class:`ModelPaths` fields) win over the search and must exist.
    With ``require_generation`` a missing stage-two model raises a :class:`WeightsError` that
    names the folders searched and the file expected.
    """
    looked_in = {kind: [Path(f) for f in folders.get(kind, ())] for kind in KINDS}
    paths = ModelPaths(looked_in=looked_in)
    stage_two = _scan(looked_in["diffusion_models"]) + _scan(looked_in["vae"]) + _scan(looked_in["text_encoders"])

    transformer = pick_transformer(stage_two)
    if transformer is not None:
        paths.transformer = transformer.path
        # Wan's release folder keeps VAE, umT5 and tokenizer next to the transformer.
        if transformer.path.parent not in looked_in["diffusion_models"]:
            stage_two += _scan([transformer.path.parent])
    else:
        others = [f for f in stage_two if f.kind in ("wan-video", "wan-vace-module", "wan-transformer-diffusers")]
        for other in others[:3]:
            paths.notes.append(f"{other.path.name} is a {other.summary}, not usable")
    diffusers = [f.path for f in stage_two if f.kind == "wan-vace-diffusers"]
    paths.diffusers_dir = diffusers[0] if diffusers else None
    vae, encoder = pick_vae(stage_two), pick_text_encoder(stage_two)
    paths.vae = vae.path if vae else None
    paths.text_encoder = encoder.path if encoder else None
    if encoder is not None and encoder.kind == "umt5-wan":
        from .vace.umt5_files import is_tokenizer_dir

        near = [encoder.path.parent / "google" / "umt5-xxl", encoder.path.parent / "umt5-xxl"]
        paths.tokenizer = next((p for p in near if is_tokenizer_dir(p)), None)

    unison = _scan(looked_in["unison"])
    paths.planner_model, paths.planner_lora = _pick_planner(unison)
    paths.projector = _projector(unison)

    for name, value in (explicit or {}).items():
        if value is None:
            continue
        if not hasattr(paths, name) or name in ("looked_in", "notes"):
            raise UnisonError(f"unknown model part {name!r}; expected one of transformer, vae, text_encoder, "
                              "tokenizer, diffusers_dir, planner_model, planner_lora, projector")
        path = Path(value)
        if not path.exists():
            raise WeightsError(f"{name.replace('_', ' ')} {path} does not exist")
        setattr(paths, name, path)
    return paths.require_generation() if require_generation else paths


def find_models(
    models_dir: str | Path,
    *,
    explicit: Mapping[str, str | Path | None] | None = None,
    require_generation: bool = False,
) -> ModelPaths:
    """Choose the models under a ComfyUI-style ``models`` folder (the CLI's ``--models DIR``)."""
    return find_models_in(folders_in(models_dir), explicit=explicit, require_generation=require_generation)


def list_models(kind: str, folders: Sequence[str | Path]) -> list[Found]:
    """Every recognised model of one ComfyUI folder kind, for a node's dropdown or a listing.

    ``kind`` is a folder kind (``diffusion_models``, ``vae``, ``text_encoders``, ``unison``);
    only what belongs there is returned (VACE transformers, Wan VAEs, umT5 encoders; planners,
    LoRAs and projectors).
    """
    wanted = {
        "diffusion_models": ("wan-vace", "wan-vace-diffusers"),
        "vae": ("wan-vae",),
        "text_encoders": ("umt5", "umt5-dir", "umt5-wan"),
        "unison": ("qwen2_5_vl", "lora", "projector"),
    }
    if kind not in wanted:
        raise UnisonError(f"unknown model folder kind {kind!r}; expected one of {', '.join(KINDS)}")
    return [f for f in _scan([Path(f) for f in folders]) if f.kind in wanted[kind]]
