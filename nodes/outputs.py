"""Small output helper core ComfyUI lacks: saving an answer as a text file (core "Preview Any" shows it)."""

from __future__ import annotations

import re
from typing import Any

from . import comfy_bridge as comfy
from ._runtime import errors

_SAFE_PREFIX = re.compile(r"^[\w\- ./]+$")


class UnisonSaveText:
    DESCRIPTION = "Saves text (e.g. the Task Router's answer) as a .txt file in ComfyUI's output folder and shows it."
    CATEGORY = "Unison/output"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "text": ("STRING", {"forceInput": True, "tooltip": "The text to save, e.g. the Router's text output."}),
                "filename_prefix": ("STRING", {"default": "unison/answer",
                                               "tooltip": "File name prefix inside the output folder; a counter "
                                                          "and .txt are added."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: Any = None) -> str | bool:
        if filename_prefix is None:
            return True
        if not isinstance(filename_prefix, str) or not _SAFE_PREFIX.match(filename_prefix) \
                or ".." in filename_prefix.split("/") or filename_prefix.startswith("/"):
            return (f"filename_prefix {filename_prefix!r} must be a relative name of letters, digits, '-', '_', "
                    "'.', ' ' and '/' without '..'")
        return True

    def save(self, text: str, filename_prefix: str = "unison/answer") -> dict[str, Any]:
        valid = self.VALIDATE_INPUTS(filename_prefix)
        if valid is not True:
            raise errors.UnisonError(str(valid))
        results = []
        root = comfy.output_directory()
        if root is not None:
            target_dir = (root / filename_prefix).parent
            target_dir.mkdir(parents=True, exist_ok=True)
            stem = (root / filename_prefix).name
            taken = {p.name for p in target_dir.glob(f"{stem}_*.txt")}
            counter = 1
            while f"{stem}_{counter:05}.txt" in taken:
                counter += 1
            path = target_dir / f"{stem}_{counter:05}.txt"
            path.write_text(text, encoding="utf-8")
            subfolder = target_dir.relative_to(root).as_posix()
            results.append({"filename": path.name, "subfolder": "" if subfolder == "." else subfolder,
                            "type": "output"})
        return {"ui": {"text": [text], "files": results}}
