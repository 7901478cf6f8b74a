"""Test doubles of the ComfyUI core nodes the shipped workflows use.

Each double declares the core node's inputs in ComfyUI 0.3.64's order (widget order decides how a
UI workflow's ``widgets_values`` map onto inputs, so it must match; ``tests/harness/live_comfyui.py``
compares it with a real server's ``/object_info``) and does the minimum a test needs: savers
write real PNG / MP4 files, loaders read real files, the native Wan nodes check and record the
tensors they receive and return tensors of ComfyUI's shapes. Nothing here is shipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


class AnyType(str):
    """ComfyUI's IO.ANY: equal to every type in link validation."""

    def __ne__(self, other: object) -> bool:
        return False


ANY = AnyType("*")
RECORDED: dict[str, list[dict[str, Any]]] = {}


def _record(node: str, **values: Any) -> None:
    RECORDED.setdefault(node, []).append(values)


def _folder_paths() -> Any:
    import folder_paths

    return folder_paths


def _counter_path(prefix: str, suffix: str) -> tuple[Path, str]:
    root = Path(_folder_paths().get_output_directory())
    target = root / prefix
    target.parent.mkdir(parents=True, exist_ok=True)
    counter = 1
    while (target.parent / f"{target.name}_{counter:05}_{suffix}").exists():
        counter += 1
    path = target.parent / f"{target.name}_{counter:05}_{suffix}"
    sub = path.parent.relative_to(root).as_posix()
    return path, "" if sub == "." else sub


def _input_files() -> list[str]:
    root = _folder_paths().get_input_directory()
    return sorted(f for f in os.listdir(root) if os.path.isfile(os.path.join(root, f)))


# --------------------------------------------------------------------------- media in / out


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image": (_input_files(), {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        with Image.open(Path(_folder_paths().get_input_directory()) / image) as im:
            rgba = im.convert("RGBA") if "A" in im.getbands() else None
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        pixels = torch.from_numpy(rgb)[None]
        if rgba is not None:  # ComfyUI: mask = 1 - alpha
            mask = 1.0 - torch.from_numpy(np.asarray(rgba, dtype=np.float32)[..., 3] / 255.0)[None]
        else:
            mask = torch.zeros((1, 64, 64), dtype=torch.float32)
        return pixels, mask


@dataclass
class VideoDouble:
    """What the VIDEO socket carries between the doubles: frames [T,H,W,3] in 0..1 and a frame rate."""

    images: torch.Tensor
    fps: float


class LoadVideo:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"file": (_input_files(), {"video_upload": True})}}

    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "load"

    def load(self, file: str) -> tuple[VideoDouble]:
        import av

        frames = []
        with av.open(str(Path(_folder_paths().get_input_directory()) / file)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 24)
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
        return (VideoDouble(torch.from_numpy(np.stack(frames)).float() / 255.0, fps),)


class GetVideoComponents:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"video": ("VIDEO", {})}}

    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    RETURN_NAMES = ("images", "audio", "fps")
    FUNCTION = "run"

    def run(self, video: VideoDouble) -> tuple[Any, ...]:
        return video.images, None, video.fps


class PreviewAny:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"source": (ANY, {})}}

    RETURN_TYPES = ()
    FUNCTION = "main"
    OUTPUT_NODE = True

    def main(self, source: Any = None) -> dict[str, Any]:
        value = source if isinstance(source, str) else str(source)
        _record("PreviewAny", source=source)
        return {"ui": {"text": (value,)}}


class SaveImage:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI", **_: Any) -> dict[str, Any]:
        from PIL import Image

        _width, _height = images[0].shape[1], images[0].shape[0]  # as ComfyUI's: get_save_image_path(.., images[0]..)
        results = []
        for image in images:
            path, sub = _counter_path(filename_prefix, ".png")
            Image.fromarray((image.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)).save(path)
            results.append({"filename": path.name, "subfolder": sub, "type": "output"})
        _record("SaveImage", images=images)
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE", {})}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    OUTPUT_NODE = True

    def save_images(self, images: torch.Tensor, filename_prefix: str = "preview", **_: Any) -> dict[str, Any]:
        return super().save_images(images, filename_prefix)


class CreateVideo:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE", {}), "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0})},
                "optional": {"audio": ("AUDIO", {})}}

    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "execute"

    def execute(self, images: torch.Tensor, fps: float, audio: Any = None) -> tuple[VideoDouble]:
        return (VideoDouble(images, fps),)


class SaveVideo:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"video": ("VIDEO", {}),
                             "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                             "format": (["auto", "mp4"], {"default": "auto"}),
                             "codec": (["auto", "h264"], {"default": "auto"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "execute"
    OUTPUT_NODE = True

    def execute(self, video: VideoDouble, filename_prefix: str, format: str, codec: str, **_: Any) -> dict[str, Any]:
        from unison_runtime.media import write_video

        path, sub = _counter_path(filename_prefix, ".mp4")
        write_video(video.images.numpy(), path, fps=video.fps)
        _record("SaveVideo", images=video.images, fps=video.fps)
        return {"ui": {"images": [{"filename": path.name, "subfolder": sub, "type": "output"}], "animated": (True,)}}


# --------------------------------------------------------------------------- native Wan (shape-checking doubles)


class UNETLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"unet_name": (_folder_paths().get_filename_list("diffusion_models"),),
                             "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"

    def load_unet(self, unet_name: str, weight_dtype: str) -> tuple[dict[str, Any]]:
        return ({"unet": unet_name},)


class CLIPLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"clip_name": (_folder_paths().get_filename_list("text_encoders"),),
                             "type": (["stable_diffusion", "wan"],)},
                "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"

    def load_clip(self, clip_name: str, type: str = "wan", device: str = "default") -> tuple[dict[str, Any]]:
        return ({"clip": clip_name, "type": type},)


class VAELoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"vae_name": ([*_folder_paths().get_filename_list("vae"), "pixel_space"],)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"

    def load_vae(self, vae_name: str) -> tuple[dict[str, Any]]:
        return ({"vae": vae_name},)


UMT5_DIM = 4096


class CLIPTextEncode:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP", {})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    def encode(self, clip: Any, text: str) -> tuple[list[list[Any]]]:
        # ComfyUI's umT5 pads every prompt to 512 positions of width 4096; the values do not matter here.
        generator = torch.Generator().manual_seed(len(text))
        return ([[torch.randn(1, 512, UMT5_DIM, generator=generator), {"pooled_output": None}]],)


class ModelSamplingSD3:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL", {}),
                             "shift": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    def patch(self, model: dict[str, Any], shift: float) -> tuple[dict[str, Any]]:
        return ({**model, "shift": shift},)


class WanVaceToVideo:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "positive": ("CONDITIONING", {}),
            "negative": ("CONDITIONING", {}),
            "vae": ("VAE", {}),
            "width": ("INT", {"default": 832, "min": 16, "max": 16384, "step": 16}),
            "height": ("INT", {"default": 480, "min": 16, "max": 16384, "step": 16}),
            "length": ("INT", {"default": 81, "min": 1, "max": 16384, "step": 4}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.01}),
        }, "optional": {
            "control_video": ("IMAGE", {}),
            "control_masks": ("MASK", {}),
            "reference_image": ("IMAGE", {}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT", "INT")
    RETURN_NAMES = ("positive", "negative", "latent", "trim_latent")
    FUNCTION = "execute"

    def execute(self, positive: Any, negative: Any, vae: Any, width: int, height: int, length: int, batch_size: int,
                strength: float, control_video: Any = None, control_masks: Any = None,
                reference_image: Any = None) -> tuple[Any, ...]:
        _record("WanVaceToVideo", positive=positive, negative=negative, width=width, height=height, length=length,
                control_video=control_video, control_masks=control_masks, reference_image=reference_image)
        latent_length = (length - 1) // 4 + 1
        trim = 1 if reference_image is not None else 0
        latent = torch.zeros([batch_size, 16, latent_length + trim, height // 8, width // 8])
        return positive, negative, {"samples": latent}, trim


class KSampler:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (["euler", "uni_pc", "uni_pc_bh2"],),
            "scheduler": (["simple", "normal", "karras"],),
            "positive": ("CONDITIONING", {}),
            "negative": ("CONDITIONING", {}),
            "latent_image": ("LATENT", {}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    def sample(self, model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
               positive: Any, negative: Any, latent_image: dict[str, Any], denoise: float = 1.0) -> tuple[Any]:
        _record("KSampler", model=model, seed=seed, steps=steps, positive=positive, negative=negative)
        return ({"samples": latent_image["samples"].clone()},)


class TrimVideoLatent:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"samples": ("LATENT", {}),
                             "trim_amount": ("INT", {"default": 0, "min": 0, "max": 99999})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"

    def op(self, samples: dict[str, Any], trim_amount: int) -> tuple[dict[str, Any]]:
        return ({"samples": samples["samples"][:, :, trim_amount:]},)


class VAEDecode:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    def decode(self, vae: Any, samples: dict[str, Any]) -> tuple[torch.Tensor]:
        latent = samples["samples"]
        frames = (latent.shape[2] - 1) * 4 + 1
        return (torch.full((frames, latent.shape[3] * 8, latent.shape[4] * 8, 3), 0.5),)


CORE_NODES: dict[str, type] = {
    cls.__name__: cls
    for cls in (LoadImage, LoadVideo, GetVideoComponents, PreviewAny, SaveImage, PreviewImage, CreateVideo, SaveVideo,
                UNETLoader, CLIPLoader, VAELoader, CLIPTextEncode, ModelSamplingSD3, WanVaceToVideo, KSampler,
                TrimVideoLatent, VAEDecode)
}
