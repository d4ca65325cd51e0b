"""Starts a server as a child process, waits until it answers, and stops it with its children.

The one helper the tests and the benchmarks use for `bentoml serve` and for the engines' own
servers: each server gets its own process group (so stopping it stops the engine processes it
spawned), its log in a file, and a readiness URL polled until it answers 200.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .config import PROJECT_ROOT

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
                 ready_path: str = "/readyz"):
        self.port, self.url, self.log_path, self.ready_path = port, f"http://127.0.0.1:{port}", log_path, ready_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env={**os.environ, **(env or {})},
                                     stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until the readiness URL answered 200; RuntimeError (with the log's tail)
        when the process exits or the time runs out first."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def pids(self) -> list[int]:
        import psutil

        parent = psutil.Process(self.proc.pid)
        return [parent.pid] + [c.pid for c in parent.children(recursive=True)]

    def rss_bytes(self) -> int:
        import psutil

        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def metric(self, name: str, **labels) -> float:
        """The sum of the Prometheus samples ``name`` on /metrics whose labels include ``labels``
        (0 when absent)."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if not line.startswith((name + "{", name + " ")):
                continue
            key, _, value = line.rpartition(" ")
            parts = dict(p.split("=", 1) for p in key[len(name):].strip("{}").split(",") if "=" in p)
            if all(parts.get(k) == f'"{v}"' for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


def bentoml_serve(log_path: Path, env: dict[str, str] | None = None, port: int | None = None) -> ServerProcess:
    """`bentoml serve service:LLMService` on 127.0.0.1, offline, with a BENTOML_HOME of its own:
    every `bentoml serve` wipes the Prometheus folder in its home at start, which would break
    the metrics of another server sharing it."""
    port = port or free_port()
    cmd = [str(BIN / "bentoml"), "serve", "service:LLMService", "--host", "127.0.0.1", "--port", str(port)]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-home-"), **(env or {})}
    return ServerProcess(cmd, port, log_path, env, "/readyz")
