"""UnisonPipeline and ``python -m unison_runtime run`` end to end on tiny random models of every kind."""

from __future__ import annotations

import io
import json
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tests.harness.counting import CountingLoader
from unison_runtime.__main__ import main
from unison_runtime.errors import PathError, WeightsError
from unison_runtime.media import Medium
from unison_runtime.pipeline import UnisonPipeline, locate_models
from unison_runtime.planner.rules import RulePlanner
from unison_runtime.projector import load_projector, project
from unison_runtime.testing.tiny_projector import build_tiny_projector
from unison_runtime.testing.tiny_qwen import TEXT_HIDDEN, build_tiny_qwen, build_tiny_unison_lora
from unison_runtime.testing.tiny_wan import TINY_VACE, build_tiny_vace_diffusers
from unison_runtime.vace.loading import load_vace_diffusers
from unison_runtime.vace.sampler import SamplingOptions, sample
from unison_runtime.vace.sources import prepare_vace_inputs
from unison_runtime.vace.text import text_contexts

T2I = "Create an image of a red car parked on a street at night, 32x32"
VACE = "diffusion_models/Wan2.1-VACE-1.3B-diffusers"
T2V = "Create a video of a lion walking around in its habitat, 32x32, 4 frames"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A --models folder: diffusion_models/<diffusers VACE folder> and unison/ (Qwen base, LoRA, projector)."""
    root = tmp_path_factory.mktemp("models")
    build_tiny_vace_diffusers(root / VACE)
    qwen = build_tiny_qwen(root / "unison" / "Qwen2.5-VL-3B-Instruct")
    build_tiny_unison_lora(qwen, root / "unison" / "unison-lora")
    build_tiny_projector(root / "unison" / "projector.pth", input_dim=TEXT_HIDDEN, t5_dim=TINY_VACE.text_dim)
    return root


@pytest.fixture(scope="module")
def stage_one(models_dir):
    from unison_runtime.planner.qwen import load_planner

    return load_planner(models_dir / "unison/Qwen2.5-VL-3B-Instruct", models_dir / "unison/unison-lora",
                        device="cpu")


def make_pipeline(models_dir, stage_one=None, projector=True, **kwargs):
    vace = CountingLoader(lambda: load_vace_diffusers(models_dir / VACE, device="cpu"))
    proj = CountingLoader(lambda: load_projector(models_dir / "unison/projector.pth")) if projector else None
    pipeline = UnisonPipeline(planner=RulePlanner(), stage_one=stage_one, projector=proj, vace=vace,
                              options=SamplingOptions(steps=2), **kwargs)
    return pipeline, vace, proj


def capture_contexts(transformer):
    seen: list[torch.Tensor] = []
    handle = transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].detach().clone()), with_kwargs=True
    )
    return seen, handle


def test_text_to_image_end_to_end_with_projector_tokens(models_dir, stage_one):
    pipeline, vace, _ = make_pipeline(models_dir, stage_one)
    instruction, _ = pipeline.read(T2I)
    models = pipeline.vace
    seen, handle = capture_contexts(models.transformer)
    try:
        result = pipeline.run(T2I)
    finally:
        handle.remove()
    assert result.plan.task.value == "text_to_image" and result.output == "image"
    assert result.frames.shape == (1, 32, 32, 3) and result.frames.dtype == torch.float32
    assert result.answer is None and result.fps == 24

    # Independent: stage one's hidden states through the projector land right after the umT5 tokens.
    tokens = project(load_projector(models_dir / "unison/projector.pth"), stage_one.hidden_states(instruction))
    expected = text_contexts(models, result.plan.prompt, tokens)
    cond = seen[0][:1]
    assert cond.shape == (1, 2048, TINY_VACE.text_dim)
    length = expected.text_tokens
    torch.testing.assert_close(cond[:, length : length + 4], tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond, expected.cond)
    torch.testing.assert_close(seen[0][1:], expected.neg)  # batched guidance: negative second
    assert vace.calls == 1


def test_text_to_video_end_to_end_equals_the_engine_called_by_hand(models_dir):
    pipeline, _, _ = make_pipeline(models_dir, projector=False)
    result = pipeline.run(T2V)
    plan = result.plan
    assert plan.task.value == "text_to_video" and (plan.width, plan.height, plan.num_frames) == (32, 32, 5)
    assert result.frames.shape == (5, 32, 32, 3) and result.fps == 24
    assert any("umT5 embedding alone" in note for note in result.notes)

    models = pipeline.vace
    contexts = text_contexts(models, plan.prompt)
    by_hand = sample(models, plan, prepare_vace_inputs(plan, []), contexts.cond, contexts.neg,
                     SamplingOptions(steps=2))
    assert torch.equal(result.frames, by_hand.frames)


def test_models_load_lazily_stay_cached_and_reload_after_release(models_dir, stage_one):
    pipeline, vace, proj = make_pipeline(models_dir, stage_one)
    assert vace.calls == proj.calls == 0
    pipeline.run(T2I)
    pipeline.run(T2I, options=SamplingOptions(steps=1, seed=3))
    assert vace.calls == proj.calls == 1
    assert set(pipeline.loaded()) >= {"vace", "projector", "stage_one", "planner"}
    models = pipeline.vace
    pipeline.release()
    assert pipeline.loaded() == []
    assert models.transformer is None  # loaded by the pipeline, so released by it
    assert stage_one.loaded  # passed in loaded: the caller's, left alone
    pipeline.run(T2I)
    assert vace.calls == proj.calls == 2


def test_text_encoder_released_before_sampling_gives_the_same_frames(models_dir):
    keeping, _, _ = make_pipeline(models_dir, projector=False)
    releasing, vace, _ = make_pipeline(models_dir, projector=False, release_text_encoder=True)
    seen: list[object] = []
    first = releasing.run(T2V)
    models = releasing.vace
    assert models.text_encoder is None and models.text_encoder_released  # dropped before sampling
    assert models.transformer is not None and models.origin["text_encoder"] == "released after encoding"
    assert torch.equal(first.frames, keeping.run(T2V).frames)
    seen.append(models)
    second = releasing.run(T2V)  # a new prompt to encode: the VACE models are loaded again
    assert vace.calls == 2 and releasing.vace is not seen[0]
    assert torch.equal(second.frames, first.frames)


def test_released_text_encoder_of_models_passed_in_is_a_clear_error(models_dir):
    from unison_runtime.errors import UnisonError

    models = load_vace_diffusers(models_dir / VACE, device="cpu")
    pipeline = UnisonPipeline(vace=models, options=SamplingOptions(steps=1))
    pipeline.run(T2V)
    pipeline.release_text_encoder()
    assert models.text_encoder is None
    with pytest.raises(UnisonError, match="umT5 text encoder was released"):
        pipeline.run(T2V)


def test_understanding_with_stage_one_and_with_rules_only(models_dir, stage_one):
    pipeline, vace, _ = make_pipeline(models_dir, stage_one)
    result = pipeline.run("What is the capital of France?")
    assert result.plan.task.value == "text_understanding" and result.output == "text"
    assert isinstance(result.answer, str) and result.plan.answer == result.answer
    assert result.frames is None and vace.calls == 0  # understanding never loads stage two

    rules_only, _, _ = make_pipeline(models_dir, projector=False)
    result = rules_only.run("What is the capital of France?")
    assert result.answer is None and any("Qwen2.5-VL" in note for note in result.notes)


def test_read_uses_given_media_and_refuses_missing_ones(models_dir, tmp_path):
    pipeline, _, _ = make_pipeline(models_dir, projector=False, roots=[tmp_path])
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "cat.png")
    given = Medium(name="dog.png", kind="image", frames=np.zeros((1, 4, 4, 3), np.uint8))
    _, media = pipeline.read("Compare ###cat.png### and ###dog.png###", {"dog.png": given})
    assert [m.name for m in media] == ["cat.png", "dog.png"]
    assert media[0].frames.shape == (1, 8, 8, 3) and int(media[0].frames[0, 0, 0, 0]) == 200
    assert media[1] is given
    with pytest.raises(PathError, match=r"missing\.png"):
        pipeline.read("Describe ###missing.png###")


def test_locate_models_finds_the_documented_layout(models_dir, tmp_path):
    found = locate_models(models_dir)
    assert found.vace == str(models_dir / VACE)
    assert found.load_vace.func is load_vace_diffusers
    assert found.qwen == models_dir / "unison/Qwen2.5-VL-3B-Instruct"
    assert found.lora == models_dir / "unison/unison-lora"
    assert found.projector == models_dir / "unison/projector.pth"
    empty = locate_models(tmp_path)
    assert empty.load_vace is None and empty.qwen is None and empty.projector is None
    with pytest.raises(WeightsError, match="no transformer found"):
        empty.paths.require_generation()
    with pytest.raises(WeightsError, match="does not exist"):
        locate_models(tmp_path / "nowhere")


def run_cli(*argv: str) -> tuple[int, dict | None]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, json.loads(out.getvalue()) if out.getvalue() else None


@pytest.fixture(scope="module")
def generation_dir(models_dir, tmp_path_factory):
    """A --models folder with stage two and the projector but no stage one: the rule planner plans."""
    root = tmp_path_factory.mktemp("generation_models")
    shutil.copytree(models_dir / VACE, root / VACE)
    (root / "unison").mkdir()
    shutil.copy(models_dir / "unison/projector.pth", root / "unison/projector.pth")
    return root


def test_cli_run_writes_png_and_mp4(generation_dir, tmp_path):
    code, report = run_cli("run", T2I, "--models", str(generation_dir), "--out", str(tmp_path / "car.whatever"),
                           "--steps", "2", "--input-dir", str(tmp_path), "--device", "cpu")
    assert code == 0 and report["task"] == "text_to_image" and report["plan"]["source"] == "rules"
    assert report["path"] == str(tmp_path / "car.png")
    assert any("no stage-one model" in note for note in report["notes"])
    with Image.open(tmp_path / "car.png") as image:
        assert image.size == (32, 32)

    code, report = run_cli("run", T2V, "--models", str(generation_dir), "--out", str(tmp_path / "lion"),
                           "--steps", "2", "--seed", "3", "--input-dir", str(tmp_path), "--device", "cpu")
    assert code == 0 and report["path"] == str(tmp_path / "lion.mp4") and report["fps"] == 24
    with av.open(report["path"]) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert (stream.width, stream.height, len(frames)) == (32, 32, 5)
        assert float(stream.average_rate) == 24


def test_cli_run_low_memory_options_give_the_same_image(generation_dir, tmp_path):
    args = ("run", T2I, "--models", str(generation_dir), "--steps", "2", "--seed", "5", "--input-dir", str(tmp_path),
            "--device", "cpu")
    code, plain = run_cli(*args, "--out", str(tmp_path / "plain"))
    assert code == 0 and plain["path"].endswith(".png")
    code, low = run_cli(*args, "--out", str(tmp_path / "low"), "--low-memory", "--text-device", "cpu",
                        "--vace-dtype", "fp32")
    assert code == 0
    with Image.open(plain["path"]) as a, Image.open(low["path"]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(SystemExit):
        run_cli(*args, "--out", str(tmp_path / "x"), "--vace-dtype", "fp4")


def test_planner_released_before_sampling_gives_the_same_frames(models_dir):
    from unison_runtime.planner.qwen import load_planner

    def pipeline(**kwargs):
        stage_one = CountingLoader(lambda: load_planner(models_dir / "unison/Qwen2.5-VL-3B-Instruct",
                                                        models_dir / "unison/unison-lora", device="cpu"))
        made, _, _ = make_pipeline(models_dir, **kwargs)
        made._sources["stage_one"] = stage_one
        return made, stage_one

    keeping, _ = pipeline()
    releasing, stage_one = pipeline(release_planner=True)
    expected = keeping.run(T2I).frames
    assert torch.equal(releasing.run(T2I).frames, expected)
    assert "stage_one" not in releasing.loaded() and "vace" in releasing.loaded()
    assert torch.equal(releasing.run(T2I).frames, expected) and stage_one.calls == 2  # loaded again when needed


def test_cli_run_understanding_writes_txt_and_needs_stage_one(models_dir, generation_dir, tmp_path, capsys):
    base = models_dir / "unison/Qwen2.5-VL-3B-Instruct"  # no LoRA: the rule planner plans, the base answers
    code, report = run_cli("run", "What is the capital of France?", "--models", str(generation_dir),
                           "--model", str(base), "--out", str(tmp_path / "answer"), "--input-dir", str(tmp_path),
                           "--device", "cpu")
    assert code == 0 and report["output"] == "text" and report["task"] == "text_understanding"
    assert (tmp_path / "answer.txt").read_text(encoding="utf-8") == report["answer"] + "\n"

    code, _ = run_cli("run", "What is the capital of France?", "--models", str(generation_dir), "--out",
                      str(tmp_path / "a2"), "--input-dir", str(tmp_path))
    assert code == 2 and "needs the Qwen2.5-VL stage one" in capsys.readouterr().err
    code, _ = run_cli("run", T2I, "--models", str(tmp_path), "--out", str(tmp_path / "x"), "--input-dir", str(tmp_path))
    assert code == 2 and "no transformer found" in capsys.readouterr().err


def test_cli_run_with_comfyui_single_files(tmp_path):
    """Stage two from Comfy-Org-style single files (fp16 transformer, VAE, fp8 umT5), found by content."""
    from unison_runtime.testing.tiny_wan_files import build_tiny_comfy_models_dir

    build_tiny_comfy_models_dir(tmp_path / "models")
    found = locate_models(tmp_path / "models")
    assert found.load_vace is not None and "wan2.1_vace_1.3B_fp16.safetensors" in found.vace
    code, report = run_cli("run", T2I, "--models", str(tmp_path / "models"), "--out", str(tmp_path / "car"),
                           "--steps", "2", "--input-dir", str(tmp_path), "--device", "cpu")
    assert code == 0 and report["path"] == str(tmp_path / "car.png")
    with Image.open(tmp_path / "car.png") as image:
        assert image.size == (32, 32)
