"""The seed's vLLM promises, through the service on one GPU: each alias of claims.yaml in a fresh
`bentoml serve` (start time, GPU memory and KV cache from GET /models/{alias}), streamed at
c = 1 and 32 with the project's locust harness; then the `gptq` alias, which must fail to
load with a message naming the method while the service keeps answering.

    python3 benchmarks/gpu/vllm_claims.py --out $OUT --duration 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import Cell, run_locust, summarize, warm_up  # noqa: E402

from llmserve.launcher import bentoml_serve  # noqa: E402

CONFIG = ROOT / "benchmarks" / "gpu" / "claims.yaml"
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def awq_shape_dir(dst: Path) -> None:
    """The 8B config with an AWQ quantization_config (the weights are vLLM's dummy ones)."""
    if dst.exists():
        return
    shutil.copytree(ROOT / "benchmarks" / "gpu" / "llama3-8b-shape", dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(quantization_config=AWQ, torch_dtype="float16")
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def serve(alias: str, out: Path):
    data = yaml.safe_load(CONFIG.read_text())
    for name, model in data["models"].items():
        model["preload"] = name == alias
    data["default_model"] = alias
    cfg = Path(tempfile.mkstemp(prefix="claims-", suffix=".yaml")[1])
    cfg.write_text(yaml.safe_dump(data))
    return bentoml_serve(out / f"{alias}.log", {"LLMSERVE_CONFIG": str(cfg)})


def claim(alias: str, args) -> dict:
    server = serve(alias, args.out)
    row = {"alias": alias}
    try:
        row["startup_s"] = round(server.wait_ready(900), 1)
        model = httpx.get(f"{server.url}/models/{alias}", timeout=10).json()
        row.update(error=model.get("error"), memory=model.get("memory"), kv_cache=model.get("kv_cache"))
        if model.get("loaded") and alias not in args.facts_only:
            warm_up(server.url, alias)
            for c in args.concurrency:
                cell = Cell("vllm", alias, c)
                cell_out = args.out / f"{alias}-c{c}"
                cell_out.mkdir(parents=True, exist_ok=True)
                records, _ = run_locust(server.url, alias, c, args.duration, args, cell_out)
                summarize(cell, records)
                row[f"c{c}"] = {k: v for k, v in asdict(cell).items() if k in ("tok_s", "ttft_p50", "requests", "ok")}
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        server.stop()
    return row


def gptq_refused(out: Path) -> dict:
    """A method the model cannot run: the load fails naming it, the service keeps serving."""
    server = serve("bf16", out)
    try:
        server.wait_ready(900)
        r = httpx.post(f"{server.url}/models/gptq/load", timeout=600)
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"model": "bf16", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        return {"alias": "gptq", "load_status": r.status_code, "load_answer": r.json(), "chat_after": chat.status_code}
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--aliases", nargs="+", default=["bf16", "fp8", "awq", "eager", "gmu-0.5", "gptq"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    p.add_argument("--facts-only", nargs="*", default=["gmu-0.5"], help="aliases to load and describe, not stream")
    args = p.parse_args()
    args.prompt_words, args.output_tokens, args.locust_processes, args.stop_timeout = 64, 128, 4, 60
    args.out.mkdir(parents=True, exist_ok=True)
    awq_shape_dir(Path("/tmp/llama3-8b-awq-shape"))
    rows = []
    for alias in args.aliases:
        row = gptq_refused(args.out) if alias == "gptq" else claim(alias, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
        # written after each alias, so a run cut short keeps what it measured
        (args.out / "claims.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
