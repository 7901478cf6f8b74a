"""Fetch the released models into a ComfyUI-style models folder (for users with internet).

``python -m unison_runtime download --to DIR [--dry-run]`` writes every file under the name the
shipped workflows (``workflows/*.json``) choose in their loaders, so a user who ran it can open
any workflow and queue it without re-picking a file. Nothing else in the pack downloads: running
never reaches a hub. ``huggingface_hub`` is imported only when something is fetched, so it stays
an optional dependency (``pip install unison[download]``).

Everything the command fetches is in :data:`DOWNLOADS`, one row per file or folder, so a changed
repository or file name is a one-line fix. The Unison release's own layout is not confirmed, so
its LoRA adapter and projector are taken from the repository by what they are (the folder with
``adapter_config.json``, the ``*projector*.pth`` file) and written under the workflows' names.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from .errors import UnisonError

#: Environment variable overriding the Unison release repository (its id is not confirmed).
UNISON_REPO_ENV = "UNISON_REPO_ID"
UNISON_REPO = "ali-vilab/Unison"
WAN_REPACKAGED = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
#: The projector file formats the release may use; all are torch pickles, read safely as ``.pth``.
PROJECTOR_SUFFIXES = (".pth", ".pt")

Pick = Literal["lora", "projector"]


@dataclass(frozen=True)
class Download:
    """One thing to fetch into the models folder.

    ``filename`` names one file of the repository; ``None`` means the whole repository, or,
    with ``pick``, the one part of it that ``pick`` names (``"lora"``: the adapter folder,
    ``"projector"``: the projector file).
    """

    what: str
    repo_id: str
    destination: str  # relative to the models folder: the name the workflows' loaders choose
    filename: str | None = None
    pick: Pick | None = None
    verified: bool = True
    note: str = ""

    def source(self) -> str:
        if self.filename:
            return f"{self.repo_id}/{self.filename}"
        if self.pick:
            return f"{self.repo_id} (its {self.pick})"
        return f"{self.repo_id} (whole repository)"


_UNCONFIRMED = f"the release repository id is not confirmed; set {UNISON_REPO_ENV}=owner/name to use another"

DOWNLOADS: tuple[Download, ...] = (
    Download("Wan2.1-VACE-1.3B transformer (fp16, Comfy-Org single file)", WAN_REPACKAGED,
             "diffusion_models/wan2.1_vace_1.3B_fp16.safetensors",
             "split_files/diffusion_models/wan2.1_vace_1.3B_fp16.safetensors"),
    Download("Wan 2.1 VAE", WAN_REPACKAGED, "vae/wan_2.1_vae.safetensors", "split_files/vae/wan_2.1_vae.safetensors"),
    Download("umT5-XXL text encoder (scaled fp8, tokenizer embedded)", WAN_REPACKAGED,
             "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
             "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    Download("Qwen2.5-VL-3B-Instruct (stage-one planner base)", "Qwen/Qwen2.5-VL-3B-Instruct",
             "unison/Qwen2.5-VL-3B-Instruct"),
    # The projector first: if the release keeps the adapter at its top level, the LoRA row then
    # moves that whole folder, and the projector must already be out of it.
    Download("Unison projector", UNISON_REPO, "unison/projector.pth", pick="projector", verified=False,
             note=_UNCONFIRMED),
    Download("Unison planning LoRA", UNISON_REPO, "unison/unison-lora", pick="lora", verified=False,
             note=_UNCONFIRMED),
)


def plan(unison_repo: str | None = None) -> list[Download]:
    """The downloads, with the Unison repository taken from ``unison_repo`` or ``$UNISON_REPO_ID``."""
    repo = unison_repo or os.environ.get(UNISON_REPO_ENV)
    if not repo:
        return list(DOWNLOADS)
    given = f"repository given by the user ({repo})"
    return [replace(row, repo_id=repo, verified=True, note=given) if row.repo_id == UNISON_REPO else row
            for row in DOWNLOADS]


def _present(target: Path, row: Download) -> bool:
    if row.filename or row.pick == "projector":
        return target.is_file() and target.stat().st_size > 0
    return target.is_dir() and any(p.name != ".cache" for p in target.iterdir())


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise UnisonError(
            "downloading needs huggingface_hub: pip install huggingface_hub (or pip install unison[download])"
        ) from None
    return huggingface_hub


def _picked(row: Download, snapshot: Path) -> Path:
    """The part of a fetched repository that ``row.pick`` names; exactly one must be there.

    Recognised as model discovery recognises it (:mod:`.models_dir`), hidden folders such as the
    hub's ``.cache`` skipped, so what is fetched is what the loaders will then find.
    """
    from .models_dir import is_lora_dir, is_projector_name, walk_models

    candidates = [snapshot, *walk_models(snapshot)]
    if row.pick == "lora":
        found = [p for p in candidates if is_lora_dir(p)]
        expected = "one folder with adapter_config.json (a peft LoRA adapter)"
    else:
        found = [p for p in candidates if p.is_file() and is_projector_name(p.name)
                 and p.suffix.lower() in PROJECTOR_SUFFIXES]
        expected = f"one *projector* file ending in {' or '.join(PROJECTOR_SUFFIXES)}"
    if len(found) != 1:
        shown = [str(p.relative_to(snapshot)) for p in found] or "none"
        raise UnisonError(f"{row.source()}: expected {expected}, found {shown}; "
                          f"fetch it by hand into models/{row.destination}")
    return found[0]


def _fetch(hub: Any, row: Download, target: Path, staging: Path, snapshots: dict[str, Path]) -> None:
    """Put ``row`` at ``target``; whole repositories a pick reads from are fetched once per run."""
    try:
        if row.filename is not None:
            fetched = Path(hub.hf_hub_download(row.repo_id, row.filename, local_dir=str(staging)))
        elif row.pick is None:
            hub.snapshot_download(row.repo_id, local_dir=str(target))
            return
        else:
            if row.repo_id not in snapshots:
                local = staging / row.repo_id.replace("/", "--")
                hub.snapshot_download(row.repo_id, local_dir=str(local))
                snapshots[row.repo_id] = local
            fetched = _picked(row, snapshots[row.repo_id])
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():  # an empty leftover (see _present): make room for the adapter folder
            shutil.rmtree(target)
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
    staging = root / ".unison-download"
    hub = None if dry_run else _hub()
    snapshots: dict[str, Path] = {}
    for row in plan(unison_repo):
        target = root / row.destination
        caveat = f" [{row.note}]" if row.note else ""
        if _present(target, row):
            yield f"present  {row.what}: {target}"
            continue
        if dry_run:
            yield f"would fetch {row.what}: {row.source()} -> {target}{caveat}"
            continue
        yield f"fetching {row.what}: {row.source()} -> {target}{caveat}"
        _fetch(hub, row, target, staging, snapshots)
        yield f"done     {row.what}: {target}"
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
