"""VACE's salient-object annotator (U^2-Net), which Unison uses to mask a video edit given no mask.

Unison's ``inference.py`` edits a video with ``process_vace_data(task="inpainting",
mode="salient")``: VACE's ``SalientAnnotator`` (ali-vilab/VACE ``vace/annotators/salient.py``)
runs U^2-Net (Qin et al., 2020) on the clip's first frame, and every pixel whose normalised
saliency survives as a non-zero byte is regenerated in every frame.

The weights are the public VACE-Annotators release's ``salient/u2net.pt`` (a pickled U2NET
``state_dict``). It is looked for in the models folders (see :func:`find_salient_model`), loaded
with ``torch.load(weights_only=True)`` (or from a ``.safetensors`` copy), and never downloaded.
The network below is the published architecture with the same module names, so the release's
keys load as they are; channel widths are read from the weights (the release's full U2NET, the
small U2NETP, or a tiny test model all load).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError

#: Where the VACE-Annotators release keeps the model, relative to a models folder (VACE's configs).
RELEASE_PATH = ("VACE-Annotators", "salient", "u2net.pt")
FILE_NAMES = ("u2net.pt", "u2net.safetensors")
#: SalientAnnotator's input size and ImageNet normalisation.
NORM_SIZE = (320, 320)
NORM_MEAN = (0.485, 0.456, 0.406)
NORM_STD = (0.229, 0.224, 0.225)
#: Encoder and decoder stages: (name, RSU depth, dilated "F" variant).
STAGES = (
    ("stage1", 7, False), ("stage2", 6, False), ("stage3", 5, False), ("stage4", 4, False),
    ("stage5", 4, True), ("stage6", 4, True),
    ("stage5d", 4, True), ("stage4d", 4, False), ("stage3d", 5, False), ("stage2d", 6, False), ("stage1d", 7, False),
)  # fmt: skip
SIDES = ("side1", "side2", "side3", "side4", "side5", "side6")


class REBNCONV(nn.Module):
    """3x3 convolution (dilated), batch norm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dirate: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


def _upsample_like(src: torch.Tensor, tar: torch.Tensor) -> torch.Tensor:
    return F.interpolate(src, size=tar.shape[2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block of ``depth`` levels (RSU7 ... RSU4), or the dilated RSU4F when ``dilated``.

    Module names are the published ones (``rebnconvin``, ``rebnconv1`` ... ``rebnconv{depth}``,
    ``rebnconv{depth-1}d`` ... ``rebnconv1d``), so a U2NET ``state_dict`` loads unchanged.
    """

    def __init__(self, depth: int, in_ch: int, mid_ch: int, out_ch: int, dilated: bool = False) -> None:
        super().__init__()
        self.depth, self.dilated = depth, dilated
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch)
        for level in range(2, depth + 1):
            rate = 2 ** (level - 1) if dilated else (2 if level == depth else 1)
            setattr(self, f"rebnconv{level}", REBNCONV(mid_ch, mid_ch, rate))
        for level in range(depth - 1, 0, -1):
            rate = 2 ** (level - 1) if dilated else 1
            setattr(self, f"rebnconv{level}d", REBNCONV(mid_ch * 2, out_ch if level == 1 else mid_ch, rate))
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        skips = [self.rebnconv1(hxin)]
        for level in range(2, self.depth):
            below = skips[-1] if self.dilated else self.pool(skips[-1])
            skips.append(getattr(self, f"rebnconv{level}")(below))
        hx = getattr(self, f"rebnconv{self.depth}")(skips[-1])
        for level in range(self.depth - 1, 0, -1):
            hx = getattr(self, f"rebnconv{level}d")(torch.cat((hx, skips[level - 1]), 1))
            if not self.dilated and level > 1:
                hx = _upsample_like(hx, skips[level - 2])
        return hx + hxin


class U2NET(nn.Module):
    """U^2-Net: six encoder stages, five decoder stages, six side outputs fused by a 1x1 convolution.

    ``widths`` maps each stage name to its ``(in, mid, out)`` channels; the default is the
    published U2NET (3 → 1 channels). :func:`widths_from_state_dict` reads them from weights.
    """

    def __init__(self, widths: Mapping[str, tuple[int, int, int]] | None = None, out_ch: int = 1) -> None:
        super().__init__()
        widths = dict(widths or U2NET_WIDTHS)
        for name, depth, dilated in STAGES:
            setattr(self, name, RSU(depth, *widths[name], dilated=dilated))
        decoder_out = [widths[n][2] for n in ("stage1d", "stage2d", "stage3d", "stage4d", "stage5d", "stage6")]
        for side, channels in zip(SIDES, decoder_out, strict=True):
            setattr(self, side, nn.Conv2d(channels, out_ch, 3, padding=1))
        self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused saliency map ``sigmoid(d0)``, ``[B, 1, H, W]`` (SalientAnnotator reads only this one)."""
        encoded = [self.stage1(x)]
        for name in ("stage2", "stage3", "stage4", "stage5", "stage6"):
            encoded.append(getattr(self, name)(self.pool(encoded[-1])))
        hx = encoded[-1]
        decoded = [hx]
        for name, skip in zip(("stage5d", "stage4d", "stage3d", "stage2d", "stage1d"), encoded[4::-1], strict=True):
            hx = getattr(self, name)(torch.cat((_upsample_like(hx, skip), skip), 1))
            decoded.append(hx)
        hx6, *up = decoded  # stage6, 5d, 4d, 3d, 2d, 1d
        d1 = self.side1(up[4])
        sides = [d1] + [
            _upsample_like(getattr(self, f"side{k}")(feature), d1)
            for k, feature in zip(range(2, 7), (up[3], up[2], up[1], up[0], hx6), strict=True)
        ]
        return torch.sigmoid(self.outconv(torch.cat(sides, 1)))


#: The published U2NET's (in, mid, out) channels per stage (ali-vilab/VACE salient.py, U2NET.__init__).
U2NET_WIDTHS = {
    "stage1": (3, 32, 64), "stage2": (64, 32, 128), "stage3": (128, 64, 256), "stage4": (256, 128, 512),
    "stage5": (512, 256, 512), "stage6": (512, 256, 512), "stage5d": (1024, 256, 512),
    "stage4d": (1024, 128, 256), "stage3d": (512, 64, 128), "stage2d": (256, 32, 64), "stage1d": (128, 16, 64),
}  # fmt: skip


def widths_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int, int]]:
    """Each stage's (in, mid, out) channels, read from its first two convolutions' weights."""
    widths = {}
    for name, _depth, _dilated in STAGES:
        first, second = f"{name}.rebnconvin.conv_s1.weight", f"{name}.rebnconv1.conv_s1.weight"
        if first not in state or second not in state:
            raise KeyError(first if first not in state else second)
        out_ch, in_ch = state[first].shape[:2]
        widths[name] = (int(in_ch), int(state[second].shape[0]), int(out_ch))
    return widths


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a U2NET state_dict")
    return dict(loaded)


def load_salient_model(path: str | Path) -> U2NET:
    """The U2NET in ``path`` (``.pt``/``.pth`` state_dict or ``.safetensors``), in eval mode on the CPU."""
    path = Path(path)
    try:
        state = _read_state_dict(path)
    except WeightsError:
        raise
    except Exception as exc:  # pickle refusals, truncated files, bad headers
        raise WeightsError(f"cannot read the salient annotator {path}: {exc}") from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model = U2NET(widths_from_state_dict(state))
        model.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        raise WeightsError(f"{path} is not VACE's U2NET salient annotator ({str(exc).splitlines()[0]}); expected "
                           "the VACE-Annotators release's salient/u2net.pt") from None
    return model.eval()


def find_salient_model(folders: Sequence[str | Path]) -> Path | None:
    """The annotator file in ``folders``: ``<folder>/VACE-Annotators/salient/u2net.pt`` (the release layout),
    ``<folder>/salient/u2net.pt`` or ``<folder>/u2net.pt`` (also ``.safetensors``); ``None`` if absent."""
    for folder in folders:
        base = Path(folder)
        for sub in (Path(*RELEASE_PATH[:-1]), Path(RELEASE_PATH[1]), Path()):
            for name in FILE_NAMES:
                candidate = base / sub / name
                if candidate.is_file():
                    return candidate
    return None


def _linear_taps(out: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's source positions for ``out`` pixels from ``size``: ``floor`` and the 11-bit weights of both taps."""
    pos = ((np.arange(out) + 0.5) * (1.0 / (out / size)) - 0.5).astype(np.float32)  # 1 / inv_scale, as OpenCV
    first = np.floor(pos).astype(np.int64)
    frac = (pos - first).astype(np.float32)
    return first, frac


def _weights(frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (np.rint((np.float32(1.0) - frac) * np.float32(2048)).astype(np.int64),
            np.rint(frac * np.float32(2048)).astype(np.int64))


def _bilinear_u8_like_cv2(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` (INTER_LINEAR) for one uint8 channel, in its fixed point.

    Written out so the mask matches the reference's to the byte without depending on OpenCV:
    pixel centres map to ``(d + 0.5) * scale - 0.5``; both weights are quantised to 11 bits; the
    horizontal pass clamps the position at the edges, the vertical one only the rows; the vertical
    sum is OpenCV's vectorised ``((a >> 4) * b0 >> 16) + ((c >> 4) * b1 >> 16) + 2 >> 2``.
    """
    h, w = image.shape
    first, frac = _linear_taps(width, w)
    low, high = first < 0, first >= w - 1
    first[low], frac[low] = 0, 0.0
    first[high], frac[high] = w - 1, 0.0
    wx0, wx1 = _weights(frac)
    src = image.astype(np.int64)
    rows = src[:, first] * wx0 + src[:, np.minimum(first + 1, w - 1)] * wx1  # [h, width], scaled by 2048
    top, frac_y = _linear_taps(height, h)
    wy0, wy1 = _weights(frac_y)
    upper = (rows[np.clip(top, 0, h - 1)] >> 4) * wy0[:, None] >> 16
    lower = (rows[np.clip(top + 1, 0, h - 1)] >> 4) * wy1[:, None] >> 16
    return np.clip((upper + lower + 2) >> 2, 0, 255).astype(np.uint8)


class SalientAnnotator:
    """VACE's ``SalientAnnotator.forward``: uint8 RGB ``[H, W, 3]`` → uint8 saliency ``[H, W]`` (0..255)."""

    def __init__(self, model: U2NET, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> SalientAnnotator:
        return cls(load_salient_model(path), device)

    def saliency(self, image: np.ndarray) -> np.ndarray:
        """The saliency map of one frame; VACE regenerates every pixel where it is > 0."""
        from PIL import Image

        h, w = image.shape[:2]
        # torchvision's Resize on a PIL image is Pillow's bilinear resize; then ToTensor and Normalize.
        small = Image.fromarray(np.ascontiguousarray(image[..., :3])).resize(NORM_SIZE[::-1], Image.BILINEAR)
        x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(NORM_MEAN).view(3, 1, 1)
        std = torch.tensor(NORM_STD).view(3, 1, 1)
        x = ((x - mean) / std)[None].to(self.device)
        with torch.no_grad():
            saliency = self.model(x)[0, 0]
        span = saliency.max() - saliency.min()
        if not span > 0:  # a flat map (the reference would divide by zero): nothing stands out
            return np.zeros((h, w), np.uint8)
        normed = (saliency - saliency.min()) / span
        byte = (normed.cpu().numpy() * 255).astype(np.uint8)  # truncation, as astype('uint8') there
        return _bilinear_u8_like_cv2(byte, w, h)
