"""One real `bentoml serve` per test session, on the shipped configuration.yaml.

Every test that talks HTTP shares it (starting engines is the slow part). Its log goes
to .cache/test-server.log and is printed when it fails to start.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel, Field

from llmserve.launcher import ServerProcess, bentoml_serve

ROOT = Path(__file__).resolve().parent.parent
GENERATIVE = ["smollm2", "smollm2-hf"]  # llama.cpp, Transformers
ALL_GENERATIVE = GENERATIVE + ["smollm2-vllm"]  # + vLLM (loaded by the vllm fixture)
STARTUP_TIMEOUT = float(os.environ.get("LLMSERVE_TEST_STARTUP_TIMEOUT", "300"))
# fault injection (backends/faults.py): a request with one of these seeds fails at that stage of
# the engine's step; no other test sends these seeds (tests/test_isolation.py)
FAULT_SEEDS = {"admit": 424_242_001, "sample": 424_242_002, "detokenize": 424_242_003, "loop": 424_242_004,
               "trim": 424_242_005}
FAULTS_ENV = ",".join(f"{stage}:{seed}" for stage, seed in FAULT_SEEDS.items())
# LoRA adapters the session server serves beside configuration.yaml's (tests/test_lora.py writes the
# bad ones): a third good one for eviction past a limit of 2, and one of each way to not fit
LORA_ENV = {
    "LLMSERVE_LIMITS__MAX_LOADED_ADAPTERS": "2",
    "LLMSERVE_MODELS__SMOLLM2-HF__ADAPTERS__GAMMA": ".cache/lora/alpha",
    "LLMSERVE_MODELS__SMOLLM2-HF__ADAPTERS__MISSING": ".cache/lora-bad/missing",
    "LLMSERVE_MODELS__SMOLLM2-HF__ADAPTERS__WRONG-MODULES": ".cache/lora-bad/wrong-modules",
    "LLMSERVE_MODELS__SMOLLM2-HF-PAGED__ADAPTERS__ALPHA": ".cache/lora/alpha",
    "LLMSERVE_MODELS__SMOLLM2-VLLM__VLLM__MAX_LORA_RANK": "8",
    "LLMSERVE_MODELS__SMOLLM2-VLLM__ADAPTERS__RANK16": ".cache/lora-bad/rank16",
    "LLMSERVE_MODELS__SMOLLM2-VLLM__ADAPTERS__WRONG-MODULES": ".cache/lora-bad/wrong-modules",
}


BOUND = 30.0  # seconds: what a condition the tests wait on may take on a busy 2-core machine


def wait_for(condition, what: str, bound: float = BOUND, every: float = 0.1) -> None:
    """Waits until ``condition()`` holds, failing with ``what`` after ``bound`` seconds (a bound
    that holds on a busy 2-core machine), checking ``every`` so many seconds."""
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, f"{what}, still after {bound:.0f} s"
        time.sleep(every)


def has_content(chunk) -> bool:
    """Whether a chat stream's chunk (parsed, or its SSE `data: ` line) carries generated text:
    the first chunk only names the role, before any token."""
    if isinstance(chunk, str):
        if not chunk.startswith("data: {"):
            return False
        chunk = json.loads(chunk[6:])
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or [])


def start_server(env_overrides: dict[str, str] | None = None, name: str = "test-server") -> ServerProcess:
    (ROOT / ".cache").mkdir(exist_ok=True)
    # room for every alias the suite loads, so no test sees another model evicted
    # stored responses go to a fresh file under .cache, not the user's ~/.local/share
    store = tempfile.NamedTemporaryFile(dir=ROOT / ".cache", prefix=f"{name}-responses-", suffix=".sqlite3",
                                        delete=False).name
    # a request without max_tokens may run to the end of the context (up to ~2000 tokens here):
    # the suite's servers stop such requests at 256, as the shipped default did before
    # (11 aliases in a full run)
    env = {"LLMSERVE_LIMITS__MAX_LOADED_MODELS": "12", "LLMSERVE_FAULTS": FAULTS_ENV, **LORA_ENV,
           "LLMSERVE_LIMITS__DEFAULT_MAX_TOKENS": "256",
           "LLMSERVE_RESPONSES__STORE_PATH": store,
           # files and batches (and their files) in a folder of this server's own
           "LLMSERVE_BATCHES__STORE_PATH": str(Path(tempfile.mkdtemp(dir=ROOT / ".cache", prefix=f"{name}-batches-"))
                                               / "batches.sqlite3"), **(env_overrides or {})}
    server = bentoml_serve(ROOT / ".cache" / f"{name}.log", env)
    try:
        server.wait_ready(STARTUP_TIMEOUT)
    except RuntimeError as exc:
        server.stop()
        pytest.fail(f"bentoml serve did not become ready: {exc}")
    return server


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the shared server shows the end of that server's log (what CI
    prints is often all there is to go on), less the access lines of the polls tests wait with
    (/metrics and GET /v1/models/{name})."""
    report = yield
    server = getattr(item, "funcargs", {}).get("server")
    if report.failed and server is not None and server.log_path.exists():
        polls = ("path=/metrics", "method=GET,path=/v1/models/")
        lines = [ln for ln in server.log_path.read_text(errors="replace").splitlines()
                 if not any(p in ln for p in polls)]
        report.sections.append(("test-server.log, last 60 lines", "\n".join(ln[:400] for ln in lines[-60:])))
    return report


@pytest.fixture(scope="session")
def server():
    s = start_server()
    yield s
    s.stop()


class Capital(BaseModel):
    """The structured answer the response_format / text.format tests ask for."""

    city: str = Field(max_length=16)  # bounded, so a 135M model's answer always ends
    is_capital: bool


@pytest.fixture(params=ALL_GENERATIVE)
def alias(request):
    """Each of the three engines' chat aliases (vLLM's loaded on first use); a module may override it."""
    if request.param == "smollm2-vllm":
        request.getfixturevalue("vllm_loaded")
    return request.param


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


@pytest.fixture(scope="session")
def smollm2_token_id():
    """The id of a token of SmolLM2's vocabulary (all three aliases share it), from its text."""
    import llama_cpp

    from llmserve.config import load_settings

    path = str(load_settings().models["smollm2"].location())
    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)

    def token_id(text: str) -> int:
        ids = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert len(ids) == 1, (text, ids)
        return ids[0]

    return token_id


@pytest.fixture(scope="session")
def api_schema(server):
    """The service's OpenAPI schema, for schemathesis (tests/test_fuzz.py)."""
    import schemathesis

    return schemathesis.openapi.from_url(f"{server.url}/v1/openapi.json")
