"""The image `scripts/containerize.sh` builds starts and answers, offline models included, as
a user other than root, writes nothing into its source tree, and stops cleanly on SIGTERM.
`bash scripts/test_container.sh` builds the image and runs this with LLMSERVE_CONTAINER_TEST=1
(CI does, after the suite). Docker runs it where a daemon answers; here
(no daemon, and podman's crun may not set rlimits in a sandbox) `buildah run` with chroot
isolation runs the image's own entrypoint, on the host's network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest

from llmserve.launcher import ServerProcess, free_port
from tests.conftest import ROOT

IMAGE = os.environ.get("LLMSERVE_IMAGE_TAG", "llmserve:cpu")
pytestmark = pytest.mark.skipif(os.environ.get("LLMSERVE_CONTAINER_TEST") != "1",
                                reason="opt-in: bash scripts/test_container.sh")


def docker_works() -> bool:
    """Docker runs the image, unless scripts/test_container.sh says which engine built it."""
    engine = os.environ.get("LLMSERVE_CONTAINER_ENGINE")
    if engine:
        return engine == "docker"
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def container():
    port = free_port()
    if docker_works():
        cmd = ["docker", "run", "--rm", "-p", f"{port}:{port}", IMAGE, "--port", str(port)]
    else:
        ctr = subprocess.run(["buildah", "from", "-q", f"localhost/{IMAGE}"], check=True, capture_output=True,
                             text=True).stdout.strip()
        # the image's own user and entrypoint (no --user: what the image says is what runs)
        cmd = ["buildah", "run", "--isolation", "chroot", ctr, "--",
               "/home/bentoml/bento/env/docker/entrypoint.sh", "--port", str(port)]
    server = ServerProcess(cmd, port, ROOT / ".cache" / "test-container.log")
    server.ctr = None if docker_works() else ctr
    try:
        server.cold_start_s = server.wait_ready(300)
        yield server
    finally:
        family = [psutil.Process(p) for p in server.pids() if psutil.pid_exists(p)]
        server.stop()
        for p in family:  # the chroot runner starts BentoML's workers in a session of their own
            if p.is_running():
                p.kill()
        if not docker_works():
            subprocess.run(["buildah", "rm", ctr], capture_output=True)


def rootfs(container) -> Path:
    """The running container's file system, seen from this host (`buildah mount`: no second
    process in the container, which a `buildah run` beside the server's would be)."""
    if container.ctr is None:
        pytest.skip("checked through buildah only")
    out = subprocess.run(["buildah", "mount", container.ctr], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def servers_of(container) -> list[psutil.Process]:
    """The service's Python processes (BentoML's arbiter and its workers) on this host; not the
    container runner's own (buildah-chroot-exec, which ends its child hard when signalled)."""
    procs = []
    for pid in container.pids():
        try:
            p = psutil.Process(pid)
            if p.cmdline()[:1] == ["/app/.venv/bin/python"]:
                procs.append(p)
        except psutil.NoSuchProcess:
            pass
    return procs


def test_the_image_becomes_ready_with_its_preloaded_models_loaded(container):
    print(f"cold start to /readyz 200: {container.cold_start_s:.1f} s")
    assert httpx.get(f"{container.url}/livez").status_code == 200
    models = {m["id"]: m for m in httpx.get(f"{container.url}/models").json()["data"]}
    assert models["smollm2"]["loaded"] and models["minilm"]["loaded"], models  # before any request


def test_chat_streaming_embeddings_and_models_answer_from_inside(container):
    url = container.url
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 8
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["object"] == "chat.completion.chunk"
    emb = httpx.post(f"{url}/v1/embeddings", timeout=60, json={"model": "minilm", "input": ["a cat"]})
    assert emb.status_code == 200 and len(emb.json()["data"][0]["embedding"]) == 384
    models = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert models["smollm2"]["loaded"] and models["minilm"]["loaded"]


def test_the_service_runs_as_a_user_other_than_root(container):
    procs = servers_of(container)
    assert procs, "no service process found"
    assert all(p.uids().real != 0 for p in procs), [(p.pid, p.name(), p.uids()) for p in procs]


def test_nothing_is_written_into_the_source_tree(container):
    # the first start converts the shipped GGUF (Q8_0): into the user's cache, not under src/
    root = rootfs(container)
    src = root / "home/bentoml/bento/src"
    built = (src / "service.py").stat().st_mtime
    written = [str(p) for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts
               and p.stat().st_mtime > built]
    assert written == []
    assert list((root / "home/bentoml/.cache/llmserve/models").glob("*.Q8_0.gguf"))


def test_no_compiler_in_the_image(container):
    root = rootfs(container)
    assert [t for t in ("gcc", "cc", "cmake", "c++") if (root / "usr/bin" / t).exists()] == []


def test_sigterm_stops_every_process_cleanly(container):
    """Last: stops the container's service the way an orchestrator does."""
    procs = servers_of(container)
    arbiter = next(p for p in procs if p.ppid() not in {q.pid for q in procs})  # `bentoml serve`
    assert "serve" in arbiter.cmdline(), arbiter.cmdline()
    arbiter.terminate()
    _, alive = psutil.wait_procs(procs, timeout=90)
    assert not alive, [(p.pid, p.name(), p.cmdline()) for p in alive]  # none needed a SIGKILL
