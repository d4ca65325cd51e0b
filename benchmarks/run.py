"""Side-by-side throughput matrix: this service against the raw engines it wraps.

    .venv/bin/python benchmarks/run.py                       # all backends, c = 1 8 32, 30 s a cell
    .venv/bin/python benchmarks/run.py --quick               # llama.cpp, c = 1 8, a few seconds a cell, one server per target
    .venv/bin/python benchmarks/run.py --backends vllm --concurrency 1 8 32 --duration 60
    .venv/bin/python benchmarks/run.py --calibrate           # the load generator against a stub

Each cell (backend x concurrency x target) gets a fresh server on 127.0.0.1 (with
--reuse-server one server per backend x target serves all its concurrencies, as for GPU runs
where a start takes minutes), the same model and settings: target `service` is `bentoml serve` with only that alias loaded, target `raw`
is the engine's own OpenAI server (vLLM's api_server, llama_cpp.server with
interrupt_requests off, `transformers serve --continuous-batching`); target `inprocess` (on
request) drives the alias's backend in-process, without HTTP. Locust streams chats at the cell's
concurrency; the figures go to benchmarks/results/<timestamp>/: results.json, results.md,
tok_s.png, ttft.png, and locust's CSV and HTML report per cell. Cells that fail are kept as
failures; the command then exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llmserve.config import load_settings  # noqa: E402
from llmserve.launcher import BIN, ServerProcess, bentoml_serve, free_port  # noqa: E402

BACKEND_ALIAS = {"llamacpp": "smollm2", "transformers": "smollm2-hf", "vllm": "smollm2-vllm"}


@dataclass
class Cell:
    backend: str
    target: str
    concurrency: int
    ok: bool = False
    error: str = ""
    requests: int = 0
    failures: int = 0
    output_tokens: int = 0
    tok_s: float = 0.0
    ttft_p50: float = 0.0
    ttft_p95: float = 0.0
    itl_p50: float = 0.0
    itl_p95: float = 0.0
    startup_s: float = 0.0
    extra: dict = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# -- servers ------------------------------------------------------------------------------
def service_server(alias: str, config_path: Path | None, log_path: Path) -> ServerProcess:
    """bentoml serve with a configuration where only ``alias`` is preloaded."""
    settings = load_settings(config_path)
    data = yaml.safe_load(Path(config_path or ROOT / "configuration.yaml").read_text())
    for name, model in data["models"].items():
        model["preload"] = name == alias
    data["default_model"] = alias
    if settings.models[alias].task != "generate":
        data["embedding_model"] = alias
    cfg = Path(tempfile.mkstemp(prefix="bench-config-", suffix=".yaml")[1])
    cfg.write_text(yaml.safe_dump(data))
    server = bentoml_serve(log_path, {"LLMSERVE_CONFIG": str(cfg)})
    server.config_path = cfg
    return server


# the raw servers that reject vLLM's ignore_eos extension (422): their requests stop at EOS
NO_IGNORE_EOS = {"transformers"}


def raw_server(backend: str, alias: str, config_path: Path | None, log_path: Path) -> ServerProcess:
    """The engine's own OpenAI server, with the alias's model and settings."""
    cfg = load_settings(config_path).models[alias]
    port = free_port()
    location = cfg.location()
    if backend == "llamacpp":
        a = cfg.llamacpp
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(location), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(a.n_ctx), "--n_batch", str(a.n_batch),
               "--n_gpu_layers", str(a.n_gpu_layers), "--interrupt_requests", "False",
               "--model_alias", alias]
        if a.n_threads:
            cmd += ["--n_threads", str(a.n_threads)]
        return ServerProcess(cmd, port, log_path, {}, "/v1/models")
    if backend == "vllm":
        import dataclasses

        from vllm.engine.arg_utils import AsyncEngineArgs

        from backends.convert import gguf_to_hf_dir
        from backends.vllm_backend import engine_kwargs

        if str(location).endswith(".gguf"):
            location = gguf_to_hf_dir(Path(location))
        a = cfg.vllm
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--served-model-name", alias,
               "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]
        # the same engine arguments the service's backend passes (swap_space mapped the same way)
        fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        for name, value in engine_kwargs(a, str(location), fields).items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                cmd += [flag] if value else []
            else:
                cmd += [flag, str(value)]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(int(a.kv_cache_space_gib))} if a.kv_cache_space_gib else {}
        if a.tensor_parallel_size > 1 and os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") == "1":
            env["VLLM_ALLREDUCE_USE_SYMM_MEM"] = "0"  # as the service's backend sets it: like for like
        return ServerProcess(cmd, port, log_path, env, "/health")
    if backend == "transformers":
        from backends.convert import gguf_to_hf_dir

        if str(location).endswith(".gguf"):
            location = gguf_to_hf_dir(Path(location))
        a = cfg.transformers
        dtype = "float32" if a.dtype == "auto" and str(cfg.location()).endswith(".gguf") else a.dtype
        cmd = [str(BIN / "transformers"), "serve", str(location), "--continuous-batching", "--host", "127.0.0.1",
               "--port", str(port), "--device", a.device_map or "cpu", "--dtype", dtype]
        if a.attn_implementation:  # the alias's attention kernel, so both sides run the same one
            cmd += ["--attn-implementation", a.attn_implementation]
        server = ServerProcess(cmd, port, log_path, {}, "/health")
        server.model = str(location)  # a pinned transformers serve answers 400 to any other model name
        return server
    raise ValueError(f"no raw server for {backend}")


def stub_server(rate: float, log_path: Path) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "stub_server.py"), "--port", str(port), "--rate", str(rate)]
    return ServerProcess(cmd, port, log_path, {}, "/health")


# -- one cell -----------------------------------------------------------------------------
def warm_up(url: str, model: str) -> None:
    """One short chat before the load, so no cell's first request pays a server's lazy start
    (transformers serve compiles its batching kernels on the first request)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).raise_for_status()


def run_locust(url: str, model: str, concurrency: int, duration: float, args, out: Path,
               ignore_eos: bool = True) -> tuple[list, dict]:
    records = out / "records"
    processes = max(1, min(args.locust_processes, concurrency // 16 or 1))
    cmd = [str(BIN / "locust"), "-f", str(ROOT / "benchmarks" / "locustfile.py"), "ChatUser", "--headless",
           "-H", url, "-u", str(concurrency), "-r", str(concurrency), "-t", f"{int(duration)}s",
           "--stop-timeout", str(int(args.stop_timeout)), "--csv", str(out / "locust"),
           "--html", str(out / "locust.html"), "--only-summary", "--loglevel", "WARNING",
           "--model", model, "--prompt-words", str(args.prompt_words), "--output-tokens", str(args.output_tokens),
           "--records-dir", str(records), "--ignore-eos", str(ignore_eos).lower()]
    if processes > 1:
        cmd += ["--processes", str(processes)]
    subprocess.run(cmd, cwd=ROOT, stdout=(out / "locust.log").open("wb"), stderr=subprocess.STDOUT,
                   timeout=duration + args.stop_timeout + 120)
    rows = []
    for f in records.glob("*.jsonl"):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows, {"locust_processes": processes}


def summarize(cell: Cell, rows: list[dict]) -> None:
    good = [r for r in rows if "error" not in r]
    cell.requests, cell.failures = len(rows), len(rows) - len(good)
    if not good:
        cell.error = cell.error or (rows[0]["error"] if rows else "no request finished")
        return
    cell.output_tokens = sum(r["tokens"] for r in good)
    span = max(r["start"] + r["latency"] for r in good) - min(r["start"] for r in good)
    cell.tok_s = cell.output_tokens / span if span > 0 else 0.0
    ttft = [r["ttft"] for r in good]
    itl = [r["itl"] for r in good if r["tokens"] > 1]
    cell.ttft_p50, cell.ttft_p95 = pct(ttft, 0.5), pct(ttft, 0.95)
    cell.itl_p50, cell.itl_p95 = pct(itl, 0.5), pct(itl, 0.95)
    cell.extra["mean_tokens_per_request"] = statistics.mean(r["tokens"] for r in good)
    cell.ok = cell.failures == 0


def start_server(backend: str, target: str, alias: str, args, log_path: Path) -> ServerProcess:
    if target == "stub":
        return stub_server(args.stub_rate, log_path)
    if target == "service":
        return service_server(alias, args.config, log_path)
    return raw_server(backend, alias, args.config, log_path)


def gpu_pids() -> set[int] | None:
    """PIDs holding a GPU context (nvidia-smi), or None where there is no NVIDIA driver."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {int(x) for x in r.stdout.split() if x.strip().isdigit()} if r.returncode == 0 else None


def stop_server(server: ServerProcess, record: dict) -> None:
    """Stops the server (SIGTERM to its process group) and records, on a GPU machine, whether
    any process of its tree still holds a GPU or is still alive afterwards."""
    import psutil

    try:
        tree = set(server.pids())
    except psutil.NoSuchProcess:
        tree = set()
    on_gpu = gpu_pids()
    procs = []
    for pid in tree:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    started = time.monotonic()
    server.stop()
    _, alive = psutil.wait_procs(procs, timeout=60)  # engine workers may outlive their parent a moment
    record["stop_s"] = round(time.monotonic() - started, 1)
    if on_gpu is not None:
        after = gpu_pids()  # None: nvidia-smi did not answer, so nothing is known
        record["gpu_processes_before_stop"] = len(tree & on_gpu)
        record["gpu_processes_left"] = None if after is None else sorted(tree & after)
        record["gpu_processes_after_stop"] = None if after is None else sorted(after)  # anyone's, on any GPU
    record["processes_left"] = sorted(p.pid for p in alive)


def openai_smoke(url: str, model: str) -> dict:
    """One chat and one streamed chat through the official openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return {"chat_completion_tokens": chat.usage.completion_tokens, "stream_chunks": len(chunks),
            "stream_chars": len(text)}


class Servers:
    """The running server of each (backend, target): a fresh one per cell, or with
    --reuse-server the one started for the first cell, until the plan moves on."""

    def __init__(self, args, out_root: Path):
        self.args, self.out_root, self.current = args, out_root, None
        self.failed: dict = {}  # (backend, target) -> why its server did not start

    def get(self, backend: str, target: str, alias: str, out: Path, cell: Cell) -> ServerProcess:
        key = (backend, target)
        if self.current and (self.current[0] != key or not self.args.reuse_server):
            self.close()
        if self.current is None:
            if key in self.failed and self.args.reuse_server:  # no second wait of --startup-timeout
                raise RuntimeError(f"its server did not start for an earlier cell: {self.failed[key]}")
            server = start_server(backend, target, alias, self.args, out / "server.log")
            self.current = (key, server, {"last_cell": cell})
            try:
                cell.startup_s = server.wait_ready(self.args.startup_timeout)
            except RuntimeError as exc:
                self.failed[key] = str(exc).splitlines()[0]
                raise
            log(f"  {backend}/{target}: server up in {cell.startup_s:.1f} s")
            if target == "service":
                # what `resources=` the BentoML service declared for this configuration
                cell.extra["service_resources"] = load_settings(server.config_path).service_resources()
                if self.args.smoke:
                    cell.extra["openai_smoke"] = openai_smoke(server.url, alias)
            warm_up(server.url, getattr(server, "model", alias))
        self.current[2]["last_cell"] = cell
        return self.current[1]

    def close(self) -> None:
        if self.current:
            _, server, state = self.current
            stop_server(server, state["last_cell"].extra.setdefault("shutdown", {}))
            self.current = None


def run_cell(backend: str, target: str, c: int, args, out_root: Path, servers: Servers) -> Cell:
    cell = Cell(backend, target, c)
    out = out_root / f"{backend}-{target}-c{c}"
    out.mkdir(parents=True)
    alias = args.alias or BACKEND_ALIAS[backend]
    if target == "inprocess":
        return run_inprocess_cell(cell, alias, args, out)
    try:
        server = servers.get(backend, target, alias, out, cell)
        log(f"  {backend}/{target} c={c}: load for {args.duration:.0f} s")
        model = getattr(server, "model", alias)
        ignore_eos = not (target == "raw" and backend in NO_IGNORE_EOS)
        rows, extra = run_locust(server.url, model, c, args.duration, args, out, ignore_eos)
        cell.extra.update(extra)
        summarize(cell, rows)
    except Exception as exc:  # keep going: a failed cell is reported, not fatal
        cell.error = f"{type(exc).__name__}: {exc}"
        servers.close()  # a server that failed a cell is not trusted with the next one
    finally:
        if not args.reuse_server:
            servers.close()
    status = "ok" if cell.ok else f"FAILED ({cell.error or f'{cell.failures} failed requests'})"
    log(f"  {backend}/{target} c={c}: {cell.tok_s:.1f} tok/s, TTFT p50 {cell.ttft_p50 * 1000:.0f} ms, "
        f"{cell.requests} requests, {status}")
    return cell


def run_inprocess_cell(cell: Cell, alias: str, args, out: Path) -> Cell:
    """The alias's backend driven in-process (benchmarks/inprocess.py): the engine's own limit."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "inprocess.py"), "--alias", alias, "--concurrency",
           str(cell.concurrency), "--duration", str(args.duration), "--output-tokens", str(args.output_tokens),
           "--prompt-words", str(args.prompt_words)] + (["--config", str(args.config)] if args.config else [])
    log(f"  {cell.backend}/inprocess c={cell.concurrency}: {args.duration:.0f} s")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.duration + args.startup_timeout,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (out / "inprocess.log").write_text(r.stdout + r.stderr)
    try:
        result = json.loads(r.stdout.strip().splitlines()[-1])
        cell.requests, cell.output_tokens, cell.tok_s = result["requests"], result["output_tokens"], result["tok_s"]
        cell.ttft_p50, cell.ttft_p95, cell.ok = result["ttft_p50"], result["ttft_p95"], True
    except (IndexError, KeyError, ValueError):
        cell.error = f"in-process run failed (exit {r.returncode}); see {out / 'inprocess.log'}"
    log(f"  {cell.backend}/inprocess c={cell.concurrency}: {cell.tok_s:.1f} tok/s"
        + ("" if cell.ok else f" FAILED ({cell.error})"))
    return cell


# -- reports ------------------------------------------------------------------------------
def write_reports(cells: list[Cell], out: Path, meta: dict) -> None:
    (out / "results.json").write_text(json.dumps({"meta": meta, "cells": [asdict(c) for c in cells]}, indent=2))
    by_target = {t: {(c.backend, c.concurrency): c for c in cells if c.target == t and c.ok} for t in ("raw", "inprocess")}
    lines = [f"# Benchmark {meta['started']}", "", f"`{meta['command']}`", "",
             f"Prompt ~{meta['prompt_words']} words, {meta['output_tokens']} output tokens (ignore_eos), "
             f"{meta['duration']:.0f} s a cell, "
             f"{'one server per target' if meta.get('reuse_server') else 'fresh server per cell'}, "
             "locust on 127.0.0.1.", "",
             "| backend | target | conc. | tok/s | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) | ITL p95 (ms) "
             "| requests | failures | service / raw | service / in-process |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in cells:
        ratios = []
        for t in ("raw", "inprocess"):
            other = by_target[t].get((c.backend, c.concurrency))
            ratios.append(f"{c.tok_s / other.tok_s:.2f}" if c.target == "service" and c.ok and other else "")
        ratio = " | ".join(ratios)
        fail = str(c.failures) if not c.error else f"{c.failures} ({c.error[:60]})"
        lines.append(f"| {c.backend} | {c.target} | {c.concurrency} | {c.tok_s:.1f} | {c.ttft_p50 * 1000:.0f} | "
                     f"{c.ttft_p95 * 1000:.0f} | {c.itl_p50 * 1000:.1f} | {c.itl_p95 * 1000:.1f} | {c.requests} | "
                     f"{fail} | {ratio} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric, label, fname in (("tok_s", "output tokens/s", "tok_s.png"),
                                 ("ttft_p50", "TTFT p50 (s)", "ttft.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in sorted({(c.backend, c.target) for c in cells}):
            pts = sorted((c.concurrency, getattr(c, metric)) for c in cells
                         if (c.backend, c.target) == key and c.ok)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} / {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming chats")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["llamacpp", "transformers", "vllm"])
    p.add_argument("--targets", nargs="+", default=["service", "raw"], choices=["service", "raw", "inprocess"],
                   help="inprocess: the alias's backend without HTTP (the engine's limit)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per cell")
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--config", type=Path, default=None, help="configuration.yaml to take the aliases from")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<time>)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--stop-timeout", type=float, default=120.0, help="seconds locust lets running requests finish")
    p.add_argument("--locust-processes", type=int, default=os.cpu_count() or 1,
                   help="most locust processes per cell (one per 16 users)")
    p.add_argument("--alias", default=None, help="the alias to serve instead of the backend's usual one")
    p.add_argument("--reuse-server", action="store_true",
                   help="one server per backend x target for all its concurrencies (GPU runs)")
    p.add_argument("--smoke", action="store_true",
                   help="before the load, one chat and one streamed chat through the openai client")
    p.add_argument("--quick", action="store_true", help="llama.cpp only, c = 1 and 8, 5 s a cell, one server per target")
    p.add_argument("--calibrate", action="store_true",
                   help="run the load generator against a stub streaming at --stub-rate tokens/s per request")
    p.add_argument("--stub-rate", type=float, default=200.0)
    args = p.parse_args(argv)
    if args.quick:
        args.backends, args.concurrency, args.duration, args.output_tokens = ["llamacpp"], [1, 8], 5.0, 16
        args.reuse_server = True
    unknown = [b for b in args.backends if b not in BACKEND_ALIAS]
    if unknown:
        p.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKEND_ALIAS)}")
    if any(c < 1 for c in args.concurrency):
        p.error("every --concurrency must be at least 1")
    if args.duration <= 0:
        p.error("--duration must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "benchmarks" / "results" / started
    out.mkdir(parents=True, exist_ok=True)
    plan = ([("stub", "stub", c) for c in args.concurrency] if args.calibrate else
            [(b, t, c) for b in args.backends for t in args.targets for c in args.concurrency])
    meta = {"started": started, "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
            "duration": args.duration, "output_tokens": args.output_tokens, "prompt_words": args.prompt_words,
            "stub_rate": args.stub_rate if args.calibrate else None, "cpus": os.cpu_count(),
            "alias": args.alias, "reuse_server": args.reuse_server,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    log(f"{len(plan)} cells -> {out}")
    cells = []
    servers = Servers(args, out)
    try:
        for i, (backend, target, c) in enumerate(plan, 1):
            log(f"cell {i}/{len(plan)}: {backend} / {target} / concurrency {c}")
            if args.calibrate:
                BACKEND_ALIAS.setdefault("stub", "stub")
            cells.append(run_cell(backend, target, c, args, out, servers))
            write_reports(cells, out, meta)  # keep what is finished, whatever happens next
    finally:
        servers.close()
        write_reports(cells, out, meta)  # with the last server's shutdown record
    if args.calibrate:
        for c in cells:
            expected = c.concurrency * args.stub_rate
            log(f"calibration c={c.concurrency}: measured {c.tok_s:.0f} tok/s of {expected:.0f} offered "
                f"({c.tok_s / expected:.0%})")
    print((out / "results.md").read_text())
    failed = [c for c in cells if not c.ok]
    if failed:
        log(f"{len(failed)} of {len(cells)} cells failed: " + ", ".join(f"{c.backend}/{c.target}/c{c.concurrency}"
                                                                        for c in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
