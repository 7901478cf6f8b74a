"""Loading stage one: Qwen2.5-VL, alone, with the Unison planning LoRA, or already merged.

The reference asked users to run a separate merge tool and then hand-edit ``config.json``
(``tie_word_embeddings`` -> false). Here both happen in memory, so the user points at what
they downloaded:

- a base directory + the LoRA adapter directory: the 14 planner tokens are added to the
  tokenizer (the adapter's own tokenizer is used when it ships one), the embeddings are grown
  to the adapter's row count if needed, the adapter is checked against the base (every tensor
  must fit a module of the base, else :class:`WeightsError`), loaded with peft and merged. The
  adapter trains ``embed_tokens`` and ``lm_head`` apart, so after the merge they are two
  different matrices even though the 3B base ties them: the config is untied to match.
- a merged directory: when its config says ``tie_word_embeddings: true`` but the checkpoint
  carries its own ``lm_head.weight`` (the reference bug), it is loaded untied, so the trained
  LM head is used instead of being silently replaced by the embeddings.

Nothing reaches for a hub (``local_files_only=True``); only safetensors weights are read, and
every file is checked (header, byte ranges) before transformers touches it. A checkpoint stored
in bf16/fp16 (as released) and computed in fp32 on the CPU is read in its stored dtype without
a file mapping. By default (``cast_per_layer=True``) its matrices then stay as stored and are cast
to fp32 one layer at a time while it runs (:mod:`unison_runtime.vace.stored_precision`; vectors are
converted): the 3B planner holds ~7.5 GB instead of 15 GB, computes exactly as an fp32 load (the
cast is exact), and a LoRA is merged into the stored bf16 matrices (rounded once, as a bf16 run
merges). ``cast_per_layer=False`` upcasts every tensor instead (peak near the fp32 size, not 1.5x).
On a CPU with native bf16 (AVX512-BF16 / AMX) the planner computes in bf16 by default.
"""

from __future__ import annotations

import gc
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import attention as attention_choice
from ..attention import HALF_DTYPES, qwen_attention
from ..devices import cpu_has_native_bf16, default_compute_dtype
from ..errors import UnisonError, WeightsError, first_line
from ..plan import PLANNER_TOKENS
from ..weights import DTYPE_NAMES, SAFETENSORS_DTYPES, load_state_dict, read_safetensors_header

MODEL_TYPE = "qwen2_5_vl"
ATTENTION_CHOICES = ("sdpa", "flash_attention_2", "eager")
_DTYPES = {**DTYPE_NAMES, "half": torch.float16, "float": torch.float32}
_ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
# peft's own chatter about tied embeddings: we untie on purpose and say so in the planner's notes.
_PEFT_NOISE = (
    r".*tie_word_embeddings.*",
    r".*no longer tied after merging.*",
    r".*is_gradient_checkpointing.*",
)


@dataclass
class LoadedQwen:
    """A loaded stage-one model and what was done to load it."""

    model: Any
    processor: Any
    model_dir: Path
    lora_dir: Path | None
    device: torch.device
    dtype: torch.dtype
    attention: str
    has_planner_tokens: bool
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- choices


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UnisonError(
            f"stage-one device {device!r} is not a torch device ({exc}); expected e.g. cpu, cuda, cuda:1"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UnisonError(f"stage-one device {device!r} asks for CUDA, but torch sees no CUDA device here")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The user's dtype, else the policy of :mod:`unison_runtime.devices` for ``device`` (bf16 where native)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16  # native bf16 on this CPU: half the memory, faster (issue 16)
        return default_compute_dtype(device, "planner")
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise UnisonError(f"stage-one dtype {dtype!r} is not one of auto, bf16, fp16, fp32") from None


def resolve_attention(attention: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """sdpa by default; flash_attention_2 where flash-attn works on ``device`` in ``dtype`` (see attention.py).

    Asked for by name, flash_attention_2 that cannot run is a clear error naming why (not a
    failure inside the first forward pass).
    """
    if attention not in (None, "auto") and attention not in ATTENTION_CHOICES:
        raise UnisonError(f"attention {attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    choice, status = qwen_attention(attention, device, dtype)
    if choice == "flash_attention_2" and not status.usable:
        if not attention_choice.flash_attention_available():
            raise UnisonError(
                "attention 'flash_attention_2' was requested but the flash-attn package is not installed; "
                "install it (pip install flash-attn) or use --attention sdpa"
            )
        if device.type != "cuda" or dtype not in HALF_DTYPES:
            raise UnisonError(
                f"attention 'flash_attention_2' needs a CUDA device and bf16/fp16, got {device} / {dtype}; "
                "use --attention sdpa"
            )
        raise UnisonError(f"attention 'flash_attention_2' cannot run here: {status.reason}; use --attention sdpa")
    return choice


# --------------------------------------------------------------------------- directory checks


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{what} directory {path} does not exist")
    if not path.is_dir():
        raise WeightsError(f"{what} path {path} is a file; expected a directory")
    return path


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"{what}: {path.name} is missing in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{what}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{what}: {path} holds a JSON {type(data).__name__}; expected an object")
    return data


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "Qwen2.5-VL checkpoint index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"Qwen2.5-VL checkpoint index {index} has no weight_map")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"Qwen2.5-VL checkpoint in {model_dir} lacks shard(s) {missing} listed in {index.name}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {pickles}; only safetensors weights are loaded)" if pickles else ""
        raise WeightsError(f"Qwen2.5-VL directory {model_dir} has no *.safetensors weights{hint}")
    return files


def checkpoint_headers(model_dir: Path) -> dict[str, dict[str, Any]]:
    """Every tensor's header entry (dtype, shape, offsets) by name; each file is validated on the way."""
    entries: dict[str, dict[str, Any]] = {}
    for path in checkpoint_files(model_dir):
        header = read_safetensors_header(path, what="Qwen2.5-VL")
        entries.update((k, v) for k, v in header.items() if k != "__metadata__")
    return entries


def checkpoint_tensor_names(model_dir: Path) -> set[str]:
    """Every tensor name in the checkpoint; each file's header is validated on the way (truncation, offsets)."""
    return set(checkpoint_headers(model_dir))


def stored_float_dtype(headers: dict[str, dict[str, Any]]) -> torch.dtype | None:
    """The one floating dtype every floating tensor of the checkpoint is stored in; None if mixed or none."""
    dtypes = {SAFETENSORS_DTYPES.get(entry.get("dtype")) for entry in headers.values()}
    floats = {d for d in dtypes if d is not None and d.is_floating_point}
    return floats.pop() if len(floats) == 1 else None


def load_stored_then_convert(stored: torch.dtype | None, device: torch.device, dtype: torch.dtype) -> bool:
    """True when loading in the stored dtype from private memory, then upcasting, uses less memory.

    A direct load maps the checkpoint and converts: on the CPU the mapped pages stay resident
    next to the converted copy (a bf16 Qwen2.5-VL loaded as fp32 peaks at 1.5x the fp32 size).
    Read without a mapping in the narrower stored dtype and upcast one tensor at a time, the peak
    is about the fp32 size. Only for an upcast: reading a wider file into memory would cost more
    than mapping it, and on CUDA the copy to the device releases the mapping anyway.
    """
    if device.type != "cpu" or stored not in HALF_DTYPES or not dtype.is_floating_point:
        return False
    return stored.itemsize < dtype.itemsize


def _config_ties(config: dict[str, Any]) -> bool:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))


def _check_model_dir(model_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    config = _read_json(model_dir / "config.json", "Qwen2.5-VL directory")
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise WeightsError(
            f"{model_dir / 'config.json'} says model_type {model_type!r}; expected {MODEL_TYPE!r} (Qwen2.5-VL)"
        )
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise WeightsError(f"Qwen2.5-VL directory {model_dir} has no tokenizer (tokenizer.json or vocab.json)")
    if not any((model_dir / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise WeightsError(f"Qwen2.5-VL directory {model_dir} has no preprocessor_config.json (image processor)")
    return config, checkpoint_headers(model_dir)


# --------------------------------------------------------------------------- processor / tokens


def has_planner_tokens(tokenizer: Any) -> bool:
    """True when each of the 14 Unison tokens is one token of ``tokenizer``."""
    vocab = tokenizer.get_vocab()
    return all(t in vocab and len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in PLANNER_TOKENS)


def _load_processor(model_dir: Path, lora_dir: Path | None) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"cannot load the Qwen2.5-VL processor from {model_dir}: {exc}") from None
    if lora_dir is None:
        return processor
    if has_planner_tokens(processor.tokenizer):
        raise WeightsError(
            f"{model_dir} already carries the 14 Unison planner tokens, so the LoRA looks merged into it already; "
            f"load it without the LoRA {lora_dir} (merging twice would corrupt the planner)"
        )
    tokenizer = processor.tokenizer
    if any((lora_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(lora_dir, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"cannot load the tokenizer saved with the LoRA in {lora_dir}: {exc}") from None
    missing = [t for t in PLANNER_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        # Same order the adapter was trained with, so the ids line up with its embedding rows.
        tokenizer.add_tokens(missing, special_tokens=True)
    return type(processor)(
        image_processor=processor.image_processor,
        tokenizer=tokenizer,
        video_processor=processor.video_processor,
        chat_template=processor.chat_template or getattr(tokenizer, "chat_template", None),
    )


# --------------------------------------------------------------------------- model


def _load_model(
    model_dir: Path,
    *,
    untie: bool,
    device: torch.device,
    dtype: torch.dtype,
    attention: str,
    stored: torch.dtype | None = None,
    cast_per_layer: bool = False,
) -> Any:
    """The model in ``dtype`` on ``device``; see :func:`load_stored_then_convert` for the CPU upcast path.

    ``cast_per_layer``: on that path, leave the model in its stored dtype (the caller merges a LoRA,
    then :func:`compute_in` keeps the matrices stored and casts them per layer).
    """
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if untie:
        _untie_config(config)
    upcast = load_stored_then_convert(stored, device, dtype)
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": stored if upcast else dtype,
        "attn_implementation": attention,
        "local_files_only": True,
    }
    if upcast and not cast_per_layer:
        kwargs["disable_mmap"] = True  # read into private memory: no mapped file pages left resident
    # Kept as stored (cast_per_layer): mapped like any same-dtype load, never a shard's bytes beside its tensors.
    if device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise WeightsError(f"cannot load Qwen2.5-VL weights from {model_dir}: {first_line(exc)}") from None
    if upcast and not cast_per_layer:
        _upcast_in_place(model, dtype)
    return model.eval()


def compute_in(model: Any, dtype: torch.dtype) -> int:
    """Make a model loaded in a narrower stored dtype compute in ``dtype`` with its matrices kept stored.

    Linear and embedding weights stay as stored and are cast one layer at a time while it runs
    (:func:`~unison_runtime.vace.stored_precision.apply_stored_precision`); every other floating
    tensor (norms, biases, the vision patch embedding, rotary buffers) is converted in place, as
    :func:`_upcast_in_place` would. Returns how many modules cast per layer. Exact: a bf16 -> fp32
    cast loses nothing, so the outputs equal an fp32 load's.
    """
    from ..vace.stored_precision import apply_stored_precision, plan_stored

    params = dict(model.named_parameters(remove_duplicate=False))
    kept = plan_stored(model, {name: p.dtype for name, p in params.items()}, dict.fromkeys(params, dtype))
    kept_ids = {id(params[name]) for name in kept}
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for tensor in tensors.values():
                    if (tensor is not None and id(tensor) not in kept_ids and tensor.is_floating_point()
                            and tensor.dtype != dtype):
                        tensor.data = tensor.data.to(dtype)
    count = apply_stored_precision(model, kept)
    model.config.dtype = dtype
    for key in model.config.sub_configs:
        if (sub_config := getattr(model.config, key, None)) is not None:
            sub_config.dtype = dtype
    gc.collect()
    return count


def _upcast_in_place(model: Any, dtype: torch.dtype) -> None:
    """Convert every floating parameter and buffer to ``dtype``, one tensor at a time.

    Each tensor's data is swapped in place (the Parameter objects stay, so tied embeddings stay
    tied), and its narrow source is freed as soon as its wide copy exists: the peak is the
    converted model plus one tensor. The rotary ``inv_freq`` buffers are computed in fp32 at init
    whatever the load dtype, so they come out as a direct fp32 load makes them. The config then
    says ``dtype`` like a direct load's does.
    """
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for tensor in tensors.values():
                    if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor.data = tensor.data.to(dtype)
    model.config.dtype = dtype
    for key in model.config.sub_configs:
        if (sub_config := getattr(model.config, key, None)) is not None:
            sub_config.dtype = dtype


def _untie_config(config: Any) -> None:
    config.tie_word_embeddings = False
    text = getattr(config, "text_config", None)
    if text is not None and hasattr(text, "tie_word_embeddings"):
        text.tie_word_embeddings = False


def embeddings_tied(model: Any) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


# --------------------------------------------------------------------------- adapter


def adapter_weight_file(lora_dir: Path) -> Path:
    for name in _ADAPTER_WEIGHT_FILES:
        if (lora_dir / name).is_file():
            return lora_dir / name
    raise WeightsError(f"LoRA directory {lora_dir} has no {' or '.join(_ADAPTER_WEIGHT_FILES)}")


def normalize_adapter_key(key: str) -> str:
    """An adapter tensor name as a module path of today's model (transformers >= 4.52 layout).

    Adapters trained on older transformers name the text decoder ``model.layers...`` and the
    vision tower ``visual...``; today they live at ``model.language_model...`` and
    ``model.visual...``.
    """
    key = key.removeprefix(_PEFT_PREFIX)
    if key.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    return key


def _fit_message(lora_file: Path, model_dir: Path, base_name: str | None, problem: str) -> str:
    trained = f" (its adapter_config.json names base {base_name!r})" if base_name else ""
    return (
        f"LoRA adapter {lora_file} does not fit the Qwen2.5-VL model in {model_dir}: {problem}. "
        f"It was trained for another base model{trained}; use the base it was trained on (Qwen2.5-VL-3B-Instruct "
        "for the Unison release)"
    )


def check_adapter_fits(
    state: dict[str, torch.Tensor], model: Any, *, lora_file: Path, model_dir: Path, base_name: str | None
) -> int | None:
    """Refuse an adapter whose tensors do not fit ``model``; return the embedding row count it needs (or None).

    Checked from shapes alone before peft sees the adapter, so a wrong base gives one clear
    error instead of a size-mismatch traceback.
    """
    modules = dict(model.named_modules())
    hidden = model.get_input_embeddings().weight.shape[1]
    embedding_rows: dict[str, int] = {}

    def fail(problem: str) -> WeightsError:
        return WeightsError(_fit_message(lora_file, model_dir, base_name, problem))

    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        module_name = match.group("module") if match else key.rsplit(".", 1)[0]
        module = modules.get(module_name)
        if module is None:
            owner = module_name.split(".token_adapter")[0]
            if ".token_adapter" in module_name and owner in modules:
                continue  # trainable-token deltas: peft checks their indices itself
            raise fail(f"it has weights for {module_name!r}, a module the base does not have")
        if match:
            kind = match.group("kind")
            if isinstance(module, torch.nn.Linear):
                expected = {
                    "lora_A": ("in_features", 1, module.in_features),
                    "lora_B": ("out_features", 0, module.out_features),
                }
                if kind not in expected:
                    raise fail(f"{key} is an embedding LoRA weight, but {module_name} is a linear layer")
                label, dim, size = expected[kind]
                if tensor.ndim != 2 or tensor.shape[dim] != size:
                    raise fail(f"{key} has shape {list(tensor.shape)}, but {module_name} has {label}={size}")
            elif isinstance(module, torch.nn.Embedding):
                if kind == "lora_embedding_B" and (tensor.ndim != 2 or tensor.shape[0] != module.embedding_dim):
                    raise fail(
                        f"{key} has shape {list(tensor.shape)}, but {module_name} has dimension {module.embedding_dim}"
                    )
            else:
                raise fail(
                    f"{key} targets {module_name}, a {type(module).__name__} (LoRA fits linear and embedding layers)"
                )
            continue
        param_name = key.rsplit(".", 1)[1]
        param = getattr(module, param_name, None)
        if not isinstance(param, torch.Tensor):
            raise fail(f"it has {key!r}, but {module_name} has no {param_name!r}")
        is_embedding_matrix = module is model.get_input_embeddings() or module is model.get_output_embeddings()
        if is_embedding_matrix and param_name == "weight":
            if tensor.ndim != 2 or tensor.shape[1] != hidden:
                raise fail(f"{key} has shape {list(tensor.shape)}, but the base's hidden size is {hidden}")
            embedding_rows[key] = tensor.shape[0]
        elif tuple(tensor.shape) != tuple(param.shape):
            raise fail(f"{key} has shape {list(tensor.shape)}, but the base's is {list(param.shape)}")
    rows = set(embedding_rows.values())
    if len(rows) > 1:
        raise fail(f"its embedding matrices disagree on the vocabulary size: {embedding_rows}")
    return rows.pop() if rows else None


def _lora_modules(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({m.group("module") for key in state if (m := _LORA_KEY.match(key))})


def _adapter_tensors(lora_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's tensors, with its whole matrices (``modules_to_save``) left on disk until used.

    A safetensors adapter gives its LoRA weights (small) as tensors and each whole matrix as a meta
    tensor of its shape (enough to check it fits) plus a reader that loads it when it replaces the
    base's matrix: the Unison release's two fp32 vocabulary matrices (2.3 GiB) are then never in
    memory together. Other formats are loaded whole (``sources`` empty).
    """
    if lora_file.suffix != ".safetensors":
        return load_state_dict(lora_file, what="Unison LoRA adapter", device="cpu"), {}
    from safetensors import safe_open

    from ..weights import read_safetensors_header

    header = read_safetensors_header(lora_file, what="Unison LoRA adapter")
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, Any] = {}
    whole = [k for k in header if k != "__metadata__" and ".token_adapter" not in k
             and not _LORA_KEY.match(normalize_adapter_key(k))]
    small = [k for k in header if k != "__metadata__" and k not in whole]
    try:
        with safe_open(str(lora_file), framework="pt", device="cpu") as handle:
            for key in small:
                tensors[key] = handle.get_tensor(key)
            for key in whole:
                view = handle.get_slice(key)
                tensors[key] = torch.empty(view.get_shape(), dtype=SAFETENSORS_DTYPES[view.get_dtype()], device="meta")
                sources[key] = key
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise WeightsError(f"Unison LoRA adapter {lora_file}: truncated or not a safetensors file "
                           f"({first_line(exc)})") from None
    return tensors, {key: (lora_file, name) for key, name in sources.items()}


def _read_whole(source: tuple[Path, str]) -> torch.Tensor:
    from safetensors import safe_open

    path, name = source
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return handle.get_tensor(name)


def _replace_saved_modules(model: Any, state: dict[str, torch.Tensor],
                           sources: dict[str, Any] | None = None) -> list[str]:
    """Put the adapter's whole trained matrices (``modules_to_save``: the Unison release trains
    ``embed_tokens`` and ``lm_head``) straight into ``model``, one at a time; returns their names.

    Why: ``PeftModel()`` wraps each such module with two deep copies of the base matrix and keeps
    the original until ``merge_and_unload``, so the merge of the 3B planner held five
    151,936 x 2048 vocabulary matrices at once (issue 16). Here each matrix is cast into the
    model's dtype, becomes the module's new parameter (so a tied base matrix is untied), and the
    adapter's copy and the replaced base matrix are let go before the next one: at most the
    model plus one matrix in two dtypes. The values are what peft's merge gives: the adapter's
    tensor copied into the module's dtype.
    """
    modules = dict(model.named_modules())
    done = []
    for key in [k for k in state if not _LORA_KEY.match(k) and ".token_adapter" not in k]:
        module_name, _, param_name = key.rpartition(".")
        module = modules[module_name]
        old = getattr(module, param_name)
        tensor = state.pop(key)
        if tensor.is_meta:  # left on disk by _adapter_tensors: read it now, alone
            tensor = _read_whole((sources or {})[key])
        new = torch.nn.Parameter(tensor.to(device=old.device, dtype=old.dtype, copy=True), requires_grad=False)
        del tensor, old
        setattr(module, param_name, new)
        done.append(key)
        gc.collect()
    return done


def merge_lora(model: Any, processor: Any, *, model_dir: Path, lora_dir: Path, notes: list[str]) -> Any:
    """Load the Unison LoRA from ``lora_dir`` into ``model``, merge it, and return the merged model."""
    from peft import LoraConfig, PeftModel
    from peft.utils import set_peft_model_state_dict

    config_data = _read_json(lora_dir / "adapter_config.json", "LoRA adapter")
    if str(config_data.get("peft_type", "")).upper() != "LORA":
        raise WeightsError(
            f"{lora_dir / 'adapter_config.json'} has peft_type {config_data.get('peft_type')!r}; expected 'LORA'"
        )
    lora_file = adapter_weight_file(lora_dir)
    raw, sources = _adapter_tensors(lora_file)
    state = {normalize_adapter_key(k): v for k, v in raw.items()}
    if len(state) != len(raw):
        raise WeightsError(f"LoRA adapter {lora_file} names some tensors twice (old and new layout)")
    sources = {normalize_adapter_key(k): v for k, v in sources.items()}
    raw.clear()  # ``state`` holds the only references: each whole matrix can go as soon as it is used
    base_name = config_data.get("base_model_name_or_path")
    rows = check_adapter_fits(state, model, lora_file=lora_file, model_dir=model_dir, base_name=base_name)
    modules = _lora_modules(state)
    if not modules:
        raise WeightsError(f"LoRA adapter {lora_file} holds no LoRA weights (no lora_A / lora_B tensors)")

    tokens = len(processor.tokenizer)
    current = model.get_input_embeddings().weight.shape[0]
    if rows is not None and rows < tokens:
        raise WeightsError(
            f"LoRA adapter {lora_file} has {rows} embedding rows, but its tokenizer has {tokens} tokens"
        )
    target_rows = rows if rows is not None else max(tokens, current)
    if target_rows != current:
        model.resize_token_embeddings(target_rows, mean_resizing=False)
        notes.append(f"embeddings resized from {current} to {target_rows} rows for the planner tokens")

    try:
        config = LoraConfig.from_pretrained(str(lora_dir))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"cannot read {lora_dir / 'adapter_config.json'}: {exc}") from None
    # Apply LoRA exactly where the adapter has weights: robust to target patterns written for
    # an older module layout.
    config.target_modules = set(modules)
    config.exclude_modules = None
    config.layers_to_transform = None
    config.layers_pattern = None
    config.inference_mode = True
    replaced = _replace_saved_modules(model, state, sources)
    if replaced:
        config.modules_to_save = None  # already in place: peft would deep-copy each of them twice
    with warnings.catch_warnings():
        for pattern in _PEFT_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        try:
            peft_model = PeftModel(model, config)
            result = set_peft_model_state_dict(peft_model, {_PEFT_PREFIX + k: v for k, v in state.items()})
        except (RuntimeError, ValueError, KeyError) as exc:
            raise WeightsError(f"cannot apply LoRA adapter {lora_file} to {model_dir}: {first_line(exc)}") from None
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise WeightsError(f"LoRA adapter {lora_file} has weights peft could not place: {unexpected[:5]}")
        merged = peft_model.merge_and_unload()
    if not embeddings_tied(merged):
        _untie_config(merged.config)
        notes.append("input and output embeddings untied (the adapter trains them apart)")
    notes.append(f"LoRA {lora_dir.name} merged in memory ({len(modules)} layers)")
    return merged.eval()


# --------------------------------------------------------------------------- entry point


def load_qwen(
    model_dir: str | Path,
    lora: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attention: str | None = None,
    cast_per_layer: bool = True,
) -> LoadedQwen:
    """Load a Qwen2.5-VL directory, optionally with the Unison LoRA merged in; see the module docstring.

    ``cast_per_layer``: a checkpoint stored narrower than ``dtype`` on the CPU keeps its matrices
    as stored and casts them per layer (see the module docstring); ``False`` converts them whole.
    """
    model_dir = _require_dir(model_dir, "Qwen2.5-VL model")
    lora_dir = _require_dir(lora, "LoRA adapter") if lora is not None else None
    if lora_dir is not None and not (lora_dir / "adapter_config.json").is_file():
        raise WeightsError(f"LoRA directory {lora_dir} has no adapter_config.json; expected a peft adapter directory")
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    resolved_attention = resolve_attention(attention, resolved_device, resolved_dtype)
    config, headers = _check_model_dir(model_dir)
    notes: list[str] = []

    # A checkpoint with its own lm_head.weight under a tying config is the reference's merged
    # planner: tying would throw the trained head away.
    untie = _config_ties(config) and "lm_head.weight" in headers
    if untie:
        notes.append(f"{model_dir.name}: config ties embeddings but the checkpoint has its own lm_head; loaded untied")
    processor = _load_processor(model_dir, lora_dir)
    stored = stored_float_dtype(headers)
    keep_stored = cast_per_layer and load_stored_then_convert(stored, resolved_device, resolved_dtype)
    model = _load_model(
        model_dir,
        untie=untie,
        device=resolved_device,
        dtype=resolved_dtype,
        attention=resolved_attention,
        stored=stored,
        cast_per_layer=keep_stored,
    )
    if lora_dir is not None:
        model = merge_lora(model, processor, model_dir=model_dir, lora_dir=lora_dir, notes=notes)
    if keep_stored:
        compute_in(model, resolved_dtype)
        notes.append(f"weights kept in {str(stored).removeprefix('torch.')} as stored, cast to "
                     f"{str(resolved_dtype).removeprefix('torch.')} layer by layer")
    return LoadedQwen(
        model=model,
        processor=processor,
        model_dir=model_dir,
        lora_dir=lora_dir,
        device=resolved_device,
        dtype=resolved_dtype,
        attention=resolved_attention,
        has_planner_tokens=has_planner_tokens(processor.tokenizer),
        notes=notes,
    )
