"""Engine-only throughput of transformers' continuous batching on the Llama-3-8B shape (random
weights, SDPA), no HTTP: 64 requests of 100 prompt / 128 output tokens, twice each, through a
manager built as backends/transformers_paged.py builds it (per-request temperature / top_k / top_p
processors) and through the plain greedy one `transformers serve --continuous-batching` builds.
The first round pays the CUDA graph captures of new batch shapes; the second does not.

    python3 benchmarks/gpu/hf_paged_engine_only.py     # on the GPU machine (issue 27)
"""
import time
import torch, transformers
from transformers import ContinuousBatchingConfig, GenerationConfig
cfg = transformers.AutoConfig.from_pretrained("benchmarks/gpu/llama3-8b-shape")
with torch.device("cuda"):
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
prompts = [[(i * 7919 + j * 31) % 100000 + 10 for j in range(100)] for i in range(64)]
def run(name, gen, cbc, kw):
    m = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc)
    m.warmup(); m.start()
    for rnd in range(2):
        t = time.time()
        ids = [m.add_request(p, max_new_tokens=128, eos_token_id=-1, **kw) for p in prompts]
        done, toks = 0, 0
        while done < len(ids):
            out = m.get_result(timeout=60)
            if out is None: break
            if out.is_finished(): done += 1; toks += len(out.generated_tokens)
        dt = time.time() - t
        print(f"{name} round {rnd}: {toks} tokens in {dt:.2f} s = {toks/dt:.0f} tok/s", flush=True)
    m.stop(block=True, timeout=30)
run("per-request processors (service)", GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.5, eos_token_id=2),
    ContinuousBatchingConfig(max_memory_percent=0.5, max_requests_per_batch=256, per_request_processors=True),
    dict(temperature=0.8, top_k=128256, top_p=1.0))
run("plain greedy (transformers serve's)", GenerationConfig(eos_token_id=2), ContinuousBatchingConfig(), {})
