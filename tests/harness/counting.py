"""A model loader that counts its calls, for tests of when the pipeline loads, caches and reloads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class CountingLoader:
    """Wraps a zero-argument loader; ``calls`` says how often the pipeline asked it to load."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self.load, self.calls = load, 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.load()
