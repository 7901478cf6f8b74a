"""Fetch the released models into a ComfyUI-style models folder (for users with internet).

``python -m unison_runtime download --to DIR [--dry-run]`` puts every file where
:mod:`unison_runtime.models_dir` (and ComfyUI) look for it. Nothing else in the pack downloads:
running never reaches a hub. ``huggingface_hub`` is imported only when something is fetched, so
it stays an optional dependency (``pip install unison[download]``).

Everything the command fetches is in :data:`DOWNLOADS`, one row per item, so a changed repository
or file name is a one-line fix. Rows with ``verified=False`` name a repository we could not check.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import UnisonError

#: Environment variable overriding the Unison release repository (its id is not confirmed).
UNISON_REPO_ENV = "UNISON_REPO_ID"


@dataclass(frozen=True)
class Download:
    """One thing to fetch: a single file of a repository, or (``filename=None``) all of it."""

    what: str
    repo_id: str
    destination: str  # relative to the models folder, in the layout models_dir searches
    filename: str | None = None
    verified: bool = True
    note: str = ""

    def source(self) -> str:
        return f"{self.repo_id}/{self.filename}" if self.filename else f"{self.repo_id} (whole repository)"


WAN_REPACKAGED = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"

DOWNLOADS: tuple[Download, ...] = (
    Download("Wan2.1-VACE-1.3B transformer (fp16, Comfy-Org single file)", WAN_REPACKAGED,
             "diffusion_models/wan2.1_vace_1.3B_fp16.safetensors",
             "split_files/diffusion_models/wan2.1_vace_1.3B_fp16.safetensors"),
    Download("Wan 2.1 VAE", WAN_REPACKAGED, "vae/wan_2.1_vae.safetensors", "split_files/vae/wan_2.1_vae.safetensors"),
    Download("umT5-XXL text encoder (fp16, tokenizer embedded)", WAN_REPACKAGED,
             "text_encoders/umt5_xxl_fp16.safetensors", "split_files/text_encoders/umt5_xxl_fp16.safetensors"),
    Download("Qwen2.5-VL-3B-Instruct (stage-one planner base)", "Qwen/Qwen2.5-VL-3B-Instruct",
             "unison/Qwen2.5-VL-3B-Instruct"),
    Download("Unison planning LoRA and projector", "ali-vilab/Unison", "unison/Unison", verified=False,
             note=f"the release repository id is not confirmed; set {UNISON_REPO_ENV}=owner/name to use another"),
)


def plan(unison_repo: str | None = None) -> list[Download]:
    """The downloads, with the Unison repository taken from ``unison_repo`` or ``$UNISON_REPO_ID``."""
    repo = unison_repo or os.environ.get(UNISON_REPO_ENV)
    rows = []
    for row in DOWNLOADS:
        if repo and row.destination == "unison/Unison":
            row = replace(row, repo_id=repo, verified=True, note=f"repository given by the user ({repo})")
        rows.append(row)
    return rows


def _present(target: Path, row: Download) -> bool:
    if row.filename:
        return target.is_file() and target.stat().st_size > 0
    return target.is_dir() and any(p.name != ".cache" for p in target.iterdir())


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise UnisonError(
            "downloading needs huggingface_hub: pip install huggingface_hub (or pip install unison[download])"
        ) from None
    return huggingface_hub


def _fetch(hub, row: Download, target: Path, staging: Path) -> None:
    try:
        if row.filename is None:
            hub.snapshot_download(row.repo_id, local_dir=str(target))
            return
        fetched = Path(hub.hf_hub_download(row.repo_id, row.filename, local_dir=str(staging)))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched, target)  # same filesystem: staging lives inside the models folder
    except UnisonError:
        raise
    except Exception as exc:  # the hub raises many types (HTTP, auth, not found, disk)
        raise UnisonError(f"could not fetch {row.what} from {row.source()}: {type(exc).__name__}: {exc}") from None


def download_all(to_dir: str | Path, dry_run: bool = False, *, unison_repo: str | None = None) -> Iterator[str]:
    """Fetch every row of :func:`plan` into ``to_dir``, yielding one line of progress per item.

    Items already present are skipped. With ``dry_run`` nothing is imported or fetched: the
    lines say what would go where.
    """
    root = Path(to_dir)
    rows = plan(unison_repo)
    staging = root / ".unison-download"
    hub = None if dry_run else _hub()
    for row in rows:
        target = root / row.destination
        caveat = f" [{row.note}]" if row.note else ""
        if _present(target, row):
            yield f"present  {row.what}: {target}"
            continue
        if dry_run:
            yield f"would fetch {row.what}: {row.source()} -> {target}{caveat}"
            continue
        yield f"fetching {row.what}: {row.source()} -> {target}{caveat}"
        _fetch(hub, row, target, staging)
        yield f"done     {row.what}: {target}"
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
