"""Weights are untrusted (issue 8, item 3): every loader, fed hostile and broken files for real.

For each way the pack reads weights (projector, Wan VAE ``.pth``/``.safetensors``, umT5 ``.pth`` /
ComfyUI file / transformers folder, VACE transformer files, the diffusers VACE folder, the
Qwen2.5-VL folder and the LoRA folder):

* a pickle that would create a marker file if it ran is refused, and the marker never appears;
* a truncated file is a :class:`WeightsError` naming the file;
* a file of the wrong kind is a :class:`WeightsError` naming the file and what was expected;

and a scan of the sources proves the two rules these rest on: ``trust_remote_code`` is never
turned on, and every ``torch.load`` passes ``weights_only=True``.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from unison_runtime.errors import WeightsError
from unison_runtime.planner.qwen import load_planner
from unison_runtime.projector import convert_projector, load_projector
from unison_runtime.testing import tiny_wan_files as tw
from unison_runtime.testing.tiny_projector import build_tiny_projector
from unison_runtime.testing.tiny_qwen import build_tiny_qwen, build_tiny_unison_lora
from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers
from unison_runtime.vace.files import (
    inspect_file,
    load_text_encoder,
    load_transformer_file,
    load_vace_from_files,
    load_vae_file,
)
from unison_runtime.vace.loading import load_vace_diffusers

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("unison_runtime", "nodes")


# --------------------------------------------------------------------------- hostile pickles


class _RunsShell:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _RunsPython:
    """Unpickling this runs Python code that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def write_malicious(path: Path, marker: Path, style: str) -> Path:
    """A checkpoint that looks like a state dict and carries a payload; ``style`` picks format and payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if style == "torch.save+shell":
        torch.save({"weight": torch.zeros(2), "payload": _RunsShell(marker)}, path)
    else:  # a bare pickle (legacy format) running Python
        with open(path, "wb") as handle:
            pickle.dump({"weight": torch.zeros(2), "payload": _RunsPython(marker)}, handle, protocol=2)
    return path


STYLES = ["torch.save+shell", "pickle+python"]


@pytest.mark.parametrize("style", STYLES)
def test_the_payloads_are_live(tmp_path, style):
    """Guard: an unrestricted unpickler does run them, so the refusals below mean something."""
    marker = tmp_path / "marker"
    path = write_malicious(tmp_path / "evil.pth", marker, style)
    if style == "torch.save+shell":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)  # deliberately unsafe, to prove the payload works
    assert marker.exists()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny Qwen2.5-VL base folder and its Unison LoRA folder, in the released layouts."""
    root = tmp_path_factory.mktemp("qwen")
    base = build_tiny_qwen(root / "Qwen2.5-VL-3B-Instruct")
    return base, build_tiny_unison_lora(base, root / "unison-lora")


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory):
    """Real-format tiny Wan files: transformer, VAE (.safetensors and .pth), umT5 (ComfyUI file, Wan .pth, folder)."""
    root = tmp_path_factory.mktemp("wan")
    encoder, tokenizer, proto = tw.build_tiny_umt5(2, d_model=32)
    vae = tw.build_tiny_vae(1)
    folder = root / "umt5-xxl"
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {
        "transformer": tw.write_wan_transformer(tw.build_tiny_transformer(tw.tiny_transformer_config(text_dim=32)),
                                                root / "wan2.1_vace_1.3B_fp16.safetensors", layout="comfy",
                                                precision="fp16"),
        "vae": tw.write_wan_vae(vae, root / "wan_2.1_vae.safetensors"),
        "vae_pth": tw.write_wan_vae(vae, root / "Wan2.1_VAE.pth"),
        "umt5": tw.write_umt5_comfy(encoder, proto, root / "umt5_xxl_fp16.safetensors"),
        "umt5_pth": tw.write_umt5_wan(encoder, tokenizer, root / "wan-t5"),
        "umt5_dir": folder,
    }


@pytest.fixture(scope="module")
def vace_dir(tmp_path_factory):
    return build_tiny_vace_diffusers(tmp_path_factory.mktemp("vace") / "Wan2.1-VACE-1.3B-diffusers")


def _copy(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))


def _evil_lora(qwen, tmp: Path, marker: Path, style: str) -> Path:
    lora = _copy(qwen[1], tmp / "evil-lora")
    (lora / "adapter_model.safetensors").unlink()
    write_malicious(lora / "adapter_model.bin", marker, style)
    return lora


def _evil_qwen_dir(qwen, tmp: Path, marker: Path, style: str) -> Path:
    base = _copy(qwen[0], tmp / "evil-qwen")
    for path in base.glob("*.safetensors*"):
        path.unlink()
    write_malicious(base / "pytorch_model.bin", marker, style)
    return base


def _evil_diffusers_dir(vace_dir, tmp: Path, marker: Path, style: str) -> Path:
    folder = _copy(vace_dir, tmp / "evil-vace")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    write_malicious(folder / "transformer" / "diffusion_pytorch_model.bin", marker, style)
    return folder


def _evil_umt5_dir(wan_files, tmp: Path, marker: Path, style: str) -> Path:
    folder = _copy(wan_files["umt5_dir"], tmp / "evil-umt5")
    (folder / "model.safetensors").unlink()
    write_malicious(folder / "pytorch_model.bin", marker, style)
    return folder


# name -> (make the hostile input, load it); the loader must raise WeightsError naming ``named``.
HOSTILE: dict[str, Callable] = {
    "projector .pth": lambda ctx, p: load_projector(p(ctx.tmp / "projector.pth")),
    "projector conversion": lambda ctx, p: convert_projector(p(ctx.tmp / "projector.pth"),
                                                             ctx.tmp / "out.safetensors"),
    "Wan VAE .pth": lambda ctx, p: load_vae_file(p(ctx.tmp / "Wan2.1_VAE.pth")),
    "umT5 Wan .pth": lambda ctx, p: load_text_encoder(p(ctx.tmp / "models_t5_umt5-xxl-enc-bf16.pth")),
    "VACE transformer .pth": lambda ctx, p: load_transformer_file(p(ctx.tmp / "diffusion_pytorch_model.pth")),
    "inspect_file": lambda ctx, p: inspect_file(p(ctx.tmp / "unknown.ckpt")),
    "all three single files": lambda ctx, p: load_vace_from_files(
        p(ctx.tmp / "transformer.pt"), ctx.wan["vae"], ctx.wan["umt5"], device="cpu"),
    "LoRA adapter_model.bin": lambda ctx, p: load_planner(
        ctx.qwen[0], lora=_evil_lora(ctx.qwen, ctx.tmp, ctx.marker, ctx.style), device="cpu"),
    "Qwen folder with pytorch_model.bin": lambda ctx, p: load_planner(
        _evil_qwen_dir(ctx.qwen, ctx.tmp, ctx.marker, ctx.style), device="cpu"),
    "diffusers VACE folder with .bin": lambda ctx, p: load_vace_diffusers(
        _evil_diffusers_dir(ctx.vace, ctx.tmp, ctx.marker, ctx.style), device="cpu"),
    "umT5 transformers folder with pytorch_model.bin": lambda ctx, p: load_text_encoder(
        _evil_umt5_dir(ctx.wan, ctx.tmp, ctx.marker, ctx.style)),
}


class Context:
    def __init__(self, tmp, marker, style, qwen, wan, vace):
        self.tmp, self.marker, self.style, self.qwen, self.wan, self.vace = tmp, marker, style, qwen, wan, vace


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("loader", list(HOSTILE))
def test_a_malicious_pickle_never_runs_in_any_loader(loader, style, tmp_path, qwen, wan_files, vace_dir):
    marker = tmp_path / "marker"
    ctx = Context(tmp_path, marker, style, qwen, wan_files, vace_dir)
    written: list[Path] = []

    def plant(path: Path) -> Path:
        written.append(write_malicious(path, marker, style))
        return path

    try:
        HOSTILE[loader](ctx, plant)
    except Exception as exc:  # whatever the type, what matters first is that nothing ran
        error = exc
    else:
        error = None
    assert not marker.exists(), f"{loader}: the pickle's code ran"
    assert not (tmp_path / "out.safetensors").exists()
    assert isinstance(error, WeightsError), f"{loader}: {type(error).__name__}: {error}"
    named = written[0].name if written else ("adapter_model" if "LoRA" in loader else tmp_path.name)
    assert named in str(error)


def test_a_pickle_next_to_safetensors_is_never_opened(qwen, tmp_path):
    """A Qwen folder may carry both formats: the safetensors are read, the pickle is not even opened."""
    marker = tmp_path / "marker"
    base = _copy(qwen[0], tmp_path / "both")
    write_malicious(base / "pytorch_model.bin", marker, "torch.save+shell")
    planner = load_planner(base, device="cpu")
    assert planner.loaded and not marker.exists()


def test_remote_code_in_model_folders_is_never_imported(qwen, wan_files, tmp_path):
    """Folders whose configs point ``auto_map`` at a module of their own: the module is never imported."""
    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'w').write('imported')\n"
    auto_map = {"AutoConfig": "remote.Config", "AutoModel": "remote.Model", "AutoProcessor": "remote.Processor",
                "AutoImageProcessor": "remote.ImageProcessor", "AutoTokenizer": ["remote.Tokenizer", None]}
    folders = [_copy(qwen[0], tmp_path / "qwen"), _copy(wan_files["umt5_dir"], tmp_path / "umt5")]
    for folder in folders:
        (folder / "remote.py").write_text(code)
        for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
            if (folder / name).is_file():
                data = json.loads((folder / name).read_text())
                data["auto_map"] = auto_map
                (folder / name).write_text(json.dumps(data))
    load_planner(folders[0], device="cpu")
    load_text_encoder(folders[1])
    assert not marker.exists()


# --------------------------------------------------------------------------- truncated files


def _truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: len(data) // 2])
    return target


def _truncate_in_copy(folder: Path, tmp: Path, relative: str) -> tuple[Path, Path]:
    copy = _copy(folder, tmp / folder.name)
    target = copy / relative
    _truncated(target, target)
    return copy, target


@pytest.mark.parametrize("case", ["projector .pth", "projector .safetensors", "Wan VAE .safetensors",
                                  "Wan VAE .pth", "umT5 ComfyUI file", "umT5 Wan .pth", "VACE transformer",
                                  "Qwen model.safetensors", "LoRA adapter", "diffusers transformer",
                                  "diffusers VAE", "diffusers text encoder"])
def test_a_truncated_file_is_named(case, tmp_path, qwen, wan_files, vace_dir):
    if case.startswith("projector"):
        source = build_tiny_projector(tmp_path / f"full{case.split()[-1]}")
        path = _truncated(source, tmp_path / f"projector{case.split()[-1]}")
        load = lambda: load_projector(path)  # noqa: E731
    elif case == "Wan VAE .safetensors":
        path = _truncated(wan_files["vae"], tmp_path / "wan_2.1_vae.safetensors")
        load = lambda: load_vae_file(path)  # noqa: E731
    elif case == "Wan VAE .pth":
        path = _truncated(wan_files["vae_pth"], tmp_path / "Wan2.1_VAE.pth")
        load = lambda: load_vae_file(path)  # noqa: E731
    elif case == "umT5 ComfyUI file":
        path = _truncated(wan_files["umt5"], tmp_path / "umt5_xxl_fp16.safetensors")
        load = lambda: load_text_encoder(path)  # noqa: E731
    elif case == "umT5 Wan .pth":
        folder, path = _truncate_in_copy(wan_files["umt5_pth"].parent, tmp_path, wan_files["umt5_pth"].name)
        load = lambda: load_text_encoder(path)  # noqa: E731
    elif case == "VACE transformer":
        path = _truncated(wan_files["transformer"], tmp_path / "wan2.1_vace_1.3B_fp16.safetensors")
        load = lambda: load_transformer_file(path)  # noqa: E731
    elif case == "Qwen model.safetensors":
        folder, path = _truncate_in_copy(qwen[0], tmp_path, "model.safetensors")
        load = lambda: load_planner(folder, device="cpu")  # noqa: E731
    elif case == "LoRA adapter":
        folder, path = _truncate_in_copy(qwen[1], tmp_path, "adapter_model.safetensors")
        load = lambda: load_planner(qwen[0], lora=folder, device="cpu")  # noqa: E731
    else:
        part = {"diffusers transformer": "transformer/diffusion_pytorch_model.safetensors",
                "diffusers VAE": "vae/diffusion_pytorch_model.safetensors",
                "diffusers text encoder": "text_encoder/model.safetensors"}[case]
        folder, path = _truncate_in_copy(vace_dir, tmp_path, part)
        load = lambda: load_vace_diffusers(folder, device="cpu")  # noqa: E731
    try:
        load()
    except Exception as exc:
        error = exc
    else:
        raise AssertionError(f"{case}: a truncated file loaded")
    assert isinstance(error, WeightsError), f"{case}: {type(error).__name__}: {error}"
    message = str(error)
    assert str(path) in message
    assert any(word in message for word in ("truncated", "corrupt", "Unable to load")), message


# --------------------------------------------------------------------------- files of the wrong kind


def test_files_of_the_wrong_kind_name_the_file_and_what_was_expected(wan_files, tmp_path):
    vae, transformer, umt5 = wan_files["vae"], wan_files["transformer"], wan_files["umt5"]
    cases = [
        (lambda: load_vae_file(transformer), transformer, "expected the Wan 2.1 VAE"),
        (lambda: load_transformer_file(vae), vae, "expected a Wan2.1-VACE transformer"),
        (lambda: load_text_encoder(vae), vae, "expected the umT5-XXL text encoder"),
        (lambda: load_projector(wan_files["vae_pth"]), wan_files["vae_pth"], "not a Unison projector"),
        (lambda: load_vace_from_files(umt5, vae, umt5, device="cpu"), umt5, "expected a Wan2.1-VACE transformer"),
    ]
    for load, path, expected in cases:
        with pytest.raises(WeightsError) as info:
            load()
        assert str(path) in str(info.value) and expected in str(info.value)
    # A transformers folder of another model kind.
    t5 = _copy(wan_files["umt5_dir"], tmp_path / "t5-xxl")
    config = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(WeightsError, match=r"t5-xxl: config.json says model_type 't5'; expected 'umt5'"):
        load_text_encoder(t5)


def test_qwen_and_lora_folders_of_the_wrong_kind(qwen, tmp_path):
    base, lora = qwen
    other = _copy(base, tmp_path / "llama")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(WeightsError, match=r"llama/config.json says model_type 'llama'; expected 'qwen2_5_vl'"):
        load_planner(other, device="cpu")

    prefix = _copy(lora, tmp_path / "prefix-tuning")
    adapter = json.loads((prefix / "adapter_config.json").read_text())
    (prefix / "adapter_config.json").write_text(json.dumps({**adapter, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(WeightsError, match=r"prefix-tuning/adapter_config.json has peft_type 'PREFIX_TUNING'; "
                                           "expected 'LORA'"):
        load_planner(base, lora=prefix, device="cpu")

    from safetensors.torch import load_file, save_file

    odd = _copy(lora, tmp_path / "odd-lora")
    state = load_file(odd / "adapter_model.safetensors")
    save_file({k.replace("layers.1.", "layers.9."): v.contiguous() for k, v in state.items()},
              odd / "adapter_model.safetensors")
    with pytest.raises(WeightsError, match=r"odd-lora/adapter_model.safetensors does not fit .*layers\.9\."):
        load_planner(base, lora=odd, device="cpu")


def test_a_diffusers_folder_with_the_wrong_model_in_a_part_is_named(vace_dir, tmp_path):
    folder = _copy(vace_dir, tmp_path / "swapped")
    shutil.rmtree(folder / "transformer")
    shutil.copytree(folder / "vae", folder / "transformer")  # a VAE where the transformer belongs
    try:
        load_vace_diffusers(folder, device="cpu")
    except Exception as exc:
        error = exc
    else:
        raise AssertionError("a VAE loaded as the VACE transformer")
    assert "transformer" in str(error) and "expected" in str(error)


# --------------------------------------------------------------------------- the rules, in the sources


def _sources() -> list[Path]:
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20  # the scan really sees the package
    return files


def _calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_trust_remote_code_is_never_turned_on():
    offenders = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for call in _calls(path):
            for keyword in call.keywords:
                if keyword.arg == "trust_remote_code" and not (
                        isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
                if keyword.arg is None:  # **kwargs: the dict must not carry it either
                    source = ast.get_source_segment(text, keyword.value) or ""
                    if "trust_remote_code" in source:
                        offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} (**{source})")
        if "trust_remote_code=True" in text.replace(" ", "") or '"trust_remote_code":True' in text.replace(" ", ""):
            offenders.append(f"{path.relative_to(ROOT)} (text)")
    assert not offenders, f"trust_remote_code enabled or passed through at {offenders}"


def test_every_torch_load_is_weights_only_and_nothing_unpickles_directly():
    loads, offenders = [], []
    for path in _sources():
        for call in _calls(path):
            name = _name(call.func)
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if name == "torch.load":
                loads.append(where)
                flags = {k.arg: k.value for k in call.keywords}
                value = flags.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads",
                        "joblib.load", "numpy.load", "np.load", "cloudpickle.load", "cloudpickle.loads"):
                offenders.append(f"{where}: {name}")
            if name.endswith("from_pretrained"):
                flags = {k.arg: k.value for k in call.keywords}
                value = flags.get("use_safetensors")
                if isinstance(value, ast.Constant) and value.value is False:
                    offenders.append(f"{where}: from_pretrained(use_safetensors=False)")
    assert loads, "the scan found no torch.load at all (weights.py has two)"
    assert not offenders, offenders
