"""Loader nodes: the Qwen2.5-VL planner, the projector, and Wan2.1-VACE (from files or a diffusers folder).

Each loader lists its choices from ComfyUI's model folders, loads through ``unison_runtime``
and hands back one object. Caching, reuse and release follow :mod:`.model_cache`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import comfy_bridge as comfy
from ._runtime import errors, runtime_module
from .model_cache import LOADED, signature
from .packets import PLANNER, PROJECTOR, VACE

DTYPES = ["auto", "bf16", "fp16", "fp32"]
AUTO = "auto"
CPU = "cpu"
MAIN_DEVICE = "main device"
QWEN_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
NO_LORA = "none"


def nothing_found(folder: str, what: str) -> str:
    """The single combo entry shown when a folder holds nothing usable (a combo may not be empty)."""
    return f"(no {what} in models/{folder})"


def _is_placeholder(choice: str) -> bool:
    return choice.startswith("(no ")


def _missing(folder: str, choice: str, what: str) -> errors.WeightsError:
    if _is_placeholder(choice):
        return errors.WeightsError(f"no {what} found in ComfyUI's models/{folder} folder(s) "
                                   f"{[str(p) for p in comfy.model_folders(folder)]}; put the files there "
                                   "(README: 'Where model files go') and press R to refresh")
    return errors.WeightsError(f"{what} {choice!r} is not in ComfyUI's models/{folder} folder(s) "
                               f"{[str(p) for p in comfy.model_folders(folder)]} (deleted or renamed?)")


def _choose(folder: str, choice: str, what: str) -> Path:
    path = None if _is_placeholder(choice) else comfy.resolve_model_path(folder, choice)
    if path is None:
        raise _missing(folder, choice, what)
    return path


def _maybe_path(folder: str, choice: str) -> Path | None:
    return None if _is_placeholder(choice) or choice == NO_LORA else comfy.resolve_model_path(folder, choice)


def _device_name(choice: str, *, text: bool = False) -> str:
    if choice == CPU:
        return "cpu"
    if choice == AUTO and text:
        return str(comfy.text_encoder_device())
    return str(comfy.torch_device())


# --------------------------------------------------------------------------- planner


def qwen_model_folders() -> list[str]:
    """Folders of ``models/unison`` holding a Qwen2.5-VL (base or merged planner) config."""
    found = []
    for rel in comfy.model_directories(comfy.UNISON_FOLDER, ["config.json"]):
        path = comfy.resolve_model_path(comfy.UNISON_FOLDER, rel)
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type", "")
        except (OSError, ValueError, AttributeError):
            continue
        if model_type in QWEN_MODEL_TYPES:
            found.append(rel)
    return found


def _interrupt_criteria() -> Any:
    """A stopping criterion that lets ComfyUI's Cancel stop Qwen's generation between two tokens.

    It never stops generation itself: it raises ComfyUI's interrupt exception when the user
    cancelled (a no-op outside ComfyUI), so a long answer does not run to its token budget.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class ComfyInterrupt(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            comfy.throw_if_interrupted()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([ComfyInterrupt()])


@dataclass(eq=False, repr=False)
class LoadedPlanner:
    """What ``UNISON_PLANNER`` carries: the runtime planner and its ComfyUI model-manager handle."""

    planner: Any
    label: str
    patcher: Any = None

    def __repr__(self) -> str:  # ComfyUI prints inputs in error reports: keep it to a line
        return f"LoadedPlanner({self.label})"


class UnisonPlannerLoader:
    DESCRIPTION = ("Loads stage one: Qwen2.5-VL-3B-Instruct with the Unison planning LoRA (or an already merged "
                   "planner) from models/unison. Reused across runs until a choice changes.")
    CATEGORY = "Unison/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (PLANNER,)
    RETURN_NAMES = ("planner",)
    OUTPUT_TOOLTIPS = ("The stage-one planner; connect it to the Unison Planner's planner input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        models = qwen_model_folders() or [nothing_found(comfy.UNISON_FOLDER, "Qwen2.5-VL folders")]
        loras = [NO_LORA, *comfy.model_directories(comfy.UNISON_FOLDER, ["adapter_config.json"])]
        return {
            "required": {
                "model": (models, {"tooltip": "Qwen2.5-VL-3B-Instruct folder (Hugging Face layout), or a merged "
                                              "Unison planner, inside models/unison."}),
                "lora": (loras, {"default": NO_LORA,
                                 "tooltip": "The Unison planning LoRA adapter folder (peft layout) inside "
                                            "models/unison; 'none' for a merged planner or the bare base model."}),
                "dtype": (DTYPES, {"default": AUTO,
                                   "tooltip": "Weight dtype; auto = bf16 on a GPU that supports it, else fp32."}),
                "device": ([AUTO, CPU], {"default": AUTO,
                                         "tooltip": "auto = ComfyUI's device (the GPU unless started with --cpu)."}),
                "attention": ([AUTO, "sdpa", "eager", "flash_attention_2"], {
                    "default": AUTO,
                    "tooltip": "Attention backend; auto = flash_attention_2 when the flash-attn package is installed "
                               "and the model runs bf16/fp16 on a GPU, else sdpa."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, model: str, lora: str, **_: Any) -> str:
        return signature([_maybe_path(comfy.UNISON_FOLDER, model), _maybe_path(comfy.UNISON_FOLDER, lora)])

    def load(self, model: str, lora: str, dtype: str, device: str, attention: str) -> tuple[LoadedPlanner]:
        model_dir = _choose(comfy.UNISON_FOLDER, model, "Qwen2.5-VL folder")
        lora_dir = None if lora == NO_LORA else _choose(comfy.UNISON_FOLDER, lora, "planning LoRA folder")
        target = _device_name(device)
        key = ("planner", signature([model_dir, lora_dir]), dtype, target, attention)

        def load() -> LoadedPlanner:
            qwen = runtime_module("planner.qwen")
            planner = qwen.load_planner(model_dir, lora_dir, device=target, dtype=None if dtype == AUTO else dtype,
                                        attention=attention,
                                        generate_options={"stopping_criteria": _interrupt_criteria()})
            label = model_dir.name + (f" + {lora_dir.name}" if lora_dir else "")
            module = getattr(planner, "model", None)
            patcher = comfy.manage_modules(f"Unison planner {label}", {"model": module}, target) \
                if module is not None else None
            return LoadedPlanner(planner=planner, label=label, patcher=patcher)

        return (LOADED.get_or_load(key, load),)


# --------------------------------------------------------------------------- projector


class UnisonProjectorLoader:
    DESCRIPTION = "Loads the Unison projector (projector.pth or .safetensors from models/unison)."
    CATEGORY = "Unison/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (PROJECTOR,)
    RETURN_NAMES = ("projector",)
    OUTPUT_TOOLTIPS = ("The projector; connect it to the Unison Projector node.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        files = comfy.model_files(comfy.UNISON_FOLDER, comfy.PROJECTOR_EXTENSIONS) or [
            nothing_found(comfy.UNISON_FOLDER, "projector files")]
        return {
            "required": {
                "projector": (files, {"tooltip": "The released projector.pth (loaded without running pickled code) "
                                                 "or a .safetensors copy, inside models/unison."}),
                "dtype": (DTYPES, {"default": AUTO, "tooltip": "auto keeps the stored dtype (fp32 for the release)."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, projector: str, **_: Any) -> str:
        return signature([_maybe_path(comfy.UNISON_FOLDER, projector)])

    def load(self, projector: str, dtype: str) -> tuple[Any]:
        path = _choose(comfy.UNISON_FOLDER, projector, "projector file")
        device = str(comfy.torch_device())
        key = ("projector", signature([path]), dtype, device)

        def load() -> Any:
            module = runtime_module("projector")
            return module.load_projector(path, device=device, dtype=None if dtype == AUTO else dtype)

        return (LOADED.get_or_load(key, load),)


# --------------------------------------------------------------------------- VACE


@dataclass(eq=False, repr=False)
class LoadedVace:
    """What ``UNISON_VACE`` carries: the runtime models and their ComfyUI model-manager handles."""

    models: Any  # unison_runtime.vace.models.VaceModels
    label: str
    patchers: list[Any] = field(default_factory=list)

    def __repr__(self) -> str:  # ComfyUI prints inputs in error reports: keep it to a line
        return f"LoadedVace({self.label}, device={self.models.device}, text_device={self.models.text_device})"


def _manage_vace(models: Any, label: str) -> LoadedVace:
    patchers = [
        comfy.manage_modules(f"Unison VACE {label}", {"transformer": models.transformer, "vae": models.vae},
                             models.device),
        comfy.manage_modules(f"Unison umT5 {label}", {"text_encoder": models.text_encoder}, models.text_device),
    ]
    return LoadedVace(models=models, label=label, patchers=[p for p in patchers if p is not None])


def _vace_dtypes(dtype: str, device: str, text_device: str) -> dict[str, Any]:
    """Explicit dtypes per part: "auto" means the runtime's defaults for the device (fp32 on the CPU, where
    half precision is slow; bf16 transformer and umT5 on a GPU; the VAE in fp32), never "as stored"."""
    loading = runtime_module("vace.loading")
    return {
        "dtype": loading.resolve_dtype(None if dtype == AUTO else dtype, device, role="transformer"),
        "text_dtype": loading.resolve_dtype(None, text_device, role="text_encoder"),
        "vae_dtype": loading.resolve_dtype(None, device, role="vae"),
    }


TEXT_DEVICE_TOOLTIP = ("Where umT5-XXL runs: auto = ComfyUI's text-encoder device; cpu keeps its ~11 GB off the GPU "
                       "(slower prompt encoding, once per run); main device = the GPU.")


class _VaceLoaderNode:
    """What both VACE loaders share: the output, the dtype and device inputs, and loading through the cache."""

    CATEGORY = "Unison/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (VACE,)
    RETURN_NAMES = ("vace",)
    OUTPUT_TOOLTIPS = ("The stage-two models; connect to Unison VACE Sampler.",)

    @staticmethod
    def _device_inputs() -> dict[str, Any]:
        return {
            "dtype": (DTYPES, {"default": AUTO, "tooltip": "Transformer dtype; auto = bf16 on a capable GPU, "
                                                            "fp32 on the CPU."}),
            "text_encoder_device": ([AUTO, CPU, MAIN_DEVICE], {"default": AUTO, "tooltip": TEXT_DEVICE_TOOLTIP}),
        }

    @staticmethod
    def _load(kind: str, paths: list[Path], label: str, dtype: str, text_encoder_device: str,
              load_models: Callable[..., Any]) -> LoadedVace:
        """``load_models(dtype=..., device=..., ...)`` once per choice of files, dtype and devices."""
        device = str(comfy.torch_device())
        text_device = _device_name(text_encoder_device, text=True)
        key = (kind, signature(paths), dtype, device, text_device)

        def load() -> LoadedVace:
            models = load_models(**_vace_dtypes(dtype, device, text_device), device=device, text_device=text_device)
            return _manage_vace(models, label)

        return LOADED.get_or_load(key, load)


class UnisonVaceLoader(_VaceLoaderNode):
    DESCRIPTION = ("Loads Wan2.1-VACE-1.3B for Unison from the files ComfyUI users already have: the transformer "
                   "(diffusion_models), the Wan VAE (vae) and umT5-XXL (text_encoders). Reused across runs until "
                   "a choice changes.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        transformers_ = comfy.model_files("diffusion_models") or [nothing_found("diffusion_models", "model files")]
        vaes = comfy.model_files("vae") or [nothing_found("vae", "VAE files")]
        encoders = sorted({*comfy.model_files("text_encoders"),
                           *comfy.model_directories("text_encoders", ["config.json"])}) or [
            nothing_found("text_encoders", "text encoders")]
        return {
            "required": {
                "transformer": (transformers_, {"tooltip": "Wan2.1-VACE-1.3B transformer, e.g. "
                                                           "wan2.1_vace_1.3B_fp16.safetensors (ComfyUI or original "
                                                           "layout), from models/diffusion_models."}),
                "vae": (vaes, {"tooltip": "Wan 2.1 VAE, e.g. wan_2.1_vae.safetensors or Wan2.1_VAE.pth, "
                                          "from models/vae."}),
                "text_encoder": (encoders, {"tooltip": "umT5-XXL, e.g. umt5_xxl_fp16.safetensors (with its embedded "
                                                       "tokenizer) or a Hugging Face umt5-xxl folder, from "
                                                       "models/text_encoders."}),
                **cls._device_inputs(),
            }
        }

    @classmethod
    def IS_CHANGED(cls, transformer: str, vae: str, text_encoder: str, **_: Any) -> str:
        return signature([_maybe_path("diffusion_models", transformer), _maybe_path("vae", vae),
                          _maybe_path("text_encoders", text_encoder)])

    def load(self, transformer: str, vae: str, text_encoder: str, dtype: str,
             text_encoder_device: str) -> tuple[LoadedVace]:
        paths = [
            _choose("diffusion_models", transformer, "VACE transformer file"),
            _choose("vae", vae, "Wan VAE file"),
            _choose("text_encoders", text_encoder, "umT5 text encoder"),
        ]

        def load_models(**options: Any) -> Any:
            return runtime_module("vace.files").load_vace_from_files(*paths, **options)

        return (self._load("vace-files", paths, paths[0].name, dtype, text_encoder_device, load_models),)


def diffusers_folders() -> list[str]:
    """``Wan2.1-VACE-*-diffusers`` style folders (``model_index.json``) in models/unison and models/diffusers."""
    return [f"{folder}/{rel}" for folder in (comfy.UNISON_FOLDER, "diffusers")
            for rel in comfy.model_directories(folder, ["model_index.json"])]


def _diffusers_path(choice: str) -> Path | None:
    folder, _, rel = choice.partition("/")
    if folder not in (comfy.UNISON_FOLDER, "diffusers") or not rel:
        return None
    return comfy.resolve_model_path(folder, rel)


class UnisonVaceDiffusersLoader(_VaceLoaderNode):
    DESCRIPTION = ("Loads Wan2.1-VACE from a diffusers-layout folder (Wan2.1-VACE-1.3B-diffusers) in models/unison "
                   "or models/diffusers.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        folders = diffusers_folders() or [nothing_found("unison", "diffusers folders")]
        return {
            "required": {
                "folder": (folders, {"tooltip": "A diffusers-layout Wan2.1-VACE folder (with model_index.json)."}),
                **cls._device_inputs(),
            }
        }

    @classmethod
    def IS_CHANGED(cls, folder: str, **_: Any) -> str:
        return signature([_diffusers_path(folder)])

    def load(self, folder: str, dtype: str, text_encoder_device: str) -> tuple[LoadedVace]:
        path = _diffusers_path(folder)
        if path is None:
            raise _missing(comfy.UNISON_FOLDER if _is_placeholder(folder) else folder.partition("/")[0], folder,
                           "diffusers VACE folder")

        def load_models(**options: Any) -> Any:
            return runtime_module("vace.loading").load_vace_diffusers(path, **options)

        return (self._load("vace-diffusers", [path], path.name, dtype, text_encoder_device, load_models),)
