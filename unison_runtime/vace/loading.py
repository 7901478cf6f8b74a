"""Loading Wan2.1-VACE from a diffusers-layout directory (``Wan2.1-VACE-1.3B-diffusers``), offline.

Each component has its own small loader (``load_transformer``, ``load_vae``, ``load_text_encoder``,
``load_tokenizer``, ``read_scheduler_config``) so loaders for other formats (single-file
checkpoints, ComfyUI folders) can reuse the ones they need and still return one
:class:`~unison_runtime.vace.models.VaceModels`. Nothing here reaches for a hub: every call is
``local_files_only`` and a missing part is a :class:`WeightsError` naming the file that is missing.
Weights are read from safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..devices import default_compute_dtype
from ..errors import WeightsError
from .compute import prepare_transformer
from .models import VaceModels

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")


# --------------------------------------------------------------------------- devices and dtypes


def default_device() -> str:
    """``cuda`` when a GPU is usable, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: Any, device: str, *, role: str = "transformer") -> Any:
    """The torch dtype for ``role`` on ``device``: an explicit choice wins, else a sensible default.

    Defaults (:func:`unison_runtime.devices.default_compute_dtype`, asked of this ``cuda:N``): on a
    GPU with native bf16 (sm80+) the transformer and umT5 run in bf16; below, the transformer in
    fp16 with its residual stream in fp32 (:mod:`.fp16`) and umT5 in fp32 (it overflows in fp16);
    the VAE in fp32 everywhere (Wan's reference and diffusers both decode in fp32 for quality). On
    the CPU everything is fp32, except that on a CPU with native bf16 (AVX512-BF16 / AMX) the
    transformer and umT5 compute in bf16 (about 2x faster there, issue 16; emulated bf16 is far
    slower, so never elsewhere).
    """
    import torch

    from ..weights import DTYPE_NAMES

    if dtype is not None and dtype != "auto":
        if isinstance(dtype, torch.dtype):
            return dtype
        found = DTYPE_NAMES.get(str(dtype).lower())
        if found is None:
            raise WeightsError(f"unknown dtype {dtype!r}; expected one of fp32, fp16, bf16")
        return found
    if torch.device(device).type == "cpu" and role != "vae":
        from ..devices import cpu_has_native_bf16

        if cpu_has_native_bf16():
            return torch.bfloat16
    return default_compute_dtype(device, role)


# --------------------------------------------------------------------------- checks


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise WeightsError(f"{what}: folder {path} is missing; expected the {path.name}/ sub-folder of a "
                           "Wan2.1-VACE-1.3B-diffusers directory")
    return path


def _require_weights(folder: Path, filename: str, what: str) -> list[Path]:
    """A config.json plus single or sharded safetensors weights must be present and whole; returns the files.

    Each file's header is read (bounded, byte ranges checked against the file size), so a
    truncated download is named here rather than failing half-way through ``from_pretrained``.
    """
    from ..weights import read_safetensors_header

    if not (folder / "config.json").is_file():
        raise WeightsError(f"{what}: {folder / 'config.json'} is missing")
    index = folder / f"{filename}.index.json"
    if (folder / filename).is_file():
        read_safetensors_header(folder / filename, what=what)
        return [folder / filename]
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError) as exc:
            raise WeightsError(f"{what}: {index} is not a valid shard index ({exc})") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise WeightsError(f"{what}: shard(s) {', '.join(missing)} listed in {index.name} are missing in {folder}")
        for shard in sorted(shards):
            read_safetensors_header(folder / shard, what=what)
        return [folder / shard for shard in sorted(shards)]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (found {', '.join(others)}: only safetensors are loaded)" if others else ""
    raise WeightsError(f"{what}: {folder / filename} (or a sharded {index.name}) is missing{hint}")


# What each part's config.json must describe (diffusers' _class_name, transformers' model_type).
_EXPECTED_CLASS = {"transformer": ("_class_name", "WanVACETransformer3DModel"),
                   "vae": ("_class_name", "AutoencoderKLWan"),
                   "text_encoder": ("model_type", "umt5")}


def _require_kind(folder: Path, what: str) -> None:
    """Refuse a part whose config.json describes another model (a VAE copied where the transformer goes)."""
    key, expected = _EXPECTED_CLASS[folder.name]
    config = folder / "config.json"
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError) as exc:
        raise WeightsError(f"{what}: {config} is not a readable JSON object ({exc})") from None
    if found != expected:
        raise WeightsError(f"{what}: {config} says {key} {found!r}; expected {expected!r} in the {folder.name}/ "
                           "folder of a Wan2.1-VACE-1.3B-diffusers directory")


def check_diffusers_dir(directory: str | Path) -> Path:
    """Refuse an incomplete directory up front, naming the first missing sub-folder or file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"VACE model folder {directory} does not exist; expected a Wan2.1-VACE-1.3B-diffusers "
                           f"directory with {', '.join(COMPONENTS)} and scheduler sub-folders")
    for part, filename, what in (("transformer", DIFFUSERS_WEIGHTS, "VACE transformer"),
                                 ("vae", DIFFUSERS_WEIGHTS, "Wan VAE"),
                                 ("text_encoder", TRANSFORMERS_WEIGHTS, "umT5 text encoder")):
        folder = _require_dir(directory / part, what)
        if (folder / "config.json").is_file():
            _require_kind(folder, what)
        _require_weights(folder, filename, what)
    tokenizer = _require_dir(directory / "tokenizer", "umT5 tokenizer")
    if not any((tokenizer / name).is_file() for name in TOKENIZER_FILES):
        raise WeightsError(f"umT5 tokenizer: neither {' nor '.join(TOKENIZER_FILES)} is in {tokenizer}")
    return directory


def _wrap(what: str, folder: Path, exc: Exception) -> WeightsError:
    return WeightsError(f"{what}: cannot load {folder}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- components


def _load_model(
    model_class: Any, folder: str | Path, what: str, device: str, *, dtype: Any, weights: str,
    build: Callable[[Path], Any], dtype_argument: str = "torch_dtype",
) -> Any:
    """``model_class`` from a folder, offline from safetensors, on ``device`` in eval mode without gradients.

    Loaded as stored, the library's ``from_pretrained`` maps the weights zero-copy. When dtypes
    change (an fp32 release computing in bf16 on a GPU), ``from_pretrained`` would hold the whole
    mapped source next to the converted copy, so the tensors are converted one at a time instead
    (:mod:`converting_load`), into the same dtypes ``from_pretrained`` gives (``build`` makes the
    empty model from the folder's config). ``dtype_argument``: transformers names it ``dtype``,
    diffusers still ``torch_dtype``.
    """
    from .converting_load import (
        SafetensorsSource,
        assemble_module,
        dtype_rule,
        empty_module,
        load_converted,
        needs_conversion,
    )

    folder = Path(folder)
    source = SafetensorsSource(_require_weights(folder, weights, what), what=what)
    rule = dtype_rule(model_class, dtype)
    try:
        if needs_conversion(source, {name: name for name in source.names()}, rule):
            model = empty_module(lambda: build(folder))
            # A model's own tensors only: google/umt5-xxl folders also hold the decoder, which the encoder ignores.
            names = {name: name for name in model.state_dict() if name in source}
            state = load_converted(source, names, rule, device=device)
            return assemble_module(model, state, device=device, path=folder, what=what)
        loaded = model_class.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                             **{dtype_argument: dtype})
    except WeightsError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _wrap(what, folder, exc) from exc
    return loaded.to(device).eval().requires_grad_(False)


def load_transformer(folder: str | Path, *, dtype: Any, device: str) -> Any:
    """``WanVACETransformer3DModel`` from a diffusers folder, in ``dtype`` on ``device``, in eval mode."""
    from diffusers import WanVACETransformer3DModel as model_class

    return _load_model(model_class, folder, "VACE transformer", device, dtype=dtype, weights=DIFFUSERS_WEIGHTS,
                       build=lambda f: model_class.from_config(model_class.load_config(f)))


def load_vae(folder: str | Path, *, dtype: Any, device: str) -> Any:
    """``AutoencoderKLWan`` from a diffusers folder."""
    from diffusers import AutoencoderKLWan as model_class

    return _load_model(model_class, folder, "Wan VAE", device, dtype=dtype, weights=DIFFUSERS_WEIGHTS,
                       build=lambda f: model_class.from_config(model_class.load_config(f)))


def load_text_encoder(folder: str | Path, *, dtype: Any, device: str) -> Any:
    """transformers' ``UMT5EncoderModel`` (umT5-XXL for the released model)."""
    from transformers import UMT5Config
    from transformers import UMT5EncoderModel as model_class

    return _load_model(model_class, folder, "umT5 text encoder", device, dtype=dtype, weights=TRANSFORMERS_WEIGHTS,
                       build=lambda f: model_class(UMT5Config.from_pretrained(f, local_files_only=True)),
                       dtype_argument="dtype")


def load_tokenizer(folder: str | Path) -> Any:
    """The umT5 tokenizer (``tokenizer.json`` / ``spiece.model``); remote code is never run."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise _wrap("umT5 tokenizer", folder, exc) from exc


def read_scheduler_config(folder: str | Path) -> dict[str, Any]:
    """The scheduler config as plain data, or ``{}`` when absent (the sampler then uses Wan's defaults)."""
    path = Path(folder) / "scheduler_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise WeightsError(f"scheduler: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"scheduler: {path} must hold a JSON object")
    return data


# --------------------------------------------------------------------------- the whole model


def load_vace_diffusers(
    directory: str | Path,
    *,
    dtype: Any = None,
    device: str | None = None,
    text_device: str | None = None,
    text_dtype: Any = None,
    vae_dtype: Any = None,
    parts: Any = None,
) -> VaceModels:
    """Load every stage-two part from a ``Wan2.1-VACE-1.3B-diffusers`` directory, offline.

    ``device`` holds the transformer and VAE (default: cuda if available); ``text_device`` the umT5
    encoder (default: ``device``; pass ``"cpu"`` to keep umT5-XXL off the GPU). ``dtype`` is the
    transformer's; ``text_dtype`` / ``vae_dtype`` default as :func:`resolve_dtype` says. The
    transformer attends with flash-attn where it is installed and fits (CUDA, bf16/fp16), else SDPA.
    ``parts``: only these of ``transformer``, ``vae``, ``text_encoder`` (the others are ``None``;
    see :func:`unison_runtime.vace.files.load_vace_from_files`).
    """
    from .files import check_parts

    parts = check_parts(parts)
    directory = check_diffusers_dir(directory)
    device = device or default_device()
    text_device = text_device or device
    transformer_dtype = resolve_dtype(dtype, device, role="transformer")
    transformer = vae = text_encoder = tokenizer = None
    if "transformer" in parts:
        transformer = load_transformer(directory / "transformer", dtype=transformer_dtype, device=device)
    if "vae" in parts:
        vae = load_vae(directory / "vae", dtype=resolve_dtype(vae_dtype, device, role="vae"), device=device)
    if "text_encoder" in parts:
        text_encoder = load_text_encoder(
            directory / "text_encoder", dtype=resolve_dtype(text_dtype, text_device, role="text_encoder"),
            device=text_device,
        )
        tokenizer = load_tokenizer(directory / "tokenizer")
    models = VaceModels(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        device=device,
        text_device=text_device,
        dtype=transformer_dtype,
        scheduler_config=read_scheduler_config(directory / "scheduler"),
        attention=prepare_transformer(transformer, device, transformer_dtype) if transformer is not None
        else "native",
    )
    models.origin = {name: str(directory / name) for name in (*COMPONENTS, "scheduler")}
    return models
