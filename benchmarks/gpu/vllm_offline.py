"""vLLM's offline batch rate for an alias: the ceiling issue 25 measures the service against.
One `LLM` with the alias's own engine arguments (the ones the service and the raw server get),
N chat prompts built as the benchmark builds them (benchmarks/prompts.py, rendered with the
model's chat template), max_tokens output tokens each, ignore_eos; one warm-up batch, then
`--rounds` timed batches. Prints one JSON line (output tokens / wall seconds per round); `--out`
writes it to a file of its own.

    python3 benchmarks/gpu/vllm_offline.py --config benchmarks/gpu/gpu.yaml --alias smollm2-vllm \
        --batch 256 --output-tokens 128 --prompt-words 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from prompts import prompt_text  # noqa: E402

from backends.vllm_backend import engine_kwargs  # noqa: E402
from llmserve.config import load_settings  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--alias", required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON line here (vLLM logs to stdout)")
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    cfg = load_settings(args.config).models[args.alias]
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    llm = LLM(**engine_kwargs(cfg.vllm, str(cfg.location()), fields))
    tok = llm.get_tokenizer()
    def ids(i: int) -> list[int]:
        out = tok.apply_chat_template([{"role": "user", "content": prompt_text(args.prompt_words, i)}],
                                      add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a dict

    prompts = [{"prompt_token_ids": ids(i)} for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[: min(8, args.batch)], params, use_tqdm=False)  # warm-up
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        rounds.append({"output_tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1)})
    # the prompts repeat (benchmarks/prompts.py has 25 distinct ones, as the locust cells send) and
    # vLLM caches prefixes: later rounds find every prompt cached, so the first round is the figure
    result = json.dumps({"alias": args.alias, "batch": args.batch, "output_tokens_each": args.output_tokens,
                         "prompt_tokens_mean": sum(len(x["prompt_token_ids"]) for x in prompts) / len(prompts),
                         "rounds": rounds, "first_round_tok_s": rounds[0]["tok_s"],
                         "median_tok_s": sorted(r["tok_s"] for r in rounds)[len(rounds) // 2]})
    if args.out:
        args.out.write_text(result + "\n")
    print(result, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
