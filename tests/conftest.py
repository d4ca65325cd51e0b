"""One real `bentoml serve` per test session, on the shipped configuration.yaml.

Every test that talks HTTP shares it (starting engines is the slow part). Its log goes
to .cache/test-server.log and is printed when it fails to start.
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
import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATIVE = ["smollm2", "smollm2-hf"]  # llama.cpp, Transformers
ALL_GENERATIVE = GENERATIVE + ["smollm2-vllm"]  # + vLLM (loaded by the vllm fixture)
STARTUP_TIMEOUT = float(os.environ.get("LLMSERVE_TEST_STARTUP_TIMEOUT", "300"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path):
        self.port, self.proc, self.log = port, proc, log
        self.url = f"http://127.0.0.1:{port}"

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
        """The value of one Prometheus sample on /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            key, _, value = line.rpartition(" ")
            got = key[len(name) :].strip("{}")
            parts = dict(p.split("=", 1) for p in got.split(",") if "=" in p)
            if all(parts.get(k) == f'"{v}"' for k, v in labels.items()) or (not want and not got):
                total += float(value)
        return total


def start_server(env_overrides: dict[str, str] | None = None, name: str = "test-server") -> Server:
    port = free_port()
    log = ROOT / ".cache" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # room for every alias the suite loads, so no test sees another model evicted
           "LLMSERVE_LIMITS__MAX_LOADED_MODELS": "8",
           # every `bentoml serve` wipes $BENTOML_HOME/prometheus_multiproc_dir at start: a home
           # of its own keeps another server (the benchmark tests start some) off its metrics
           "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-home-"), **(env_overrides or {})}
    bentoml = Path(sys.executable).parent / "bentoml"
    proc = subprocess.Popen(
        [str(bentoml), "serve", "service:LLMService", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(port, proc, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    tail = log.read_text(errors="replace")[-4000:]
    pytest.fail(f"bentoml serve did not become ready in {STARTUP_TIMEOUT:.0f} s; log tail:\n{tail}")


def stop_server(server: Server) -> None:
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(server.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def server():
    s = start_server()
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def vllm_loaded(server):
    """Loads smollm2-vllm once (the engine takes ~30-60 s to start on CPU)."""
    r = httpx.post(f"{server.url}/models/smollm2-vllm/load", timeout=600)
    assert r.status_code == 200, r.text
    return "smollm2-vllm"


@pytest.fixture(scope="session")
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client
