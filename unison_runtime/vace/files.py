"""Load Wan2.1-VACE from the single files users already have, into diffusers / transformers modules.

Supported, with nothing converted on disk and nothing fetched:

* transformer: Wan's original ``diffusion_pytorch_model.safetensors`` (or its shards), and
  Comfy-Org's ``wan2.1_vace_*.safetensors`` (same names, maybe behind ``model.diffusion_model.``),
  in fp32 / fp16 / bf16 / fp8 (plain or scaled);
* VAE: Wan's ``Wan2.1_VAE.pth`` and ComfyUI's ``wan_2.1_vae.safetensors``;
* text encoder: an HF ``umt5-xxl`` folder, Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (+ its
  tokenizer folder), ComfyUI's ``umt5_xxl_fp16.safetensors`` / ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``.

The modules are the same classes the diffusers-layout loader returns (``WanVACETransformer3DModel``,
``AutoencoderKLWan``, ``UMT5EncoderModel``), so everything downstream is shared. Configs are the
ones shipped in ``unison_runtime/configs`` with every size read from the weights. A file of the
wrong kind is refused from its header, before its tensors are read, with what was found and what
was expected. Default dtypes and devices are those of the diffusers-layout loader
(:func:`~unison_runtime.vace.loading.resolve_dtype`), whatever precision a file is stored in, so
both loaders give the same numbers for the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from ..weights import load_state_dict, read_safetensors_header
from . import umt5_files
from .compute import prepare_transformer
from .converting_load import (
    DtypeRule,
    SafetensorsSource,
    StateDictSource,
    StateSource,
    assemble_module,
    dtype_rule,
    empty_module,
    load_converted,
    needs_conversion,
    pickle_source,
)
from .loading import default_device, resolve_dtype
from .loading import load_text_encoder as load_text_encoder_dir
from .models import VaceModels
from .quantized import is_quant_bookkeeping
from .stored_precision import apply_stored_precision, plan_stored, scales_for
from .wan_keys import (
    COMFY_PREFIX,
    QUANT_MARKER_KEY,
    QUANT_SUFFIXES,
    SCHEDULER_CONFIG_DIR,
    FileIdentity,
    compare_layout,
    expected_transformer_shapes,
    expected_vae_shapes,
    identify,
    load_json,
    shapes_from_header,
    shapes_from_state_dict,
    transformer_config,
    vae_config,
)

logger = logging.getLogger(__name__)

PathLike = str | Path
ShapeTable = dict[str, tuple[str, tuple[int, ...]]]  # {tensor name: (safetensors dtype, shape)}

# What to tell a user who picked a file of another kind, by the kind found.
_HINTS = {
    "wan-video": "Unison generates with the VACE model; use Wan2.1-VACE-1.3B "
    "(Comfy-Org's wan2.1_vace_1.3B_fp16.safetensors or Wan's diffusion_pytorch_model.safetensors)",
    "wan-vace-module": "this pack needs the full VACE model (e.g. wan2.1_vace_1.3B_fp16.safetensors), "
    "not a module to merge into a text-to-video model",
    "wan-transformer-diffusers": "a diffusers-layout file is loaded with its whole folder (the one holding "
    "model_index.json), not on its own",
    "wan-vae": "this is the VAE: it belongs in the vae/ folder",
    "wan-vae-diffusers": "a diffusers-layout VAE is loaded with its whole diffusers folder",
    "umt5": "this is the umT5 text encoder: it belongs in the text_encoders/ folder",
    "umt5-wan": "this is the umT5 text encoder: it belongs in the text_encoders/ folder",
    "t5": "Wan needs umT5-XXL (umt5_xxl_fp16.safetensors / umt5_xxl_fp8_e4m3fn_scaled.safetensors), "
    "not the T5-XXL of Flux/SD3",
}


def _wrong_kind(path: Path, expected: str, identity: FileIdentity) -> WeightsError:
    hint = _HINTS.get(identity.kind)
    return WeightsError(
        f"{path}: expected {expected}, but the file holds {identity.summary}" + (f"; {hint}" if hint else "")
    )


def _layout_error(path: Path, what: str, missing: list[str], wrong: list[str]) -> WeightsError:
    parts = []
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        parts.append(f"missing {len(missing)} tensors ({', '.join(missing[:5])}{more})")
    if wrong:
        parts.append(f"unexpected shapes ({'; '.join(wrong[:3])})")
    return WeightsError(f"{path}: not a complete {what}: {', '.join(parts)}; the file may be truncated or of "
                        "another model")


def _gather(
    files: list[Path], state: dict[str, torch.Tensor] | None, names: dict[str, str], rule: DtypeRule, *,
    device: str | torch.device, what: str,
) -> dict[str, torch.Tensor]:
    """The model's tensors (``names``: model name -> stored name) in ``rule``'s dtypes, converted one at a time.

    ``state`` is ``None`` for safetensors (read from the files) or the pickle state already loaded.
    """
    source = _source(files, state, names, rule, what)
    return load_converted(source, names, rule, device=device)


def _source(
    files: list[Path], state: dict[str, torch.Tensor] | None, names: dict[str, str], rule: DtypeRule, what: str
) -> StateSource:
    if state is None:
        return SafetensorsSource(files, what=what)
    converts = needs_conversion(StateDictSource(state), names, rule)
    return pickle_source(files, state, what=what, converts=converts)


def _shapes_of(files: list[Path], what: str) -> ShapeTable:
    shapes: ShapeTable = {}
    for file in files:
        shapes.update(shapes_from_header(read_safetensors_header(file, what=what)))
    return shapes


def _load_all(files: list[Path], what: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_state_dict(file, what=what))
    return state


def _read_layout(files: list[Path], what: str) -> tuple[ShapeTable, dict[str, torch.Tensor] | None]:
    """``({name: (dtype, shape)}, state)`` of a weights file (or its shards), read as cheaply as possible.

    safetensors: from the headers alone, so a file of the wrong kind is refused before any tensor
    is read (``state`` is ``None``; load it once the layout checks pass). Pickles have no header:
    they are loaded here and the state is returned, so they are read only once.
    """
    if files[0].suffix.lower() == ".safetensors":
        return _shapes_of(files, what), None
    state = _load_all(files, what)
    return shapes_from_state_dict(state), state


# --------------------------------------------------------------------------- inspection


def inspect_file(path: PathLike) -> FileIdentity:
    """What a weights file holds, from its safetensors header (no tensor read).

    Pickle files (``.pth``) have no header: they are opened memory-mapped with the safe loader.
    """
    return identify(_read_layout([Path(path)], "model")[0])


# --------------------------------------------------------------------------- transformer


def _transformer_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a transformer: one file, or the shards Wan's 14B release uses."""
    if path.is_dir():
        single = path / "diffusion_pytorch_model.safetensors"
        index = path / "diffusion_pytorch_model.safetensors.index.json"
        if single.is_file():
            return [single]
        if index.is_file():
            path = index
        else:
            raise WeightsError(
                f"{path}: is a folder without Wan's diffusion_pytorch_model.safetensors; expected a VACE "
                "transformer file (or Wan's release folder)"
            )
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(load_json(path)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise WeightsError(f"{path}: not a readable shard index ({exc})") from None
        return [path.parent / name for name in shards]
    return [path]


def wan_model_config(folder: Path, dim: int) -> dict[str, Any]:
    """Wan's own ``config.json`` next to the weights, when it describes this model (heads, VACE layers)."""
    candidate = folder / "config.json"
    if not candidate.is_file():
        return {}
    try:
        data = load_json(candidate)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("model_type") != "vace" or data.get("dim") != dim:
        return {}
    return {k: data[k] for k in ("num_heads", "vace_layers") if k in data}


@dataclass
class _Loaded:
    module: Any
    description: str


def _load_transformer(
    path: PathLike, *, dtype: torch.dtype | str | None, device: str | torch.device, num_heads: int | None,
    cast_per_layer: bool = True,
) -> _Loaded:
    from diffusers import WanVACETransformer3DModel

    path = Path(path)
    what = "VACE transformer"
    files = _transformer_files(path)
    shapes, state = _read_layout(files, what)
    identity = identify(shapes)
    if identity.kind != "wan-vace":
        raise _wrong_kind(path, "a Wan2.1-VACE transformer in Wan's key names", identity)
    prefix = identity.prefix
    bare = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    wan_config = wan_model_config(files[0].parent, identity.details["dim"])
    try:
        config = transformer_config(
            bare, num_heads=num_heads or wan_config.get("num_heads"), vace_layers=wan_config.get("vace_layers")
        )
    except (ValueError, KeyError) as exc:
        raise WeightsError(f"{path}: cannot read the model size from the weights: {exc}") from None
    missing, unexpected, wrong = compare_layout(bare, expected_transformer_shapes(config), ignore=QUANT_SUFFIXES)
    unexpected = [k for k in unexpected if k != QUANT_MARKER_KEY]
    if missing or wrong:
        raise _layout_error(path, f"{identity.summary}", missing, wrong)
    if unexpected:
        logger.warning("%s: ignoring %d tensors a VACE transformer does not use: %s", path, len(unexpected),
                       ", ".join(unexpected[:5]))

    target = resolve_dtype(dtype, str(device), role="transformer")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    # diffusers' converter only renames (for VACE models), so it maps names, not tensors: tensors
    # are then read one at a time. A full checkpoint may also hold a VAE or text encoder: only
    # the transformer's tensors are named, the rest (and unexpected extras) is never read.
    names = convert_wan_transformer_to_diffusers({name: prefix + name for name in expected_transformer_shapes(config)})
    rule = dtype_rule(WanVACETransformer3DModel, target)
    empty = empty_module(lambda: WanVACETransformer3DModel.from_config(_public(config)))
    source = _source(files, state, names, rule, what)
    model, kept = _load_keeping_stored(empty, source, names, rule, target, device=device, path=path, what=what,
                                       cast_per_layer=cast_per_layer)
    layout = "Comfy-Org layout" if prefix == COMFY_PREFIX else "Wan key names"
    description = f"{path} ({identity.summary}, {layout}, stored {identity.dtype}, computing in {_name(target)}" \
        f"{_kept_note(kept)})"
    return _Loaded(model, description)


def _load_keeping_stored(
    empty: Any, source: StateSource, names: dict[str, str], rule: DtypeRule, target: torch.dtype, *,
    device: str | torch.device, path: Path, what: str, cast_per_layer: bool,
) -> tuple[Any, int]:
    """``empty`` given its tensors; with ``cast_per_layer``, narrow block weights stay stored
    (:mod:`.stored_precision`) instead of being converted to ``target``. Returns (module, kept count)."""
    kept: dict[str, torch.dtype] = {}
    scales: dict[str, torch.Tensor] = {}
    if cast_per_layer:
        stored = {name: source.dtype(stored) for name, stored in names.items() if stored in source}
        kept = plan_stored(empty, stored, {name: rule(name, dtype) for name, dtype in stored.items()})
        scales = scales_for(kept, names, source)
    tensors = load_converted(source, names, rule, device=device, keep_stored=kept)
    model = assemble_module(empty, tensors, device=device, path=path, what=what)
    count = apply_stored_precision(model, kept, scales) if kept else 0
    return model, count


def _kept_note(count: int) -> str:
    return f"; {count} layers kept as stored and cast per layer" if count else ""


def load_transformer_file(
    path: PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
    cast_per_layer: bool = True,
) -> Any:
    """Load a Wan2.1-VACE transformer single file into ``diffusers.WanVACETransformer3DModel``.

    ``path``: the ``.safetensors`` file, a shard index (``*.safetensors.index.json``) or Wan's
    release folder. ``dtype``: ``None`` picks as the diffusers loader does (bf16 on a GPU, fp32 on
    the CPU); fp8 weights are dequantized to it. ``num_heads`` only for non-standard models: Wan's
    sizes use 128-wide heads, and Wan's ``config.json`` next to the file is read when present.
    Refuses plain T2V/I2V models, VAEs, text encoders and incomplete files with a
    :class:`WeightsError` naming the file. ``cast_per_layer``: block weights stored narrower than
    ``dtype`` (fp16, fp8) stay as stored and are cast layer by layer (:mod:`.stored_precision`).
    """
    return _load_transformer(path, dtype=dtype, device=device, num_heads=num_heads,
                             cast_per_layer=cast_per_layer).module


# --------------------------------------------------------------------------- VAE


def _load_vae(path: PathLike, *, dtype: torch.dtype | str | None, device: str | torch.device) -> _Loaded:
    from diffusers import AutoencoderKLWan

    path = Path(path)
    what = "Wan VAE"
    shapes, state = _read_layout([path], what)
    identity = identify(shapes)
    expected = "the Wan 2.1 VAE (Wan2.1_VAE.pth or wan_2.1_vae.safetensors)"
    if identity.kind != "wan-vae" or identity.details.get("z_dim") == 48:  # the Wan 2.2 VAE does not fit
        raise _wrong_kind(path, expected, identity)
    try:
        config = vae_config(shapes)
    except KeyError as exc:
        raise _layout_error(path, "Wan VAE", [str(exc).strip("'")], []) from None
    missing, unexpected, wrong = compare_layout(shapes, expected_vae_shapes(config))
    if missing or wrong:
        raise _layout_error(path, "Wan VAE", missing, wrong)
    for name in unexpected:
        logger.warning("%s: ignoring tensor %s, not part of the Wan VAE", path, name)
    target = resolve_dtype(dtype, str(device), role="vae")
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    names = convert_wan_vae_to_diffusers({name: name for name in expected_vae_shapes(config)})
    tensors = _gather([path], state, names, dtype_rule(AutoencoderKLWan, target), device=device, what=what)
    model = assemble_module(empty_module(lambda: AutoencoderKLWan.from_config(_public(config))), tensors,
                            device=device, path=path, what=what)
    return _Loaded(model, f"{path} ({identity.summary}, stored {identity.dtype}, computing in {_name(target)})")


def load_vae_file(path: PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> Any:
    """Load the Wan 2.1 VAE from ``Wan2.1_VAE.pth`` / ``wan_2.1_vae.safetensors`` into ``AutoencoderKLWan``.

    ``dtype`` defaults to float32, as in the diffusers loader.
    """
    return _load_vae(path, dtype=dtype, device=device).module


# --------------------------------------------------------------------------- text encoder


def _find_tokenizer_near(path: Path) -> Path | None:
    """Where Wan's release keeps the umT5 tokenizer, relative to the encoder weights."""
    folder = path.parent if path.is_file() else path
    for candidate in (folder / "google" / "umt5-xxl", folder / "umt5-xxl", folder / "tokenizer",
                      folder.parent / "tokenizer", folder):
        if umt5_files.is_tokenizer_dir(candidate):
            return candidate
    return None


def _tokenizer_from(value: Any) -> Any:
    if isinstance(value, str | Path):
        folder = Path(value)
        if not umt5_files.is_tokenizer_dir(folder):
            raise WeightsError(f"tokenizer {folder}: expected a folder with tokenizer.json or spiece.model")
        return umt5_files.load_tokenizer_dir(folder)
    return value


def _load_hf_text_encoder_dir(
    folder: Path, tokenizer: Any, dtype: torch.dtype, device: str | torch.device
) -> _Loaded:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder}: expected an umT5-XXL folder with config.json (like google/umt5-xxl)")
    try:
        model_type = load_json(config_path).get("model_type")
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{config_path}: not readable JSON ({exc})") from None
    if model_type != "umt5":
        raise WeightsError(f"{folder}: config.json says model_type {model_type!r}; expected 'umt5' (umT5-XXL)")
    model = load_text_encoder_dir(folder, dtype=dtype, device=str(device))  # safetensors only, headers checked
    if tokenizer is None:
        found = _find_tokenizer_near(folder)
        if found is None:
            raise WeightsError(f"{folder}: no tokenizer found (tokenizer.json or spiece.model in the folder or in "
                               "../tokenizer); pass tokenizer=FOLDER")
        tokenizer = umt5_files.load_tokenizer_dir(found)
    return _Loaded((model, tokenizer), f"{folder} (umT5-XXL, transformers folder, computing in {_name(dtype)})")


def _load_text_encoder(
    source: PathLike, *, tokenizer: Any, dtype: torch.dtype | str | None, device: str | torch.device,
    cast_per_layer: bool = True,
) -> _Loaded:
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(source)
    what = "umT5 text encoder"
    tokenizer = _tokenizer_from(tokenizer)
    if path.is_dir():
        target = resolve_dtype(dtype, str(device), role="text_encoder")
        return _load_hf_text_encoder_dir(path, tokenizer, target, device)
    shapes, state = _read_layout([path], what)
    identity = identify(shapes)
    if identity.kind not in ("umt5", "umt5-wan"):
        raise _wrong_kind(path, "the umT5-XXL text encoder", identity)
    target = resolve_dtype(dtype, str(device), role="text_encoder")
    names = _umt5_names(path, shapes, identity.kind)  # model name -> stored name, no tensor read yet
    layout = "Wan key names" if identity.kind == "umt5-wan" else "ComfyUI / transformers key names"
    model_shapes = {name: shapes[stored] for name, stored in names.items()}
    try:
        config = umt5_files.umt5_config(model_shapes)
    except KeyError as exc:
        raise _layout_error(path, what, [str(exc).strip("'")], []) from None
    missing, unexpected, wrong = compare_layout(model_shapes, umt5_files.expected_umt5_shapes(config),
                                                ignore=QUANT_SUFFIXES)
    if missing or wrong:
        raise _layout_error(path, what, missing, wrong)
    for name in unexpected:
        logger.warning("%s: ignoring tensor %s, not part of the umT5 encoder", path, name)
        names.pop(name)

    rule = dtype_rule(UMT5EncoderModel, target)
    source = _source([path], state, names, rule, what)
    if tokenizer is None:
        tokenizer = _file_tokenizer(path, source)
    umt5_config = UMT5Config(**_public(config))
    model, kept = _load_keeping_stored(empty_module(lambda: UMT5EncoderModel(umt5_config)), source, names, rule,
                                       target, device=device, path=path, what=what, cast_per_layer=cast_per_layer)
    description = f"{path} ({identity.summary}, {layout}, stored {identity.dtype}, computing in {_name(target)}" \
        f"{_kept_note(kept)})"
    return _Loaded((model, tokenizer), description)


def _umt5_names(path: Path, shapes: ShapeTable, kind: str) -> dict[str, str]:
    """transformers' umT5 tensor names -> the names stored in the file (both tied embedding names included)."""
    if kind == "umt5-wan":
        try:
            names = umt5_files.wan_t5_to_transformers({name: name for name in shapes})
        except KeyError as exc:
            raise WeightsError(f"{path}: tensor {exc} is not part of Wan's umT5 encoder") from None
    else:
        names = {name: name for name in shapes if name != umt5_files.SPIECE_KEY and not is_quant_bookkeeping(name)}
    embedding = names.get("shared.weight", names.get("encoder.embed_tokens.weight"))
    if embedding is None:
        raise _layout_error(path, "umT5 text encoder", ["shared.weight"], [])
    names.setdefault("shared.weight", embedding)
    names.setdefault("encoder.embed_tokens.weight", embedding)
    return names


def _file_tokenizer(path: Path, source: StateSource) -> Any:
    """ComfyUI's embedded sentencepiece model, else a tokenizer folder next to the file."""
    if umt5_files.SPIECE_KEY in source:
        return umt5_files.tokenizer_from_spiece(source.as_stored(umt5_files.SPIECE_KEY))
    found = _find_tokenizer_near(path)
    if found is None:
        raise WeightsError(
            f"{path}: this text encoder file has no embedded tokenizer ('{umt5_files.SPIECE_KEY}') and no "
            "tokenizer folder was found next to it (google/umt5-xxl/, umt5-xxl/ or tokenizer/); pass "
            "tokenizer=FOLDER"
        )
    return umt5_files.load_tokenizer_dir(found)


def load_text_encoder(
    source: PathLike,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    cast_per_layer: bool = True,
) -> tuple[Any, Any]:
    """Load umT5-XXL as ``(transformers.UMT5EncoderModel, tokenizer)`` from any supported layout.

    ``source``: an HF folder, Wan's ``.pth`` or ComfyUI's ``.safetensors`` (fp16 or scaled fp8,
    dequantized to ``dtype``; ``None``: bf16 on a GPU, fp32 on the CPU, never fp16 by default
    because umT5 overflows in it). ``tokenizer``: a tokenizer object
    or folder; by default ComfyUI's embedded ``spiece_model``, else a tokenizer folder next to
    the file (Wan's ``google/umt5-xxl``). ``device`` may differ from the transformer's.
    ``cast_per_layer``: fp8 / fp16 weights stay as stored (6.7 GB for the scaled-fp8 file instead
    of 21 GiB in fp32) and are cast, with their fp8 scales, layer by layer (:mod:`.stored_precision`).
    """
    module, tok = _load_text_encoder(source, tokenizer=tokenizer, dtype=dtype, device=device,
                                     cast_per_layer=cast_per_layer).module
    return module, tok


# --------------------------------------------------------------------------- all three


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config without its ``_class_name`` / ``_diffusers_version`` bookkeeping."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def scheduler_config() -> dict[str, Any]:
    """The shipped Wan2.1 scheduler config (UniPC, flow matching); the sampler sets the shift."""
    return load_json(SCHEDULER_CONFIG_DIR / "scheduler_config.json")


#: The parts of stage two a loader can be asked for: all of them, or one stage of a staged run.
ALL_PARTS = ("transformer", "vae", "text_encoder")
TEXT_PARTS = ("text_encoder",)
SAMPLING_PARTS = ("transformer", "vae")


def check_parts(parts: Any) -> tuple[str, ...]:
    """``parts`` as a tuple of known part names (``None``: all), else a clear error."""
    chosen = tuple(ALL_PARTS if parts is None else parts)
    unknown = sorted(set(chosen) - set(ALL_PARTS))
    if unknown or not chosen:
        raise WeightsError(f"unknown VACE part(s) {unknown or chosen}; expected some of {list(ALL_PARTS)}")
    return chosen


def load_vace_from_files(
    transformer: PathLike,
    vae: PathLike,
    text_encoder: PathLike,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    text_device: str | torch.device | None = None,
    vae_dtype: torch.dtype | str | None = None,
    text_dtype: torch.dtype | str | None = None,
    num_heads: int | None = None,
    cast_per_layer: bool = True,
    parts: Any = None,
) -> VaceModels:
    """Load the three stage-two models from single files / folders into one :class:`VaceModels`.

    Same devices and dtype defaults as ``load_vace_diffusers``: ``device`` defaults to CUDA when
    available, ``text_device`` to ``device`` (pass ``"cpu"`` to keep umT5-XXL off the GPU);
    ``dtype`` is the transformer's, ``text_dtype`` umT5's compute dtype. ``tokenizer`` is only
    needed for Wan's ``.pth`` encoder when its ``google/umt5-xxl`` folder is not next to it.
    ``num_heads``: see :func:`load_transformer_file`. The transformer attends with flash-attn where
    it is installed and fits (CUDA, bf16/fp16), else SDPA.
    ``cast_per_layer``: fp8 / fp16 weights stay as stored, cast layer by layer (:mod:`.stored_precision`).
    ``parts``: load only these (``TEXT_PARTS`` to encode prompts, ``SAMPLING_PARTS`` to sample: a
    staged run never holds umT5 beside the transformer); the others are ``None`` in the result.
    """
    parts = check_parts(parts)
    device = str(device) if device is not None else default_device()
    text_device = str(text_device) if text_device is not None else device
    transformer_dtype = resolve_dtype(dtype, device, role="transformer")
    origin: dict[str, str] = {"scheduler": str(SCHEDULER_CONFIG_DIR / "scheduler_config.json")}
    loaded_transformer = loaded_vae = None
    encoder = tok = None
    if "transformer" in parts:
        loaded_transformer = _load_transformer(transformer, dtype=dtype, device=device, num_heads=num_heads,
                                               cast_per_layer=cast_per_layer)
        origin["transformer"] = loaded_transformer.description
    if "vae" in parts:
        loaded_vae = _load_vae(vae, dtype=vae_dtype, device=device)
        origin["vae"] = loaded_vae.description
    if "text_encoder" in parts:
        loaded_text = _load_text_encoder(text_encoder, tokenizer=tokenizer, dtype=text_dtype, device=text_device,
                                         cast_per_layer=cast_per_layer)
        encoder, tok = loaded_text.module
        origin["text_encoder"] = loaded_text.description
        origin["tokenizer"] = loaded_text.description if tokenizer is None else str(tokenizer)
    module = loaded_transformer.module if loaded_transformer is not None else None
    return VaceModels(
        transformer=module,
        vae=loaded_vae.module if loaded_vae is not None else None,
        text_encoder=encoder,
        tokenizer=tok,
        device=device,
        text_device=text_device,
        dtype=transformer_dtype,
        scheduler_config=scheduler_config(),
        attention=prepare_transformer(module, device, transformer_dtype) if module is not None else "native",
        origin=origin,
    )
