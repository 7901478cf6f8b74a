"""Tiny random Qwen2.5-VL directories, Unison planning LoRAs and merged planners, in the real formats.

Everything here is written the way the real files are: the base is a Hugging Face directory in
the Qwen2.5-VL-3B-Instruct layout (``config.json`` with ``tie_word_embeddings: true`` like the
3B, legacy-layout ``model.safetensors``, a byte-level BPE ``tokenizer.json`` carrying Qwen's
special tokens, ``preprocessor_config.json``, ``video_preprocessor_config.json`` and
``chat_template.json`` with Qwen's chat template); the LoRA is saved by peft as the Unison
release ships it (14 added tokens, ``embed_tokens``/``lm_head`` saved whole as
``modules_to_save``, the tokenizer next to the adapter); the merged directory is what the
reference's merge step wrote, optionally with its ``tie_word_embeddings`` bug left in.

The weights are random and tiny (text hidden 64, 2 layers, a 2-block vision tower with 4-pixel
patches, a vocabulary of a few hundred) so a build takes well under a second; the loading code
that reads them is the code users run.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..plan import PLANNER_TOKENS

#: Qwen2.5-VL's special tokens, in the order its tokenizer numbers them.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

#: Qwen2.5-VL-Instruct's chat template (the format's content: roles, vision placeholders, prompt).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split: digits one by one, letters in runs, like the real tokenizer.
_QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = (
    "Please create a video with a width of 768 pixels and a height of 480 pixels, that is 2 seconds long, "
    "of a lion walking around in its habitat.",
    "What is in this image? Describe the picture and the video. Which one is brighter? Answer briefly.",
    "Generate an image of a cat. Make the person in the photo dance. Follow the pose. Replace the sky.",
    "system You are a helpful assistant. user assistant the a an of in on with and is are this that",
)

#: Sizes of the tiny model. The LoRA targets the language model's attention and MLP projections.
TEXT_HIDDEN = 64
VISION_HIDDEN = 32
PATCH_SIZE = 4
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 8 * 8
MAX_PIXELS = 32 * 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_tokenizer(bpe_vocab: int = 320):
    """A byte-level BPE with Qwen2's pre-tokenizer and special tokens, trained on a few sentences."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(list(_CORPUS) * 4, trainer)
    saved_merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in saved_merges]
    tokenizer = Qwen2Tokenizer(
        vocab=bpe.get_vocab(),
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    specials = [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]
    tokenizer.add_tokens(specials, special_tokens=True)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen_config(tokenizer, *, vocab_size: int, tie_word_embeddings: bool = True, text_hidden: int = TEXT_HIDDEN):
    """A Qwen2.5-VL config of the tiny sizes, with the token ids of ``tokenizer``.

    ``text_hidden`` must be a multiple of 64 (4 heads of 16: the mrope split below is per head).
    """
    from transformers import Qwen2_5_VLConfig

    if text_hidden % 64:
        raise ValueError(f"text_hidden must be a multiple of 64, got {text_hidden}")
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": text_hidden // 16,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                # head_dim 16: the rotary half (8) split into time/height/width as the 3B splits 64
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "tie_word_embeddings": tie_word_embeddings,
        },
        vision_config={
            "depth": 2,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_heads": 2,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "window_size": PATCH_SIZE * MERGE_SIZE * 2,
            "out_hidden_size": text_hidden,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tie_word_embeddings,
    )


def _save_processor_files(directory: Path, tokenizer) -> None:
    """Tokenizer, image/video preprocessor configs and chat_template.json, as the Qwen repos lay them out."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    sizes = {
        "patch_size": PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
    }
    tokenizer.save_pretrained(directory)
    Qwen2VLImageProcessor(**sizes).save_pretrained(directory)
    Qwen2VLVideoProcessor(**sizes).save_pretrained(directory)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}, indent=2) + "\n")


def _write_generation_config(directory: Path, tokenizer) -> None:
    """Qwen2.5-VL-Instruct's generation settings (top_k=1: effectively greedy, repetition penalty 1.05)."""
    ids = tokenizer.convert_tokens_to_ids
    config = {
        "bos_token_id": ids("<|endoftext|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
        "do_sample": True,
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_k": 1,
        "top_p": 0.001,
    }
    (directory / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_tiny_qwen(
    directory: str | Path,
    *,
    seed: int = 0,
    spare_vocab: int = 50,
    tie_word_embeddings: bool = True,
    text_hidden: int = TEXT_HIDDEN,
) -> Path:
    """Write a tiny random Qwen2.5-VL-Instruct directory and return its path.

    ``spare_vocab`` unused embedding rows are left after the tokenizer's tokens, as the real
    model has (151,936 rows for 151,665 tokens): the 14 Unison tokens then fit without a resize.
    ``spare_vocab=0`` makes a model whose embeddings must grow when tokens are added.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = tiny_qwen_config(
        tokenizer,
        vocab_size=len(tokenizer) + spare_vocab,
        tie_word_embeddings=tie_word_embeddings,
        text_hidden=text_hidden,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # the default init leaves the embeddings too small to tell tokens apart
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    _write_generation_config(directory, tokenizer)
    _save_processor_files(directory, tokenizer)
    return directory


def _load_for_training(base_dir: Path):
    """Base model + tokenizer with the 14 Unison tokens, embeddings grown only if they do not fit."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    tokenizer.add_tokens(list(PLANNER_TOKENS), special_tokens=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model.eval(), tokenizer


def build_tiny_unison_lora(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    rank: int = 4,
    modules_to_save: Sequence[str] | None = ("embed_tokens", "lm_head"),
) -> Path:
    """Write a peft LoRA adapter for ``base_dir`` as the Unison release ships it, and return its path.

    Like the release (LLaMA-Factory with ``add_special_tokens``): the 14 planner tokens are added
    to the tokenizer, which is saved next to the adapter; ``embed_tokens`` and ``lm_head`` are
    trained whole (``modules_to_save``) so they are saved with the adapter and differ from each
    other even though the 3B base ties them; LoRA targets the language model's projections, not
    the vision tower. All weights are random and non-zero (LoRA B included), so merging really
    changes the outputs. ``modules_to_save=None`` makes an adapter without embeddings.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    model, tokenizer = _load_for_training(base_dir)
    targets = "|".join(LORA_TARGETS)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=rf".*language_model.*\.({targets})",
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    with warnings.catch_warnings():
        # embed_tokens and lm_head are trained apart on purpose, as in the release.
        warnings.filterwarnings("ignore", message=".*(tie_word_embeddings|is_gradient_checkpointing).*")
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_merged_planner(
    base_dir: str | Path,
    lora_dir: str | Path,
    out_dir: str | Path,
    *,
    fix_tie: bool = False,
) -> Path:
    """Merge ``lora_dir`` into ``base_dir`` with plain peft, as the reference's export step did.

    The merged checkpoint holds its own ``lm_head.weight`` (trained apart from the embeddings).
    With ``fix_tie=False`` the config keeps the base's ``tie_word_embeddings: true`` (the
    reference bug the README told users to fix by hand); ``fix_tie=True`` writes ``false``.
    """
    from peft import PeftModel

    base_dir, lora_dir, out_dir = Path(base_dir), Path(lora_dir), Path(out_dir)
    model, _ = _load_for_training(base_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(tie_word_embeddings|no longer tied|is_gradient_checkpointing).*")
        merged = PeftModel.from_pretrained(model, lora_dir, is_trainable=False).merge_and_unload()
    merged.config.tie_word_embeddings = False
    merged.save_pretrained(out_dir)
    _set_config_tie(out_dir / "config.json", not fix_tie)
    tokenizer_source = lora_dir if (lora_dir / "tokenizer_config.json").exists() else base_dir
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_source / name, out_dir / name)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
                 "generation_config.json"):
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, out_dir / name)
    return out_dir


def _set_config_tie(config_path: Path, tied: bool) -> None:
    data = json.loads(config_path.read_text())
    data["tie_word_embeddings"] = tied
    if isinstance(data.get("text_config"), dict):
        data["text_config"]["tie_word_embeddings"] = tied
    config_path.write_text(json.dumps(data, indent=2) + "\n")


def script_tiny_planner(model_dir: str | Path, text: str, out_dir: str | Path | None = None) -> Path:
    """Rewrite an untied tiny model's weights so greedy decoding emits ``text`` then ``<|im_end|>``.

    Training-free surgery: the attention and MLP outputs are zeroed, so the last hidden state is
    the current token's embedding; each token of the script gets its own embedding axis and the
    LM head maps that axis to the next token. The next token then depends only on the current
    one, so every token of ``text`` must be distinct (a ``ValueError`` says which repeats). The
    generation prompt ends in ``"\\n"`` (``<|im_start|>assistant\\n``), which starts the chain.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    def encode(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False)["input_ids"]

    script = encode("\n") + encode(text)
    repeated = sorted({tokenizer.convert_ids_to_tokens(t) for t in script if script.count(t) > 1})
    if repeated:
        raise ValueError(f"script {text!r} repeats tokens {repeated}; each token must appear once")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    if model.config.tie_word_embeddings:
        raise ValueError(f"{model_dir} ties its LM head to the embeddings; script a merged, untied directory")
    hidden = model.config.text_config.hidden_size
    if len(script) > hidden:
        raise ValueError(f"script needs {len(script)} tokens, the model has only {hidden} hidden dimensions")
    language = model.model.language_model
    with torch.no_grad():
        for layer in language.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.get_input_embeddings().weight
        head = model.lm_head.weight
        head.zero_()
        following = [*script[1:], tokenizer.convert_tokens_to_ids("<|im_end|>")]
        for axis, (token, successor) in enumerate(zip(script, following, strict=True)):
            embed[token] = 0.0
            embed[token, axis] = 1.0
            head[successor, axis] = 100.0
    model.save_pretrained(out_dir)
    if out_dir != model_dir:
        for path in model_dir.iterdir():
            if path.is_file() and not path.name.endswith(".safetensors") and path.name != "config.json":
                shutil.copy(path, out_dir / path.name)
    return out_dir


@dataclass(frozen=True)
class TinyQwenSet:
    """The stage-one directories tests and the selftest use, built together under one root."""

    base: Path
    lora: Path
    merged_tied: Path
    merged_fixed: Path


def build_tiny_qwen_set(root: str | Path, *, seed: int = 0) -> TinyQwenSet:
    """A base, its Unison LoRA, and the LoRA merged with the reference's tie bug and with it fixed."""
    root = Path(root)
    base = build_tiny_qwen(root / "qwen-base", seed=seed)
    lora = build_tiny_unison_lora(base, root / "unison-lora", seed=seed + 1)
    return TinyQwenSet(
        base=base,
        lora=lora,
        merged_tied=build_tiny_merged_planner(base, lora, root / "merged-tied", fix_tie=False),
        merged_fixed=build_tiny_merged_planner(base, lora, root / "merged-fixed", fix_tie=True),
    )
