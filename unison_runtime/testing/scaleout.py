"""Fault injection for the scale-out tests: a batch worker process that dies on a chosen line, once."""

from __future__ import annotations

import os
from pathlib import Path


def exit_on_first_visit(marker: str, victim: str, item_id: str) -> None:
    """Before line ``item_id``: if it is ``victim`` and ``marker`` does not exist yet, create it and end this
    process at once (as a killed or crashed worker would: no exception, no cleanup)."""
    if item_id == victim and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()), encoding="utf-8")
        os._exit(1)
