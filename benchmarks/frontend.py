"""The front end's own cost per streamed chunk: the whole service over a stub engine against a
bare FastAPI/uvicorn SSE endpoint streaming the same chunks.

    .venv/bin/python benchmarks/frontend.py                          # c = 1 and 64, 15 s each
    .venv/bin/python benchmarks/frontend.py --concurrency 64 --duration 30 --variants default no-bentoml-metrics
    .venv/bin/python benchmarks/frontend.py --api chat messages      # the Anthropic front beside chat

Targets, each a fresh server on 127.0.0.1 (llmserve.launcher):
  bare     benchmarks/stub_server.py --rate 0 (FastAPI + uvicorn, nothing else)
  service  `bentoml serve` with one alias on benchmarks/stub_engine.py: routes, OpenAI
           operations, SSE encoding, BentoML's middleware, as shipped (variant `default`),
           or with BentoML's HTTP metrics and access log off (`no-bentoml-metrics`:
           configuration.yaml's service.http_metrics / service.access_log false).
An asyncio client keeps ``c`` streams open for the duration (each one chat of --tokens chunks
after another: /v1/chat/completions, or with --api messages Anthropic's /v1/messages, whose
events the service makes from the same chat stream) and counts chunks (SSE events). Reported: chunks/s, wall microseconds per chunk, and the
server's CPU microseconds per chunk (its process tree's CPU time over the chunks it sent):
the last is the front end's cost, whatever the client's share of the cores. Also the client's
own CPU per chunk and chunks per network read (on 2 cores the one-process client is often the
limit). ``--profile [PY_SPY]`` records a py-spy profile of the server in each cell and prints
where its CPU went per chunk (benchmarks/profile_summary.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llmserve.launcher import ServerProcess, bentoml_serve, free_port  # noqa: E402
from llmserve.tracing import EXCLUDED_URLS  # noqa: E402
from benchmarks.profile_summary import summarize  # noqa: E402

VARIANTS = {  # configuration.yaml keys over the stub alias's configuration
    "default": {},
    "no-bentoml-metrics": {"service": {"http_metrics": False, "access_log": False}},
}


def stub_service(log_path: Path, variant: str) -> ServerProcess:
    config = {"default_model": "stub", "load_on_demand": False, "limits": {"max_tokens": 100000},
              "models": {"stub": {"source": "stub", "backend": "benchmarks.stub_engine:StubBackend", "preload": True,
                                  "max_pending": 100_000}}}  # no queue bound: the front end alone is measured
    cfg = Path(tempfile.mkstemp(prefix="frontend-", suffix=".yaml")[1])
    cfg.write_text(yaml.safe_dump({**config, **VARIANTS[variant]}))
    return bentoml_serve(log_path, {"LLMSERVE_CONFIG": str(cfg)})


def bare_server(log_path: Path) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "stub_server.py"), "--port", str(port), "--rate", "0"]
    return ServerProcess(cmd, port, log_path, {}, "/health")


APIS = {  # route and body of each front's streamed request
    "chat": ("/v1/chat/completions", {"ignore_eos": True, "stream_options": {"include_usage": True}}),
    "messages": ("/v1/messages", {}),  # the stub engine never ends early: no ignore_eos needed
}


async def load(url: str, concurrency: int, duration: float, tokens: int, api: str = "chat") -> tuple[int, float, int]:
    """Chunks received, seconds taken and network reads, ``concurrency`` streams at a time."""
    route, extra = APIS[api]
    body = {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True,
            **extra}
    chunks = reads = 0
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def user():
            nonlocal chunks, reads
            while time.perf_counter() < stop_at:
                async with client.stream("POST", route, json=body) as r:
                    r.raise_for_status()
                    async for raw in r.aiter_raw():
                        chunks += raw.count(b"data: ")
                        reads += 1

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        return chunks, time.perf_counter() - start, reads


def cpu_seconds(server: ServerProcess) -> float:
    total = 0.0
    for pid in server.pids():
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def profile(server: ServerProcess, args, path: Path) -> subprocess.Popen:
    """py-spy sampling the server's process tree for the cell (collapsed stacks, for
    benchmarks/profile_summary.py); py-spy from PyPI, on PATH or given by --profile."""
    exe = args.profile if args.profile != "py-spy" else shutil.which("py-spy")
    if not exe:
        raise SystemExit("--profile: py-spy not found (pip install py-spy)")
    return subprocess.Popen([exe, "record", "--pid", str(server.proc.pid), "--subprocesses", "--rate", "500", "--format", "raw",
                             "--nonblocking", "--duration", str(max(1, int(args.duration) - 2)), "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(name: str, server: ServerProcess, args, out: Path, apis: list[str]) -> list[dict]:
    rows = []
    try:
        server.wait_ready(args.startup_timeout)
        for api, c in [(api, c) for api in apis for c in args.concurrency]:
            if c == args.concurrency[0]:
                asyncio.run(load(server.url, 4, 2.0, args.tokens, api))  # warm up
            target = name if api == "chat" else f"{name[:-1]}, {api})"
            folded = out / f"{target.replace(' (', '-').replace(', ', '-').rstrip(')')}-c{c}.folded"
            spy = profile(server, args, folded) if args.profile else None
            cpu0, client0 = cpu_seconds(server), time.process_time()
            chunks, seconds, reads = asyncio.run(load(server.url, c, args.duration, args.tokens, api))
            cpu, client = cpu_seconds(server) - cpu0, time.process_time() - client0
            if spy is not None:
                spy.wait()
            row = {"target": target, "concurrency": c, "chunks": chunks, "seconds": round(seconds, 2),
                   "chunks_per_s": round(chunks / seconds, 1), "wall_us_per_chunk": round(1e6 * seconds / chunks, 1),
                   "server_cpu_us_per_chunk": round(1e6 * cpu / chunks, 1),
                   "client_cpu_us_per_chunk": round(1e6 * client / chunks, 1), "chunks_per_read": round(chunks / reads, 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.profile and folded.exists():
                summary = summarize(folded.read_text().splitlines(), row["server_cpu_us_per_chunk"])
                (folded.with_suffix(".md")).write_text(summary + "\n")
                print(summary, flush=True)
    finally:
        server.stop()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 64])
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--tokens", type=int, default=256, help="chunks per request")
    p.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    p.add_argument("--api", nargs="+", default=["chat"], choices=list(APIS),
                   help="the service's fronts to stream through (the bare baseline streams chat chunks)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--profile", nargs="?", const="py-spy", default=None, metavar="PY_SPY",
                   help="record a py-spy profile of the server during each cell (collapsed stacks in --out)")
    p.add_argument("--startup-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / f"frontend-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    rows = measure("bare", bare_server(out / "bare.log"), args, out, ["chat"])
    for variant in args.variants:
        rows += measure(f"service ({variant})", stub_service(out / f"service-{variant}.log", variant), args, out,
                        args.api)
    bare = {r["concurrency"]: r for r in rows if r["target"] == "bare"}
    lines = [f"`{' '.join(['frontend.py'] + (argv if argv is not None else sys.argv[1:]))}`", "",
             f"{args.tokens} chunks per request, {args.duration:.0f} s per cell.", "",
             "| target | conc. | chunks/s | wall µs/chunk | server CPU µs/chunk | client CPU µs/chunk | chunks per read | "
             "chunks/s vs bare |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = r["chunks_per_s"] / bare[r["concurrency"]]["chunks_per_s"]
        lines.append(f"| {r['target']} | {r['concurrency']} | {r['chunks_per_s']:.0f} | {r['wall_us_per_chunk']:.1f} | "
                     f"{r['server_cpu_us_per_chunk']:.1f} | {r['client_cpu_us_per_chunk']:.1f} | "
                     f"{r['chunks_per_read']:.2f} | {ratio:.2f} |")
    (out / "results.json").write_text(json.dumps({"excluded_urls": EXCLUDED_URLS, "rows": rows}, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
