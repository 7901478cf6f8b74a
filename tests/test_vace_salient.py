"""VACE's salient annotator (U^2-Net): architecture, safe loading of the release format, pre/post-processing.

The tests build a tiny U2NET with the same class (channel widths read back from the weights) and
save it as the VACE-Annotators release does (``torch.save(state_dict)`` to ``salient/u2net.pt``).
Expected values come from the test's own arithmetic (Pillow's resize, ImageNet normalisation,
min-max scaling, a float bilinear resize), never from the module under test.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from unison_runtime.errors import WeightsError
from unison_runtime.vace.salient import (
    U2NET,
    U2NET_WIDTHS,
    SalientAnnotator,
    find_salient_model,
    load_salient_model,
    widths_from_state_dict,
)

#: (in, mid, out) per stage for a tiny model; the decoder inputs are the concatenations the net makes.
TINY = {
    "stage1": (3, 2, 4), "stage2": (4, 2, 4), "stage3": (4, 2, 4), "stage4": (4, 2, 4), "stage5": (4, 2, 4),
    "stage6": (4, 2, 4), "stage5d": (8, 2, 4), "stage4d": (8, 2, 4), "stage3d": (8, 2, 4), "stage2d": (8, 2, 4),
    "stage1d": (8, 2, 4),
}  # fmt: skip


def tiny_model(seed: int = 0) -> U2NET:
    torch.manual_seed(seed)
    model = U2NET(TINY)
    for module in model.modules():  # batch-norm statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save_release_layout(root, model: U2NET):
    path = root / "VACE-Annotators" / "salient" / "u2net.pt"
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return path


def test_published_u2net_keys_shapes_and_size():
    with torch.device("meta"):
        model = U2NET()
    state = model.state_dict()
    # U^2-Net as published: 44.0 M parameters (176 MB in float32), 798 state-dict entries.
    assert sum(p.numel() for p in model.parameters()) == 44_009_869
    assert len(state) == 798
    assert tuple(state["stage1.rebnconvin.conv_s1.weight"].shape) == (64, 3, 3, 3)
    assert tuple(state["stage1.rebnconv7.conv_s1.weight"].shape) == (32, 32, 3, 3)  # RSU7's dilated bottom
    assert tuple(state["stage6.rebnconv4.conv_s1.weight"].shape) == (256, 256, 3, 3)  # RSU4F
    assert tuple(state["stage5d.rebnconvin.conv_s1.weight"].shape) == (512, 1024, 3, 3)
    assert tuple(state["side6.weight"].shape) == (1, 512, 3, 3)
    assert tuple(state["outconv.weight"].shape) == (1, 6, 1, 1)
    assert "stage1.rebnconv1d.bn_s1.num_batches_tracked" in state
    assert widths_from_state_dict(state) == U2NET_WIDTHS
    dilations = {name: m.conv_s1.dilation[0] for name, m in model.stage5.named_children() if hasattr(m, "conv_s1")}
    assert dilations == {"rebnconvin": 1, "rebnconv1": 1, "rebnconv2": 2, "rebnconv3": 4, "rebnconv4": 8,
                         "rebnconv3d": 4, "rebnconv2d": 2, "rebnconv1d": 1}


def test_release_file_is_found_and_loads_safely(tmp_path):
    model = tiny_model()
    path = save_release_layout(tmp_path, model)
    assert find_salient_model([tmp_path / "elsewhere", tmp_path]) == path
    assert find_salient_model([tmp_path / "elsewhere"]) is None
    loaded = load_salient_model(path)
    assert widths_from_state_dict(loaded.state_dict()) == TINY
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert got.shape == (1, 1, 40, 56)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert float(got.min()) > 0 and float(got.max()) < 1  # a sigmoid map


def test_module_prefixed_and_safetensors_copies_load(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(1)
    prefixed = tmp_path / "u2net.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, prefixed)
    (tmp_path / "st").mkdir()
    copy = tmp_path / "st" / "u2net.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(copy))
    x = torch.rand(1, 3, 33, 47)
    with torch.no_grad():
        for path in (prefixed, copy):
            torch.testing.assert_close(load_salient_model(path)(x), model(x), rtol=0, atol=0)


class NotWeights:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_unsafe_or_wrong_files_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as fh:
        pickle.dump({"stage1": NotWeights()}, fh)
    with pytest.raises(WeightsError, match="cannot read the salient annotator"):
        load_salient_model(evil)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(WeightsError, match="not VACE's U2NET"):
        load_salient_model(other)


def expected_saliency(model: U2NET, image: np.ndarray) -> np.ndarray:
    """SalientAnnotator.forward as VACE writes it, with a float bilinear resize back (cv2 is ±1 of it)."""
    small = np.asarray(Image.fromarray(image).resize((320, 320), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(small).permute(2, 0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        d0 = model(x[None])[0, 0]
    byte = ((d0 - d0.min()) / (d0.max() - d0.min()) * 255).numpy().astype(np.uint8)
    h, w = image.shape[:2]
    up = torch.nn.functional.interpolate(torch.from_numpy(byte).float()[None, None], size=(h, w), mode="bilinear",
                                         align_corners=False)
    return up[0, 0].numpy()


def test_saliency_pre_and_post_processing(tmp_path):
    model = tiny_model(2)
    annotator = SalientAnnotator.from_file(save_release_layout(tmp_path, model))
    rng = np.random.default_rng(0)
    for h, w in [(97, 131), (352, 400)]:  # smaller and larger than the network's 320x320
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = annotator.saliency(image)
        assert got.shape == (h, w) and got.dtype == np.uint8
        expected = expected_saliency(model, image)
        assert np.abs(got.astype(np.float32) - expected).max() <= 1.0 + 1e-4
        assert got.max() - got.min() >= 200  # min-max normalised over the 320x320 map, then resized


def test_a_flat_map_marks_nothing():
    model = tiny_model(3)
    with torch.no_grad():
        model.outconv.weight.zero_()
        model.outconv.bias.fill_(0.3)
    got = SalientAnnotator(model).saliency(np.zeros((20, 30, 3), np.uint8))
    assert got.shape == (20, 30) and not got.any()


def test_pipeline_finds_the_annotator_in_the_models_folder(tmp_path):
    from unison_runtime.pipeline import locate_models

    assert locate_models(tmp_path).salient is None
    path = save_release_layout(tmp_path, tiny_model())
    assert locate_models(tmp_path).salient == path
