"""Stage-one passes on the tiny Qwen2.5-VL: planning (decode + parse), understanding, hidden states."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LogitsProcessor, LogitsProcessorList

from unison_runtime.errors import MediaError, PlannerOutputError
from unison_runtime.instruction import parse_instruction
from unison_runtime.media import Medium
from unison_runtime.plan import Task
from unison_runtime.planner.qwen import QwenPlanner, load_planner
from unison_runtime.planner.qwen_inputs import sample_frame_indices, understanding_messages
from unison_runtime.planner.rules import RulePlanner
from unison_runtime.testing.tiny_qwen import (
    MERGE_SIZE,
    PATCH_SIZE,
    TEMPORAL_PATCH_SIZE,
    script_tiny_planner,
)

LION = (
    "Please create a video with a width of 768 pixels and a height of 480 pixels, "
    "that is 3 seconds long, of a lion walking around in its habitat."
)


class ForceText(LogitsProcessor):
    """Test-only: makes greedy decoding emit ``ids`` then ``end`` (everything else at -inf)."""

    def __init__(self, ids: list[int], end: int) -> None:
        self.ids = [*ids, end]
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.start, len(self.ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[step]] = 0.0
        return forced


@pytest.fixture(scope="module")
def planner(tiny_qwen) -> QwenPlanner:
    return load_planner(tiny_qwen.base, lora=tiny_qwen.lora, device="cpu")


@pytest.fixture()
def forced(planner):
    """Set the text the planner's next generation emits; restores the planner afterwards."""

    def force(text: str) -> None:
        tokenizer = planner.processor.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        planner.generate_options = {"logits_processor": LogitsProcessorList([ForceText(ids, end)])}

    yield force
    planner.generate_options = {}


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, h, w, 3), dtype=np.uint8)


def _video(t: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- planning


def test_forced_planner_tokens_decode_and_parse(planner, forced):
    forced("<BORES>768,480<EORES><BONF>72<EONF><CFV>")
    instruction = parse_instruction(LION)
    assert planner.planner_text(instruction) == "<BORES>768,480<EORES><BONF>72<EONF><CFV>"
    plan = planner.plan(instruction)
    assert plan.task is Task.TEXT_TO_VIDEO
    assert (plan.width, plan.height, plan.num_frames) == (768, 480, 73)
    assert plan.source == "lora"
    assert plan.planner_text == "<BORES>768,480<EORES><BONF>72<EONF><CFV>"
    assert plan.prompt == instruction.prompt


def test_forced_plan_with_media_assigns_roles(planner, forced):
    forced("<BORES>832,480<EORES><BONF>80<EONF><BOFIDX>1<EOFIDX><CFV>")
    plan = planner.plan(parse_instruction("Animate ###cat.png### so it ends on this frame"))
    assert plan.task is Task.IMAGE_TO_VIDEO
    assert plan.frame_index == "last"
    assert plan.num_frames == 81
    assert [(m.path, m.role) for m in plan.media] == [("cat.png", "frame")]


def test_editing_plan_reads_mask_and_source(planner, forced):
    forced("<BORES>512,512<EORES><BOEDIT>1,0<EOEDIT><CFI>")
    plan = planner.plan(parse_instruction("Replace the sky in ###photo.png### inside ###mask.png###"))
    assert plan.task is Task.IMAGE_EDITING
    assert (plan.mask_index, plan.source_index) == (1, 0)
    assert [m.role for m in plan.media] == ["source", "mask"]


def test_malformed_output_is_quoted_with_the_rule_plan_as_fallback(planner, forced):
    forced("<BORES>768<EORES><CFV>")
    instruction = parse_instruction(LION)
    with pytest.raises(PlannerOutputError) as info:
        planner.plan(instruction)
    assert info.value.text == "<BORES>768<EORES><CFV>"
    assert "<BORES>768<EORES><CFV>" in str(info.value)
    assert info.value.fallback == RulePlanner().plan(instruction)
    assert info.value.fallback.source == "rules"


def test_output_without_planner_tokens_is_understanding(planner, forced):
    forced("A lion.")
    plan = planner.plan(parse_instruction("What animal is in ###zoo.jpg###?"))
    assert plan.task is Task.IMAGE_UNDERSTANDING
    assert plan.source == "lora"
    assert any("A lion." in note for note in plan.notes)


def test_without_a_lora_the_rule_planner_plans(tiny_qwen):
    base = load_planner(tiny_qwen.base, device="cpu")
    instruction = parse_instruction(LION)
    assert base.plan(instruction) == RulePlanner().plan(instruction)


def test_scripted_weights_plan_end_to_end_without_hooks(tiny_qwen, tmp_path):
    text = "<BORES>640,352<EORES><BONF>8<EONF><CFV>"
    scripted = script_tiny_planner(tiny_qwen.merged_fixed, text, tmp_path / "scripted")
    planner = load_planner(scripted, device="cpu")
    assert planner.generate_options == {}
    plan = planner.plan(parse_instruction("A short clip of waves"))
    assert plan.planner_text == text
    assert (plan.task, plan.width, plan.height, plan.num_frames, plan.source) == (
        Task.TEXT_TO_VIDEO, 640, 352, 9, "lora",
    )  # fmt: skip


def test_script_refuses_repeated_tokens(tiny_qwen, tmp_path):
    with pytest.raises(ValueError, match="repeats tokens"):
        script_tiny_planner(tiny_qwen.merged_fixed, "<BORES>768,480<EORES><CFI>", tmp_path / "never")


# --------------------------------------------------------------------------- understanding


class Recorder:
    """Records the arguments of every forward call of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append((args, dict(kwargs)))

    def close(self) -> None:
        self.handle.remove()


def _patches(grid: torch.Tensor) -> int:
    return int(grid.prod(dim=-1).sum())


def test_understanding_feeds_every_image_and_video(planner):
    instruction = parse_instruction("Compare ###a.png### with ###clip.mp4### and ###b.jpg###. Which is brighter?")
    media = [
        Medium("a.png", "image", _image(32, 24, 1)),
        Medium("clip.mp4", "video", _video(40, 24, 32, 2), fps=20.0),
        Medium("b.jpg", "image", _image(16, 16, 3)),
    ]
    vision = Recorder(planner.model.model.visual)  # what the vision tower is given: patches + grids
    language = Recorder(planner.model)
    try:
        answer = planner.answer(instruction, media, max_new_tokens=4)
    finally:
        vision.close()
        language.close()
    assert isinstance(answer, str)
    assert len(vision.calls) == 2  # the images in one batch, the video in another
    (image_pixels,), image_kwargs = vision.calls[0]
    (video_pixels,), video_kwargs = vision.calls[1]
    image_grid, video_grid = image_kwargs["grid_thw"], video_kwargs["grid_thw"]
    assert image_grid.tolist() == [[1, 32 // PATCH_SIZE, 24 // PATCH_SIZE], [1, 16 // PATCH_SIZE, 16 // PATCH_SIZE]]
    # 40 frames sampled down to 16, paired by the temporal patch: 8 steps.
    steps = planner.max_video_frames // TEMPORAL_PATCH_SIZE
    assert video_grid.tolist() == [[steps, 24 // PATCH_SIZE, 32 // PATCH_SIZE]]
    patch_dim = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE
    assert image_pixels.shape == (_patches(image_grid), patch_dim)
    assert video_pixels.shape == (_patches(video_grid), patch_dim)
    # b.jpg (16x16, no resize needed) is really what the tower sees: its first 4x4 patch, both
    # temporal copies, normalized with CLIP's mean/std, in Qwen's (channel, time, row, col) order.
    processor = planner.processor.image_processor
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    corner = torch.from_numpy(media[2].frames[0, :PATCH_SIZE, :PATCH_SIZE]).float().permute(2, 0, 1) / 255.0
    expected = ((corner - mean[:, None, None]) / std[:, None, None])[:, None].expand(3, TEMPORAL_PATCH_SIZE, -1, -1)
    first_patch_of_b = int(image_grid[0].prod())
    torch.testing.assert_close(image_pixels[first_patch_of_b], expected.reshape(-1), atol=1e-4, rtol=1e-4)

    _, first = language.calls[0]
    torch.testing.assert_close(first["second_per_grid_ts"], torch.tensor([TEMPORAL_PATCH_SIZE / (16 / 40 * 20.0)]))

    # The placeholders sit where the references were: image, video, image.
    config = planner.model.config
    ids = first["input_ids"][0].tolist()
    merge = MERGE_SIZE**2
    assert ids.count(config.image_token_id) == _patches(image_grid) // merge
    assert ids.count(config.video_token_id) == _patches(video_grid) // merge
    order = [i for i in ids if i in (config.image_token_id, config.video_token_id)]
    runs = [order[0]] + [b for a, b in itertools.pairwise(order) if a != b]
    assert runs == [config.image_token_id, config.video_token_id, config.image_token_id]
    assert "Which is brighter?" in planner.processor.tokenizer.decode(ids)


def test_understanding_messages_keep_reference_order():
    instruction = parse_instruction("Is ###x.mp4### longer than ###y.mov###?")
    content = understanding_messages(instruction)[0]["content"]
    assert content == [
        {"type": "text", "text": "Is "},
        {"type": "video"},
        {"type": "text", "text": " longer than "},
        {"type": "video"},
        {"type": "text", "text": "?"},
    ]


def test_text_only_answer_matches_direct_generation(planner):
    instruction = parse_instruction("What is the capital of France?")
    vision = Recorder(planner.model.model.visual)
    try:
        answer = planner.answer(instruction, [], max_new_tokens=6)
    finally:
        vision.close()
    assert vision.calls == []

    processor = planner.processor
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = planner.model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, top_k=None, top_p=None,
                                     temperature=None)  # fmt: skip
    expected = processor.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert answer == expected


def test_answer_refuses_media_that_do_not_match_the_references(planner):
    instruction = parse_instruction("Describe ###a.png###")
    with pytest.raises(MediaError, match="references 1 media but 0"):
        planner.answer(instruction, [])
    with pytest.raises(MediaError, match="referenced as a image but a video"):
        planner.answer(instruction, [Medium("a.png", "video", _video(4, 16, 16, 0))])


@given(total=st.integers(1, 2000), cap=st.integers(1, 64))
def test_frame_sampling_is_uniform_and_capped(total, cap):
    indices = sample_frame_indices(total, cap)
    assert len(indices) == min(total, cap)
    assert indices[0] == 0
    assert indices[-1] == total - 1 or len(indices) == 1
    assert all(b > a for a, b in itertools.pairwise(indices))


# --------------------------------------------------------------------------- hidden states


def test_hidden_states_drop_the_first_token_of_the_planning_prompt(planner):
    instruction = parse_instruction("Turn ###dog.png### into a painting 720P")
    hidden = planner.hidden_states(instruction)

    tokenizer = planner.processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "text", "text": "Turn <IMGPAD> into a painting 720P"}]}]
    text = planner.processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.convert_ids_to_tokens(ids[0, 0].item()) == "<|im_start|>"
    with torch.no_grad():
        direct = planner.model.model(input_ids=ids).last_hidden_state

    hidden_size = planner.model.config.text_config.hidden_size
    assert hidden.shape == (1, ids.shape[1] - 1, hidden_size)
    assert hidden.dtype == torch.float32 and hidden.device.type == "cpu"
    torch.testing.assert_close(hidden, direct[:, 1:, :].float())
    assert not torch.allclose(hidden, direct[:, :-1, :].float())


def test_lora_plans_get_the_rule_planners_media_checks(planner, forced):
    """A medium the LoRA's task leaves without a role is named in the notes, as the rule planner does."""
    forced("<BORES>832,480<EORES><BONF>80<EONF><BOFIDX>0<EOFIDX><CFV>")
    plan = planner.plan(parse_instruction("Animate ###a.png### and ###b.png###"))
    assert plan.task is Task.IMAGE_TO_VIDEO and plan.source == "lora"
    assert [m.role for m in plan.media] == ["frame", "context"]
    assert any("'b.png'" in note and "not used" in note for note in plan.notes)


def test_lora_plan_whose_media_are_missing_falls_back_to_the_rules(planner, forced):
    forced("<BORES>832,480<EORES><REF><CFI>")
    instruction = parse_instruction("a lighthouse on a cliff")
    with pytest.raises(PlannerOutputError) as info:
        planner.plan(instruction)
    assert "reference image" in info.value.reason
    assert info.value.fallback is not None and info.value.fallback.task is Task.TEXT_TO_IMAGE


def test_an_empty_instruction_is_refused_before_the_model_runs(planner):
    from unison_runtime.errors import InstructionError

    with pytest.raises(InstructionError):
        planner.plan(parse_instruction("  "))
