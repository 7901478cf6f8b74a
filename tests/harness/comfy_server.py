"""Start and stop a real ComfyUI for the live checks and the caching benchmark (stdlib only).

One place owns how such a server is run, so the checks and the benchmark cannot drift apart:
loopback only (``--listen 127.0.0.1``), ``--cpu``, an isolated ``--base-directory`` with an
in-memory database (nothing is written into ComfyUI's own folders), hubs off, output to
``<base>/server.log``. ``stop_server`` signals only the process ``start_server`` started.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
    """The server exited while starting or did not answer in time (the message names its log)."""


@dataclass(frozen=True)
class Server:
    """A ComfyUI process started by ``start_server``: its handle, base URL and log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def _answers(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # not listening yet, or an HTTP error status
        return False


def start_server(comfyui: Path, python: str, base: Path, port: int, *, extra_args: Sequence[str] = (),
                 timeout: float = 120, ready_path: str = "/system_stats",
                 say: Callable[[str], object] | None = None) -> Server:
    """Start ``main.py`` of ``comfyui`` with ``python`` on 127.0.0.1:``port`` and wait until it answers.

    Ready means ``GET ready_path`` returns 200 (pass a node's ``/object_info/<name>`` to also wait
    for a pack). If the process exits or does not answer within ``timeout`` seconds it is stopped
    and ``ServerError`` is raised; ``say``, if given, is told the command line first.
    """
    log = base / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [python, str(comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               *extra_args]
    if say is not None:
        say("starting: " + " ".join(command))
    with open(log, "wb") as out:
        server = Server(subprocess.Popen(command, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT, env=env),
                        f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {server.process.returncode} while starting; see {log}")
            if _answers(server.url + ready_path, timeout=5):
                return server
            if time.monotonic() > deadline:
                raise ServerError(f"ComfyUI did not answer {ready_path} within {timeout:.0f} s; see {log}")
            time.sleep(1)
    except BaseException:  # also Ctrl-C while waiting: never leave the process behind
        stop_server(server)
        raise


def stop_server(server: Server, timeout: float = 20) -> None:
    """SIGTERM the server's own process; SIGKILL it if it has not exited after ``timeout`` seconds."""
    if server.process.poll() is not None:
        return
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@contextmanager
def serving(comfyui: Path, python: str, base: Path, port: int, *, keep: bool = False,
            say: Callable[[str], object] = print, extra_args: Sequence[str] = ()) -> Iterator[Server]:
    """``start_server`` for a ``with`` block; on leaving it, ``stop_server`` (or, with ``keep``, say the pid)."""
    server = start_server(comfyui, python, base, port, say=say, extra_args=extra_args)
    try:
        yield server
    finally:
        if keep:
            say(f"server left running: pid {server.pid}")
        else:
            stop_server(server)
            say(f"stopped server pid {server.pid}; log {server.log}")
