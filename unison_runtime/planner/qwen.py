"""Stage one with Qwen2.5-VL: the plan (with the Unison LoRA), understanding answers, projector input.

``load_planner(model_dir, lora=...)`` returns a :class:`QwenPlanner`, which implements the
shared :class:`~unison_runtime.planner.base.Planner` interface:

- ``plan``: the reference's planning pass (chat template with generation prompt over the
  ``<IMGPAD>``/``<VIDPAD>`` text, greedy, at most 256 new tokens), decoded with special tokens
  kept and read by the token codec into a ``Plan`` with ``source="lora"``. Without a planning
  LoRA the rule planner decides (the base model never learnt the planner tokens).
- ``answer``: understanding, seeing every referenced image and video (see :mod:`.qwen_inputs`).
- ``hidden_states``: the projector's input, computed as the reference does.

Loading (base + LoRA merged in memory, or a merged directory, tie fix included) lives in
:mod:`.qwen_loading`.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PlannerOutputError, UnisonError
from ..plan import IMAGE_PAD, PLANNER_TOKENS, VIDEO_PAD, Plan, parse_planner_text
from .qwen_inputs import (
    DEFAULT_MAX_VIDEO_FRAMES,
    check_media,
    planning_messages,
    understanding_messages,
    visual_inputs,
)
from .qwen_loading import LoadedQwen, load_qwen
from .rules import RulePlanner
from .rules_checks import check_instruction_text, check_plan_media, media_info

if TYPE_CHECKING:
    from ..instruction import Instruction
    from ..media import Medium

#: The reference's budget for the planning pass.
PLAN_MAX_NEW_TOKENS = 256
#: Default budget for understanding answers (the reference also used 256).
ANSWER_MAX_NEW_TOKENS = 256
# Tokens only the planning LoRA emits on the output side; text without any of them is, as in
# the reference, an understanding request (the LoRA answers those in words).
_OUTPUT_TOKENS = tuple(t for t in PLANNER_TOKENS if t not in (IMAGE_PAD, VIDEO_PAD))
_END_MARKERS = ("<|im_end|>", "<|endoftext|>")


class QwenPlanner:
    """Qwen2.5-VL stage one behind the shared planner interface.

    ``generate_options`` are extra keyword arguments for every ``model.generate`` call (for
    example a ``logits_processor`` list to constrain decoding); greedy decoding and the token
    budgets are set by the planner and cannot be overridden there.

    ``hidden_states`` returns float32 on the CPU whatever the model's dtype and device: the
    reference casts to float32 before the projector, and the projector may live elsewhere.
    """

    def __init__(
        self,
        loaded: LoadedQwen,
        *,
        max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES,
        answer_max_new_tokens: int = ANSWER_MAX_NEW_TOKENS,
        generate_options: dict[str, Any] | None = None,
    ) -> None:
        self._model: Any = loaded.model
        self.processor = loaded.processor
        self.model_dir: Path = loaded.model_dir
        self.lora_dir: Path | None = loaded.lora_dir
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.attention = loaded.attention
        self.notes: tuple[str, ...] = tuple(loaded.notes)
        self.has_planning_lora: bool = loaded.has_planner_tokens
        self.max_video_frames = max_video_frames
        self.answer_max_new_tokens = answer_max_new_tokens
        self.generate_options: dict[str, Any] = dict(generate_options or {})
        label = self.model_dir.name + (f"+{self.lora_dir.name}" if self.lora_dir is not None else "")
        self.name = f"qwen2.5-vl:{label}"

    # ------------------------------------------------------------------ lifecycle

    @property
    def model(self) -> Any:
        if self._model is None:
            raise UnisonError(f"stage-one model {self.name} was unloaded; load it again to plan or answer")
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def unload(self) -> None:
        """Free the model (and CUDA's cached blocks) so stage two can have the memory."""
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ planning

    def planner_text(self, instruction: Instruction) -> str:
        """The planning pass's raw output: greedy, special tokens kept, chat end markers removed."""
        inputs = self._chat_inputs(planning_messages(instruction), add_generation_prompt=True)
        new_tokens = self._generate(inputs, PLAN_MAX_NEW_TOKENS)
        text = self.processor.tokenizer.decode(
            new_tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        for marker in _END_MARKERS:
            text = text.replace(marker, "")
        return text.strip()

    def plan(self, instruction: Instruction) -> Plan:
        """The plan for ``instruction``: from the LoRA's tokens, or the rule planner without a LoRA.

        An output the codec cannot read raises :class:`PlannerOutputError` quoting it, with the
        rule planner's plan as ``fallback``. An output with no planner token at all is an
        understanding request, as the reference reads it.
        """
        if not self.has_planning_lora:
            return _rule_plan(instruction)
        check_instruction_text(instruction.text)
        text = self.planner_text(instruction)
        if not any(token in text for token in _OUTPUT_TOKENS):
            plan = parse_planner_text("", instruction.media, prompt=instruction.prompt, source="lora")
            return plan.with_changes(notes=(f"stage one answered without planner tokens: {text[:200]!r}",))
        try:
            plan = parse_planner_text(text, instruction.media, prompt=instruction.prompt, source="lora")
        except PlannerOutputError as exc:
            raise PlannerOutputError(text, exc.reason, _fallback_plan(instruction)) from None
        # The rule planner's checks on media count and roles: no medium is dropped without a note.
        return check_plan_media(plan, media_info(instruction))

    # ------------------------------------------------------------------ understanding

    def answer(
        self, instruction: Instruction, media: Sequence[Medium] = (), *, max_new_tokens: int | None = None
    ) -> str:
        """Answer ``instruction`` seeing each referenced medium where it was referenced.

        ``media`` are the decoded references in instruction order (images ``[1, H, W, 3]``,
        videos ``[T, H, W, 3]`` uint8); videos are sampled uniformly to at most
        ``max_video_frames`` frames. Returns the text with special tokens removed.
        """
        check_media(instruction, media)
        images, videos, metadata = visual_inputs(media, max_video_frames=self.max_video_frames)
        prompt = self.processor.apply_chat_template(
            understanding_messages(instruction), add_generation_prompt=True, tokenize=False
        )
        kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
            videos_kwargs: dict[str, Any] = {"do_sample_frames": False, "video_metadata": metadata}
            if hasattr(self.processor.video_processor, "cap_pixels_per_frame"):
                videos_kwargs["cap_pixels_per_frame"] = True  # qwen-vl-utils' per-frame pixel budget
            kwargs["videos_kwargs"] = videos_kwargs
        inputs = self.processor(**kwargs)
        new_tokens = self._generate(inputs, max_new_tokens or self.answer_max_new_tokens)
        return self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ projector input

    def hidden_states(self, instruction: Instruction) -> torch.Tensor:
        """Last hidden states of the planning prompt, first token dropped: float32 ``[1, L, hidden]`` on CPU.

        As the reference: the planning messages through the chat template *without* the
        generation prompt, through the decoder (final norm applied), ``[:, 1:, :]``.
        """
        model = self.model
        inputs = _to_device(self._chat_inputs(planning_messages(instruction), add_generation_prompt=False), model)
        with torch.inference_mode():
            output = model.model(**inputs)
        return output.last_hidden_state[:, 1:, :].float().cpu()

    # ------------------------------------------------------------------ helpers

    def _chat_inputs(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> dict[str, Any]:
        inputs = self.processor.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        return dict(inputs)

    def _generate(self, inputs: Any, max_new_tokens: int) -> torch.Tensor:
        """Greedy generation; returns the new token ids of the single sequence."""
        model = self.model
        batch = _to_device(inputs, model)
        options = {
            **self.generate_options,
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            # Qwen's generation_config samples with top_k=1; greedy makes it explicit and quiet.
            "temperature": None,
            "top_p": None,
            "top_k": None,
        }
        with torch.inference_mode():
            output = model.generate(**batch, **options)
        return output[0, batch["input_ids"].shape[1]:].cpu()


def _to_device(inputs: Any, model: Any) -> dict[str, Any]:
    return {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()}


def _rule_plan(instruction: Instruction) -> Plan:
    return RulePlanner().plan(instruction)


def _fallback_plan(instruction: Instruction) -> Plan | None:
    """The rule planner's plan to offer when the LoRA's output cannot be read (None if it cannot plan either)."""
    try:
        return _rule_plan(instruction)
    except UnisonError:
        return None


def load_planner(
    model_dir: str | Path,
    lora: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attention: str | None = None,
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES,
    answer_max_new_tokens: int = ANSWER_MAX_NEW_TOKENS,
    generate_options: dict[str, Any] | None = None,
) -> QwenPlanner:
    """Load stage one from a Qwen2.5-VL directory, with the Unison LoRA or already merged.

    ``device`` defaults to CUDA when available; ``dtype`` to bf16 on GPU and fp32 on CPU
    (``auto``/``bf16``/``fp16``/``fp32``); ``attention`` to sdpa, or flash_attention_2 when
    flash-attn is installed (asking for it without the package is an error). Refusals are
    :class:`~unison_runtime.errors.WeightsError` naming the file.
    """
    loaded = load_qwen(model_dir, lora, device=device, dtype=dtype, attention=attention)
    return QwenPlanner(
        loaded,
        max_video_frames=max_video_frames,
        answer_max_new_tokens=answer_max_new_tokens,
        generate_options=generate_options,
    )
