"""Loader nodes: the Qwen2.5-VL planner, the projector, and Wan2.1-VACE (from files or a diffusers folder).

Each loader lists its choices from ComfyUI's model folders, loads through ``unison_runtime``
and hands back one object. Caching, reuse and release follow :mod:`.model_cache`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
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
log = logging.getLogger("unison")


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
    """What ``UNISON_PLANNER`` carries: the runtime planner and its ComfyUI model-manager handle.

    ``reload`` loads the same planner again (``(planner, patcher)``), for :meth:`ready` after
    :meth:`release`: ComfyUI's cache keeps this object, so a planner whose memory was given back
    comes back the next time a node plans with it.
    """

    planner: Any
    label: str
    patcher: Any = None
    reload: Callable[[], tuple[Any, Any]] | None = None

    def __repr__(self) -> str:  # ComfyUI prints inputs in error reports: keep it to a line
        return f"LoadedPlanner({self.label})"

    @property
    def on_cpu(self) -> bool:
        return str(getattr(self.planner, "device", "")).startswith("cpu")

    def ready(self) -> Any:
        """The planner, loaded again first when its memory was given back (:meth:`release`)."""
        if not getattr(self.planner, "loaded", True) and self.reload is not None:
            log.info("Unison: loading the planner %s again (its memory was given back after the last plan)",
                     self.label)
            self.planner, self.patcher = self.reload()
        return self.planner

    def release(self) -> None:
        """Give the memory back now: ComfyUI unloads the model, then the references to it are dropped."""
        if self.patcher is not None:
            comfy.unload([self.patcher])
            for name in list(self.patcher.model._modules):
                delattr(self.patcher.model, name)
        if hasattr(self.planner, "unload"):  # QwenPlanner.model is read-only; unload() drops it
            self.planner.unload()


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
                                         "tooltip": "auto = ComfyUI's device (the GPU unless started with --cpu). On "
                                                    "the CPU the planner's RAM (7.6 GiB at 3B) is given back after "
                                                    "each plan, so it is not held beside VACE; it loads again when "
                                                    "the instruction changes."}),
                "attention": ([AUTO, "sdpa", "eager", "flash_attention_2"], {
                    "default": AUTO,
                    "tooltip": "Attention backend; auto = flash_attention_2 when the flash-attn package is installed "
                               "and the model runs bf16/fp16 on a GPU, else sdpa."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, model: str, lora: str, **_: Any) -> str:
        return signature([_maybe_path(comfy.UNISON_FOLDER, model), _maybe_path(comfy.UNISON_FOLDER, lora)])

    def load(self, model: str, lora: str, dtype: str, device: str, attention: str,
             unique_id: str | None = None) -> tuple[LoadedPlanner]:
        model_dir = _choose(comfy.UNISON_FOLDER, model, "Qwen2.5-VL folder")
        lora_dir = None if lora == NO_LORA else _choose(comfy.UNISON_FOLDER, lora, "planning LoRA folder")
        target = _device_name(device)
        key = ("planner", signature([model_dir, lora_dir]), dtype, target, attention)

        label = model_dir.name + (f" + {lora_dir.name}" if lora_dir else "")

        def load_and_register() -> tuple[Any, Any]:
            qwen = runtime_module("planner.qwen")
            comfy.free_for_load(_folder_bytes(model_dir) + _folder_bytes(lora_dir), target)
            planner = qwen.load_planner(model_dir, lora_dir, device=target, dtype=None if dtype == AUTO else dtype,
                                        attention=attention,
                                        generate_options={"stopping_criteria": _interrupt_criteria()})
            module = getattr(planner, "model", None)
            # The planner loads straight onto its device (its dtype and attention are chosen for it there);
            # registering it as loaded right away keeps ComfyUI's accounting true and the planner evictable.
            patcher = comfy.manage_modules(f"Unison planner {label}", {"model": module}, target, offload=target) \
                if module is not None else None
            if patcher is not None:
                patcher.offload_device = comfy.offload_device()
                comfy.load_for_use([patcher])
            return planner, patcher

        def load() -> LoadedPlanner:
            planner, patcher = load_and_register()
            return LoadedPlanner(planner=planner, label=label, patcher=patcher, reload=load_and_register)

        return (LOADED.get_or_load(key, load, slot=("planner", unique_id) if unique_id is not None else None),)


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
    """What ``UNISON_VACE`` carries: the runtime models and their ComfyUI model-manager handles.

    One handle per part, so ComfyUI can hold each only while it is used: umT5 for encoding the
    prompts, the transformer for sampling, the VAE for encoding the inputs and decoding.
    """

    models: Any  # unison_runtime.vace.models.VaceModels
    label: str
    text_patcher: Any = None
    transformer_patcher: Any = None
    vae_patcher: Any = None

    @property
    def patchers(self) -> list[Any]:
        return [p for p in (self.transformer_patcher, self.vae_patcher, self.text_patcher) if p is not None]

    @property
    def sampling_patchers(self) -> list[Any]:
        return [p for p in (self.transformer_patcher, self.vae_patcher) if p is not None]

    def __repr__(self) -> str:  # ComfyUI prints inputs in error reports: keep it to a line
        return f"LoadedVace({self.label}, device={self.models.device}, text_device={self.models.text_device})"

    def release(self) -> None:
        """Give the memory back now: ComfyUI unloads the parts, then the runtime drops its references."""
        comfy.unload(self.patchers)
        for patcher in self.patchers:
            for name in list(patcher.model._modules):
                delattr(patcher.model, name)
        self.models.release()


def _manage_vace(models: Any, label: str, offload: str, text_offload: str) -> LoadedVace:
    return LoadedVace(
        models=models, label=label,
        text_patcher=comfy.manage_modules(f"Unison umT5 {label}",
                                          {"text_encoder": comfy.share_tied_embedding(models.text_encoder)},
                                          models.text_device, offload=text_offload),
        transformer_patcher=comfy.manage_modules(f"Unison VACE {label}", {"transformer": models.transformer},
                                                 models.device, offload=offload),
        vae_patcher=comfy.manage_modules(f"Unison Wan VAE {label}", {"vae": models.vae}, models.device,
                                         offload=offload),
    )


def _vace_dtypes(dtype: str, text_dtype: str, device: str, text_device: str) -> dict[str, Any]:
    """Explicit dtypes per part for the devices they will run on: "auto" means the runtime's defaults for
    the device (bf16 transformer and umT5 on a capable GPU, fp32 on the CPU; the VAE in fp32), never
    "as stored"."""
    loading = runtime_module("vace.loading")
    return {
        "dtype": loading.resolve_dtype(None if dtype == AUTO else dtype, device, role="transformer"),
        "text_dtype": loading.resolve_dtype(None if text_dtype == AUTO else text_dtype, text_device,
                                            role="text_encoder"),
        "vae_dtype": loading.resolve_dtype(None, device, role="vae"),
    }


def _folder_bytes(path: Path | None) -> int:
    """Bytes of a model file or folder on disk (what loading it costs at least)."""
    if path is None:
        return 0
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


#: umT5-XXL encoder at its released shape: 5.68 B parameters (the 1.05 B-value embedding counted once).
#: Computed from the shipped config (unison_runtime/configs/umt5-xxl-encoder), not measured on a GPU.
TEXT_DEVICE_TOOLTIP = (
    "Where umT5-XXL (5.7 B parameters) runs. Its weights stay in the file's precision and are cast layer by layer: "
    "6.3 GiB from umt5_xxl_fp8_e4m3fn_scaled, 10.6 GiB from umt5_xxl_fp16 (an fp32 file: 10.6 GiB in bf16, "
    "21.2 GiB in fp32), plus ~0.7 GiB to encode a prompt; the same in RAM or VRAM. auto = ComfyUI's text-encoder "
    "device (the CPU under --lowvram / --novram): it is loaded only to encode the prompts and ComfyUI may "
    "offload it before sampling. cpu: never on the GPU, slower prompt encoding (once per run), costs system RAM "
    "instead, only while encoding: the RAM of a stored fp8 / fp16 file is given back after each encode (read "
    "again for the next prompt); a converted copy stays. main device = the GPU while encoding.")
TEXT_DTYPE_TOOLTIP = (
    "umT5-XXL compute dtype: auto = bf16 on a capable GPU, fp32 on the CPU (bf16 on a CPU with native bf16). "
    "fp8 / fp16 files stay as stored whatever you choose (6.3 / 10.6 GiB; cast one layer at a time), so this "
    "changes precision and speed, not their memory; only a file stored wider (fp32) is converted: 10.6 GiB in "
    "bf16/fp16, 21.2 GiB in fp32. fp32 is the reference precision.")


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
            "dtype": (DTYPES, {"default": AUTO, "tooltip": "Transformer compute dtype (2.15 B parameters): the "
                                                            "fp16 file stays fp16 whatever you choose (4.0 GiB, cast "
                                                            "one layer at a time); an fp32 file takes 4.0 GiB in "
                                                            "bf16/fp16, 8.0 GiB in fp32. auto = bf16 on a capable "
                                                            "GPU, fp32 on the CPU."}),
            "text_encoder_device": ([AUTO, CPU, MAIN_DEVICE], {"default": AUTO, "tooltip": TEXT_DEVICE_TOOLTIP}),
        }

    @staticmethod
    def _text_dtype_input() -> dict[str, Any]:
        """Last among the widgets, so workflows saved before it existed keep their values in place."""
        return {"text_encoder_dtype": (DTYPES, {"default": AUTO, "tooltip": TEXT_DTYPE_TOOLTIP})}

    @staticmethod
    def _load(kind: str, paths: list[Path], label: str, dtype: str, text_encoder_device: str,
              load_models: Callable[..., Any], text_encoder_dtype: str = AUTO, node: str | None = None) -> LoadedVace:
        """``load_models(dtype=..., device=..., ...)`` once per choice of files, dtypes and devices.

        The weights load onto ComfyUI's offload devices (the CPU unless it runs in high-VRAM mode);
        ComfyUI moves each part to its device when a node uses it (``comfy_bridge.load_for_use``).
        """
        device = str(comfy.torch_device())
        text_device = _device_name(text_encoder_device, text=True)
        offload, text_offload = str(comfy.offload_device()), str(comfy.text_encoder_offload_device())
        if text_device == "cpu":
            text_offload = "cpu"
        key = (kind, signature(paths), dtype, text_encoder_dtype, device, text_device)

        def load() -> LoadedVace:
            comfy.free_for_load(sum(_folder_bytes(p) for p in paths), offload)
            options = _vace_dtypes(dtype, text_encoder_dtype, device, text_device)
            models = load_models(**options, device=offload, text_device=text_offload)
            text_home = text_offload
            # Then computed where ComfyUI will put them, with the attention that fits that device.
            models.device, models.text_device = device, text_device
            if text_encoder_device == AUTO and not comfy.fits_on_device(comfy.true_size(models.text_encoder),
                                                                        text_device):
                # umT5 moves whole (it is not made of ComfyUI ops): where it cannot fit, it encodes on the CPU.
                log.info("Unison: umT5 (%.1f GiB) does not fit %s; it encodes the prompts on the CPU",
                         comfy.true_size(models.text_encoder) / 2**30, text_device)
                models.text_device = text_home = "cpu"
            if offload != device:
                attention = runtime_module("attention")
                models.attention = attention.use_best_vace_attention(models.transformer, device, options["dtype"])
            return _manage_vace(models, label, offload, text_home)

        return LOADED.get_or_load(key, load, slot=("vace", node) if node is not None else None)


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
                **cls._text_dtype_input(),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, transformer: str, vae: str, text_encoder: str, **_: Any) -> str:
        return signature([_maybe_path("diffusion_models", transformer), _maybe_path("vae", vae),
                          _maybe_path("text_encoders", text_encoder)])

    def load(self, transformer: str, vae: str, text_encoder: str, dtype: str,
             text_encoder_device: str, text_encoder_dtype: str = AUTO, unique_id: str | None = None,
             ) -> tuple[LoadedVace]:
        paths = [
            _choose("diffusion_models", transformer, "VACE transformer file"),
            _choose("vae", vae, "Wan VAE file"),
            _choose("text_encoders", text_encoder, "umT5 text encoder"),
        ]

        def load_models(**options: Any) -> Any:
            return runtime_module("vace.files").load_vace_from_files(*paths, **options)

        return (self._load("vace-files", paths, paths[0].name, dtype, text_encoder_device, load_models,
                           text_encoder_dtype, unique_id),)


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
                **cls._text_dtype_input(),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder: str, **_: Any) -> str:
        return signature([_diffusers_path(folder)])

    def load(self, folder: str, dtype: str, text_encoder_device: str,
             text_encoder_dtype: str = AUTO, unique_id: str | None = None) -> tuple[LoadedVace]:
        path = _diffusers_path(folder)
        if path is None:
            raise _missing(comfy.UNISON_FOLDER if _is_placeholder(folder) else folder.partition("/")[0], folder,
                           "diffusers VACE folder")

        def load_models(**options: Any) -> Any:
            return runtime_module("vace.loading").load_vace_diffusers(path, **options)

        return (self._load("vace-diffusers", [path], path.name, dtype, text_encoder_device, load_models,
                           text_encoder_dtype, unique_id),)
