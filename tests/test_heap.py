"""unison_runtime.heap: a freed large tensor leaves no resident hole in the heap (glibc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unison_runtime import heap

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024

# The sampler's pattern in small: a freed 30 MiB cast raises glibc's threshold, a 16 MiB temporary
# is then allocated, a small tensor kept for the run lands after it, the temporary is freed.
_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from unison_runtime.heap import unmap_large_blocks

    def rss():
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))

    fixed = unmap_large_blocks() if sys.argv[1] == "fix" else False
    cast = torch.ones(30 * 2**20, dtype=torch.uint8)
    del cast
    temporary = torch.ones(16 * 2**20, dtype=torch.uint8)
    kept = torch.ones(64 * 1024, dtype=torch.uint8)
    before = rss()
    del temporary
    print(json.dumps({"fixed": fixed, "freed": before - rss(), "kept": int(kept.sum())}))
""")


def _run(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, env=env,
                          check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc on Linux")
def test_a_freed_large_tensor_goes_back_to_the_os_only_with_the_fixed_threshold():
    default, fixed = _run("default"), _run("fix")
    if not fixed["fixed"]:
        pytest.skip("not glibc")
    # glibc's default keeps the 16 MiB hole resident (the threshold rose to 30 MiB); fixed, it is unmapped.
    assert default["freed"] < 4 * MIB
    assert fixed["freed"] >= 15 * MIB


def test_an_explicit_environment_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert heap.unmap_large_blocks() is False


def test_off_linux_nothing_changes(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap.unmap_large_blocks() is False
