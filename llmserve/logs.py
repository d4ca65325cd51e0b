"""The server's own log lines ("llmserve"), on the console of `bentoml serve`.

BentoML configures logging in each worker after importing the service, with
``disable_existing_loggers``: a logger made at import time is switched off and the root's
level (WARNING) hides INFO. ``setup_logging`` runs at start-up, after that, and turns the
logger back on at the configured level: its records then reach BentoML's own handler, in
BentoML's format. ``log_format: json`` writes one JSON object per line instead, for log
collectors.
"""

from __future__ import annotations

import json
import logging
import sys
import time

log = logging.getLogger("llmserve")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created)),
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    log.disabled = False
    log.setLevel(level)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    if fmt == "json":
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.propagate = False
    else:
        log.propagate = True  # to BentoML's handler on the root logger


def rss_bytes() -> int:
    """This process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss


def gpu_bytes() -> int | None:
    """GPU memory in use on this machine (all processes: vLLM's engine runs in its own), or
    None without a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            total += pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
        return total
    except Exception:  # no NVIDIA driver, no pynvml
        return None


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def log_startup(models: list[dict], on_demand: bool, ui: bool = False) -> None:
    """One line per alias, then where to send requests."""
    for m in models:
        when = "loads at start" if m["preload"] else (
            "loads on its first request" if on_demand else f"load it with POST /models/{m['id']}/load")
        log.info("model %s: %s engine, %s, %s", m["id"], m["backend"], m["task"], when)
    host, port = listening_address()
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    log.info("OpenAI API at %s/v1 (and %s/api/v1); docs at %s/v1/docs; model admin at %s/models; metrics at %s/metrics",
             base, base, base, base, base)
    if ui:
        log.info("web console at %s/ui", base)


def listening_address() -> tuple[str, int]:
    """Where this worker listens. BentoML hands each worker its socket as ``--fd N`` and does
    not tell it the port again (its configuration still says the default, 3000); a duplicate
    of that descriptor says where it is bound."""
    import socket

    if "--fd" in sys.argv:
        fd = int(sys.argv[sys.argv.index("--fd") + 1])
        try:
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as s:  # a dup: closing it is safe
                return s.getsockname()[:2]
        except OSError:
            pass
    return "127.0.0.1", 3000
