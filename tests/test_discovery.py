"""Finding the model files in ComfyUI-style folders (``--models DIR`` and ComfyUI's folder lists).

Stage-two files are tiny real-format models (recognised from their headers). The stage-one
folders are only marked by their ``config.json`` / ``adapter_config.json``: discovery reads
nothing else from them, and loading them is the planner's business.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from unison_runtime.errors import UnisonError, WeightsError
from unison_runtime.models_dir import find_models, find_models_in, folders_in, list_models
from unison_runtime.testing import tiny_wan_files as tw
from unison_runtime.vace.files import load_vace_from_files


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("models")
    return root, tw.build_tiny_comfy_models_dir(root)


def _copy_tree(root: Path, to: Path) -> Path:
    shutil.copytree(root, to)
    return to


def _write_plain_t2v(vace_file: Path, target: Path) -> dict[str, torch.Tensor]:
    """A plain Wan T2V model (the VACE model without its VACE blocks) at ``target``; returns the VACE state."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(vace_file))
    save_file({k: v for k, v in state.items() if ".vace_" not in k}, str(target))
    return state


def _qwen_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return path


def _lora_dir(path: Path, base: str) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    return path


def test_comfy_layout_is_found_by_content(comfy_models, tmp_path):
    root = _copy_tree(comfy_models[0], tmp_path / "models")
    # Decoys: a plain T2V model, an fp8 copy of the VACE model, and the VACE file under another name.
    full = root / "diffusion_models" / "wan2.1_vace_1.3B_fp16.safetensors"
    from safetensors.torch import save_file

    state = _write_plain_t2v(full, root / "diffusion_models" / "a_wan2.1_t2v_1.3B_fp16.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()},
              str(root / "diffusion_models" / "a_vace_fp8_e4m3fn.safetensors"))
    found = find_models(root, require_generation=True)
    assert found.transformer == full  # the fp16 VACE model, not the T2V one nor the fp8 copy
    assert found.vae == root / "vae" / "wan_2.1_vae.safetensors"
    assert found.text_encoder == root / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    assert found.tokenizer is None  # embedded in the ComfyUI file

    full.rename(root / "diffusion_models" / "renamed.safetensors")
    (root / "diffusion_models" / "a_vace_fp8_e4m3fn.safetensors").unlink()
    assert find_models(root).transformer == root / "diffusion_models" / "renamed.safetensors"


def test_missing_models_name_the_folder_and_the_expected_file(comfy_models, tmp_path):
    root = _copy_tree(comfy_models[0], tmp_path / "models")
    shutil.rmtree(root / "vae")
    with pytest.raises(WeightsError) as info:
        find_models(root, require_generation=True)
    message = str(info.value)
    assert f"no vae found in {root / 'vae'}" in message
    assert "wan_2.1_vae.safetensors" in message and "Wan2.1_VAE.pth" in message
    assert "transformer" not in message.split(";")[0]  # only the missing part is reported
    assert find_models(root).vae is None  # without require_generation it is just absent


def test_only_a_plain_t2v_model_is_reported_as_not_usable(comfy_models, tmp_path):
    root = _copy_tree(comfy_models[0], tmp_path / "models")
    full = root / "diffusion_models" / "wan2.1_vace_1.3B_fp16.safetensors"
    _write_plain_t2v(full, root / "diffusion_models" / "wan2.1_t2v_1.3B_fp16.safetensors")
    full.unlink()
    with pytest.raises(WeightsError) as info:
        find_models(root, require_generation=True)
    message = str(info.value)
    assert f"no transformer found in {root / 'diffusion_models'}" in message
    assert "wan2.1_vace_1.3B_fp16.safetensors" in message  # what is expected
    assert "wan2.1_t2v_1.3B_fp16.safetensors is a plain Wan" in message  # what was there instead


def test_unison_folder_planner_lora_and_projector(tmp_path):
    unison = tmp_path / "models" / "unison"
    base = _qwen_dir(unison / "Qwen2.5-VL-3B-Instruct")
    _qwen_dir(unison / "unison-planner-merged")
    lora = _lora_dir(unison / "Unison" / "planner_lora", "Qwen/Qwen2.5-VL-3B-Instruct")
    (unison / "Unison" / "projector.pth").write_bytes(b"not loaded by discovery")
    found = find_models(tmp_path / "models")
    assert (found.planner_model, found.planner_lora) == (base, lora)
    assert found.projector == unison / "Unison" / "projector.pth"
    assert not found.has_generation()

    shutil.rmtree(unison / "Unison")
    merged_only = find_models(tmp_path / "models")
    assert merged_only.planner_model == unison / "unison-planner-merged" and merged_only.planner_lora is None
    assert merged_only.projector is None


def test_wan_release_folder_with_pth_files(tmp_path):
    release = tmp_path / "models" / "diffusion_models" / "Wan2.1-VACE-1.3B"
    transformer = tw.build_tiny_transformer(tw.tiny_transformer_config(dim=64, heads=2), seed=1)
    tw.write_wan_transformer(transformer, release / "diffusion_pytorch_model.safetensors", wan_config=True)
    tw.write_wan_vae(tw.build_tiny_vae(seed=2), release / "Wan2.1_VAE.pth")
    encoder, tokenizer, _ = tw.build_tiny_umt5(seed=3, d_model=32)
    tw.write_umt5_wan(encoder, tokenizer, release)
    found = find_models(tmp_path / "models", require_generation=True)
    assert found.transformer == release / "diffusion_pytorch_model.safetensors"
    assert found.vae == release / "Wan2.1_VAE.pth"
    assert found.text_encoder == release / "models_t5_umt5-xxl-enc-bf16.pth"
    assert found.tokenizer == release / "google" / "umt5-xxl"
    models = load_vace_from_files(found.transformer, found.vae, found.text_encoder, tokenizer=found.tokenizer,
                                  device="cpu")
    assert models.transformer.config.num_attention_heads == 2  # read from Wan's config.json
    assert models.tokenizer("a fox").input_ids == tokenizer("a fox").input_ids


def test_comfyui_folder_lists_and_legacy_names(comfy_models, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(comfy_models[0] / "diffusion_models", root / "unet")  # ComfyUI's legacy name
    shutil.copytree(comfy_models[0] / "text_encoders", root / "clip")
    shutil.copytree(comfy_models[0] / "vae", tmp_path / "elsewhere" / "vae")
    folders = folders_in(root)
    assert folders["diffusion_models"] == [root / "unet"] and folders["text_encoders"] == [root / "clip"]
    # As ComfyUI's folder_paths would give them: several folders per kind, one outside models/.
    folders["vae"] = [root / "vae", tmp_path / "elsewhere" / "vae"]
    found = find_models_in(folders, require_generation=True)
    assert found.vae == tmp_path / "elsewhere" / "vae" / "wan_2.1_vae.safetensors"
    assert found.transformer.parent == root / "unet"
    names = [f.path.name for f in list_models("diffusion_models", folders["diffusion_models"])]
    assert names == ["wan2.1_vace_1.3B_fp16.safetensors"]
    assert [f.kind for f in list_models("text_encoders", folders["text_encoders"])] == ["umt5"]
    assert list_models("vae", folders["diffusion_models"]) == []


def test_explicit_paths_win_and_must_exist(comfy_models, tmp_path):
    root = comfy_models[0]
    other = tw.write_wan_vae(tw.build_tiny_vae(seed=9), tmp_path / "my_vae.pth")
    found = find_models(root, explicit={"vae": other, "projector": None})
    assert found.vae == other and found.transformer is not None
    with pytest.raises(WeightsError, match=r"vae .*nope\.safetensors does not exist"):
        find_models(root, explicit={"vae": tmp_path / "nope.safetensors"})


def test_models_dir_must_exist(tmp_path):
    with pytest.raises(WeightsError, match=r"models folder .*missing does not exist"):
        find_models(tmp_path / "missing")


# --------------------------------------------------------------------------- download layout


def test_download_dry_run_prints_the_plan_without_the_hub(tmp_path, monkeypatch):
    import sys

    from unison_runtime.download import download_all

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # any import would now fail
    monkeypatch.delenv("UNISON_REPO_ID", raising=False)
    lines = list(download_all(tmp_path / "models", dry_run=True))
    assert len(lines) == 6 and all(line.startswith("would fetch") for line in lines)
    text = "\n".join(lines)
    models = tmp_path / "models"
    assert f"-> {models / 'diffusion_models' / 'wan2.1_vace_1.3B_fp16.safetensors'}" in text
    assert "Comfy-Org/Wan_2.1_ComfyUI_repackaged/split_files/vae/wan_2.1_vae.safetensors" in text
    assert f"-> {models / 'text_encoders' / 'umt5_xxl_fp8_e4m3fn_scaled.safetensors'}" in text
    assert f"Qwen/Qwen2.5-VL-3B-Instruct (whole repository) -> {models / 'unison' / 'Qwen2.5-VL-3B-Instruct'}" in text
    assert f"ali-vilab/Unison (its lora) -> {models / 'unison' / 'unison-lora'}" in text
    assert f"ali-vilab/Unison (its projector) -> {models / 'unison' / 'projector.pth'}" in text
    assert "not confirmed; set UNISON_REPO_ID" in text
    assert not models.exists()  # a dry run writes nothing


def test_download_lands_where_discovery_looks(comfy_models, tmp_path, monkeypatch):
    import sys
    import types

    from unison_runtime.download import download_all

    tiny = {  # what the hub would serve, as tiny files in the real formats
        "split_files/diffusion_models/wan2.1_vace_1.3B_fp16.safetensors":
            comfy_models[1]["transformer"],
        "split_files/vae/wan_2.1_vae.safetensors": comfy_models[1]["vae"],
        "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors": comfy_models[1]["text_encoder"],
    }
    calls = []

    def hf_hub_download(repo_id, filename, *, local_dir):
        calls.append((repo_id, filename))
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny[filename], out)
        return str(out)

    def snapshot_download(repo_id, *, local_dir):
        calls.append((repo_id, None))
        if repo_id.startswith("Qwen/"):
            _qwen_dir(Path(local_dir))
        else:
            _lora_dir(Path(local_dir) / "lora", "Qwen/Qwen2.5-VL-3B-Instruct")
            (Path(local_dir) / "projector.pth").write_bytes(b"x")
        return local_dir

    fake = types.SimpleNamespace(hf_hub_download=hf_hub_download, snapshot_download=snapshot_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    monkeypatch.setenv("UNISON_REPO_ID", "someone/unison-release")
    models = tmp_path / "models"
    lines = list(download_all(models))
    assert ("someone/unison-release", None) in calls and len(calls) == 5
    assert not (models / ".unison-download").exists()  # staging cleaned up
    found = find_models(models, require_generation=True)
    assert found.transformer == models / "diffusion_models" / "wan2.1_vace_1.3B_fp16.safetensors"
    assert found.vae == models / "vae" / "wan_2.1_vae.safetensors"
    assert found.text_encoder == models / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    assert found.planner_model == models / "unison" / "Qwen2.5-VL-3B-Instruct"
    assert found.planner_lora == models / "unison" / "unison-lora"
    assert found.projector == models / "unison" / "projector.pth"
    assert sum(line.startswith("done") for line in lines) == 6
    # A second run finds everything in place and fetches nothing.
    calls.clear()
    assert all(line.startswith("present") for line in download_all(models))
    assert calls == []


def _fake_unison_release(monkeypatch, fill) -> list[str]:
    """A hub that serves only the Unison repository, laid out by ``fill(folder)``; returns the repos asked for."""
    import sys
    import types

    calls: list[str] = []

    def snapshot_download(repo_id, *, local_dir):
        calls.append(repo_id)
        fill(Path(local_dir))
        return local_dir

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    return calls


def _only_unison_rows(monkeypatch):
    from unison_runtime import download

    monkeypatch.setattr(download, "DOWNLOADS", tuple(r for r in download.DOWNLOADS if r.pick is not None))


def test_download_writes_the_names_the_shipped_workflows_choose():
    from unison_runtime.download import DOWNLOADS

    folders = {  # loader type -> the models/ sub-folder of each model widget, in widget order
        "UnisonPlannerLoader": ("unison", "unison"),
        "UnisonProjectorLoader": ("unison",),
        "UnisonVaceLoader": ("diffusion_models", "vae", "text_encoders"),
        "UNETLoader": ("diffusion_models",),
        "CLIPLoader": ("text_encoders",),
        "VAELoader": ("vae",),
    }
    chosen = set()
    for workflow in sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json")):
        for node in json.loads(workflow.read_text(encoding="utf-8"))["nodes"]:
            for folder, value in zip(folders.get(node["type"], ()), node["widgets_values"], strict=False):
                chosen.add(f"{folder}/{value}")
    assert chosen == {row.destination for row in DOWNLOADS}  # every choice is fetched, and nothing else


def test_download_takes_lora_and_projector_from_any_release_layout(tmp_path, monkeypatch):
    from unison_runtime.download import download_all

    def release_at_top_level(folder: Path) -> None:  # adapter files at the top, projector in a sub-folder
        _lora_dir(folder, "Qwen/Qwen2.5-VL-3B-Instruct")
        (folder / "adapter_model.safetensors").write_bytes(b"adapter")
        (folder / "weights").mkdir()
        (folder / "weights" / "unison_projector.pt").write_bytes(b"projector")
        (folder / ".cache" / "huggingface").mkdir(parents=True)  # the hub's own bookkeeping

    calls = _fake_unison_release(monkeypatch, release_at_top_level)
    _only_unison_rows(monkeypatch)
    models = tmp_path / "models"
    lines = list(download_all(models))
    assert calls == ["ali-vilab/Unison"]  # one fetch serves both rows
    assert [line.split()[0] for line in lines] == ["fetching", "done", "fetching", "done"]
    assert (models / "unison" / "projector.pth").read_bytes() == b"projector"
    assert (models / "unison" / "unison-lora" / "adapter_model.safetensors").read_bytes() == b"adapter"
    assert not list((models / "unison" / "unison-lora").rglob("*projector*"))
    found = find_models(models)
    assert found.planner_lora == models / "unison" / "unison-lora"
    assert found.projector == models / "unison" / "projector.pth"


def test_download_refuses_a_release_it_cannot_read_unambiguously(tmp_path, monkeypatch):
    from unison_runtime.download import download_all

    def two_adapters(folder: Path) -> None:
        _lora_dir(folder / "lora_a", "Qwen/Qwen2.5-VL-3B-Instruct")
        _lora_dir(folder / "lora_b", "Qwen/Qwen2.5-VL-3B-Instruct")
        (folder / "projector.pth").write_bytes(b"projector")

    _fake_unison_release(monkeypatch, two_adapters)
    _only_unison_rows(monkeypatch)
    with pytest.raises(UnisonError) as info:
        list(download_all(tmp_path / "models"))
    message = str(info.value)
    assert "ali-vilab/Unison (its lora)" in message and "adapter_config.json" in message
    assert "'lora_a', 'lora_b'" in message and "models/unison/unison-lora" in message
