"""A prompt that starts like one served before is not computed again, on every engine: llama.cpp's
slots keep their last prompt's tokens, vLLM's prefix cache keeps blocks, and the Transformers loop
keeps recent prompts' keys and values (backends/prefix_cache.py). The answer is the same as when
the prefix was computed, and usage.prompt_tokens_details.cached_tokens (OpenAI's field) says how
many prompt tokens came from the cache."""

from __future__ import annotations

import uuid

# about 600 tokens of system prompt, opened by a word no other test sends: nothing cached shares more
# than the chat template's first few tokens with it
RULES = " ".join(f"Rule {i}: answer briefly and politely." for i in range(60))


def _system() -> str:
    return f"{uuid.uuid4().hex} You are a helpful assistant. {RULES}"


def _ask(http, alias, system, question, stream=False):
    body = {"model": alias, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    if not stream:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]
    body.update(stream=True, stream_options={"include_usage": True})
    text, usage = [], None
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        import json

        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text.extend(c["delta"].get("content") or "" for c in chunk["choices"])
                usage = chunk.get("usage") or usage
    return "".join(text), usage


def test_a_shared_prefix_is_read_from_the_cache_and_the_answer_stays_the_same(http, alias):
    system = _system()
    cold_text, cold = _ask(http, alias, system, "What is the capital of France?")
    assert cold["prompt_tokens"] > 500
    # no engine caches in blocks smaller than 16 tokens (vLLM's), and only the template's opening is shared
    assert cold["prompt_tokens_details"]["cached_tokens"] < 16, cold

    # the same prompt again: all of it but the last token (fed again for its logits), or whole blocks
    again_text, again = _ask(http, alias, system, "What is the capital of France?")
    assert again_text == cold_text
    assert again["prompt_tokens"] == cold["prompt_tokens"]
    assert again["prompt_tokens_details"]["cached_tokens"] >= cold["prompt_tokens"] - 16, again

    # another question after the same system prompt, streamed: the system prompt comes from the cache
    other_text, other = _ask(http, alias, system, "Name a primary color.", stream=True)
    system_tokens = cold["prompt_tokens"] - 20  # the question and the turn markers are ~15 tokens
    # vLLM caches whole blocks (128 tokens on CPU): the block the question starts in is computed
    assert other["prompt_tokens_details"]["cached_tokens"] >= system_tokens - 128, other
    assert other["prompt_tokens_details"]["cached_tokens"] < other["prompt_tokens"]
    assert other_text  # the model answered (a greedy answer from a part-cached prompt)


def test_the_cache_reads_as_the_engines_metric(server, http, alias):
    before = server.metric("llm_prompt_tokens_cached_total", model=alias)
    system = _system()
    _ask(http, alias, system, "What is 2 + 2?")
    _, usage = _ask(http, alias, system, "What is 2 + 2?")
    after = server.metric("llm_prompt_tokens_cached_total", model=alias)
    assert after - before >= usage["prompt_tokens_details"]["cached_tokens"] > 0
