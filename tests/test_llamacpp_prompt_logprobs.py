"""llama.cpp's slot loop, in-process on the shipped GGUF: a prompt's logprobs (echo + logprobs,
lm-evaluation-harness's loglikelihood) read off the prefill, cached prefixes and chunked prefill
included; seeds that repeat whatever integer they are; and the ADMITTED item that starts a
request's time limits."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from backends.base import ADMITTED, SamplingParams

TOLERANCE = 2e-3  # nats: the same weights decoded in other batch shapes round differently


@pytest.fixture(scope="module")
async def backend():
    from backends.llamacpp_backend import LlamaCppBackend
    from llmserve.config import load_settings

    backend = LlamaCppBackend("smollm2", load_settings().models["smollm2"])
    await backend.load()
    yield backend
    await backend.unload()


@pytest.fixture(scope="module")
def reference(backend):
    """Prompt logprobs computed apart from the slot loop: llama-cpp-python's own ``Llama`` with
    logits at every position (logits_all), on the very file the backend loaded (the Q8_0 copy),
    with flash attention as the backend's context has it (llama.cpp's "auto" turns it on for
    CPU; without it the logprobs of this model differ by up to 0.27 nats)."""
    import llama_cpp

    from backends.text import log_softmax

    llm = llama_cpp.Llama(model_path=backend._model_path(), n_ctx=1024, n_batch=512, logits_all=True,
                          flash_attn=True, n_threads=2, verbose=False)

    def prompt_logprobs(ids: list[int]) -> list[np.ndarray]:
        """Row i: the log-probabilities over the vocabulary of the token after ids[:i + 1]."""
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
        return [log_softmax(row) for row in scores]

    yield prompt_logprobs
    llm.close()


async def generate(backend, ids: list[int], **fields) -> list:
    """Every item the generation yields, ADMITTED included."""
    params = SamplingParams(**{"max_tokens": 1, "temperature": 0.0, **fields})
    return [item async for item in backend.generate(ids, params)]


async def prompt_logprobs_of(backend, ids: list[int], k: int = 1, **fields) -> list:
    items = await generate(backend, ids, prompt_logprobs=k, **fields)
    deltas = [d for d in items if d is not ADMITTED]
    assert all(d.prompt_logprobs is None for d in deltas[1:]), "only the first Delta carries them"
    assert deltas[0].prompt_logprobs is not None
    return deltas[0].prompt_logprobs


def assert_matches_reference(backend, ids: list[int], entries: list, rows: list[np.ndarray], k: int) -> None:
    assert len(entries) == len(ids)
    assert entries[0] is None  # nothing comes before the first token
    for j in range(1, len(ids)):
        entry, want = entries[j], rows[j - 1]
        assert bytes(entry.bytes) == backend.scheduler._token_bytes(ids[j]), j
        assert entry.logprob == pytest.approx(float(want[ids[j]]), abs=TOLERANCE), f"prompt token {j}"
        assert len(entry.top) == k
        best = np.sort(want)[::-1][:k]
        assert [lp for _, _, lp in entry.top] == pytest.approx(list(best), abs=TOLERANCE), f"top at {j}"
        assert entry.top[0][2] >= entry.logprob - TOLERANCE


async def text_ids(backend, text: str) -> list[int]:
    return await backend.encode_text(text)


async def test_a_prompts_logprobs_match_an_independent_reference(backend, reference):
    ids = await text_ids(backend, "The quick brown fox jumps over the lazy dog. Paris is the capital of")
    entries = await prompt_logprobs_of(backend, ids, k=3)
    assert_matches_reference(backend, ids, entries, reference(ids), k=3)


async def test_a_prompt_tokens_logprob_is_what_the_engine_reports_when_it_generates_that_token(backend):
    prefix = await text_ids(backend, "One, two, three, four,")
    items = await generate(backend, prefix, logprobs=2)
    generated = [d for d in items if d is not ADMITTED][0].logprobs[0]
    token = backend.model.tokenize(bytes(generated.bytes), add_bos=False, special=False)
    assert len(token) == 1
    entries = await prompt_logprobs_of(backend, prefix + token, k=2)
    last = entries[-1]
    assert (last.token, last.bytes) == (generated.token, generated.bytes)
    assert last.logprob == pytest.approx(generated.logprob, abs=TOLERANCE)
    assert [t[:2] for t in last.top] == [t[:2] for t in generated.top]
    assert [t[2] for t in last.top] == pytest.approx([t[2] for t in generated.top], abs=TOLERANCE)


async def test_a_prefix_cached_by_a_request_without_them_still_gets_its_prompt_logprobs(backend, reference):
    keeps = record_keeps(backend)
    prefix = await text_ids(backend, "Cached prefix test: the rain in Spain stays mainly in the plain, and")
    first = prefix + await suffix(backend, " the sun shines on the hills.")
    second = prefix + await suffix(backend, " snow falls on the mountains.")
    await generate(backend, first)  # caches the prefix in a slot, without prompt logprobs
    entries = await prompt_logprobs_of(backend, second)
    assert keeps[-1] == 0  # no entries were kept for that prefix: all of it decoded again
    assert_matches_reference(backend, second, entries, reference(second), k=1)


async def test_a_second_request_on_a_cached_prefix_gets_the_same_prompt_logprobs_as_the_first(backend, reference):
    keeps = record_keeps(backend)
    prefix = await text_ids(backend, "Shared prefix test: seven swans swimming, six geese laying,")
    first = prefix + await suffix(backend, " five gold rings.")
    second = prefix + await suffix(backend, " four calling birds.")
    one = await prompt_logprobs_of(backend, first, k=2)
    two = await prompt_logprobs_of(backend, second, k=2)
    assert keeps[-1] >= len(prefix) - 1  # the prefix was not decoded again: its entries came from the slot
    assert two[: len(prefix)] == one[: len(prefix)]
    assert_matches_reference(backend, second, two, reference(second), k=2)
    again = await prompt_logprobs_of(backend, second, k=2)  # the very same prompt: all of it cached
    assert again == two
    wider = await prompt_logprobs_of(backend, second, k=4)  # more top tokens than the slot kept
    assert keeps[-1] == 0
    assert_matches_reference(backend, second, wider, reference(second), k=4)
    narrower = await prompt_logprobs_of(backend, second, k=1)  # fewer: cut from what is kept
    assert keeps[-1] >= len(second) - 1
    assert [e.logprob for e in narrower[1:]] == [e.logprob for e in wider[1:]]
    assert [e.top for e in narrower[1:]] == [e.top[:1] for e in wider[1:]]


async def test_a_prompt_longer_than_one_prefill_chunk_gets_every_tokens_logprob(backend, reference):
    chunk = backend.scheduler.prefill_chunk
    ids = await text_ids(backend, " ".join(f"item {i} is number {i * 7 % 13}." for i in range(80)))
    assert len(ids) > 2 * chunk  # three chunks at least, over three steps
    entries = await prompt_logprobs_of(backend, ids)
    assert_matches_reference(backend, ids, entries, reference(ids), k=1)


async def test_concurrent_requests_with_and_without_prompt_logprobs_keep_their_own_answers(backend, reference):
    prompts = [await text_ids(backend, text) for text in (
        "Concurrent one: the capital of Italy is", "Concurrent two: name three colors:",
        "Concurrent three: a haiku about the sea goes", "Concurrent four: water boils at")]
    asks = [3, None, 1, None]

    async def run(ids, k):
        items = await generate(backend, ids, max_tokens=8, prompt_logprobs=k)
        deltas = [d for d in items if d is not ADMITTED]
        return "".join(d.text for d in deltas), [d.prompt_logprobs for d in deltas]

    alone = [await run(ids, k) for ids, k in zip(prompts, asks)]
    together = await asyncio.gather(*(run(ids, k) for ids, k in zip(prompts, asks)))
    for ids, k, (text, pls), (text_alone, _) in zip(prompts, asks, together, alone):
        assert text == text_alone
        if k is None:
            assert all(pl is None for pl in pls)
        else:
            assert all(pl is None for pl in pls[1:])
            assert_matches_reference(backend, ids, pls[0], reference(ids), k=k)


async def test_a_prompt_of_one_token_gets_one_entry_none(backend):
    ids = (await text_ids(backend, "Hello"))[:1]
    assert await prompt_logprobs_of(backend, ids) == [None]


def test_the_backend_says_it_serves_prompt_logprobs():
    from backends.llamacpp_backend import LlamaCppBackend

    assert "prompt_logprobs" in LlamaCppBackend.features


# -- seeds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, 2**32 - 1, 2**64 + 5])
async def test_a_seed_outside_32_bits_draws_the_same_text_twice(backend, seed):
    ids = await text_ids(backend, "Once upon a time, in a land far away,")
    texts = []
    for _ in range(2):
        items = await generate(backend, ids, max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
        texts.append("".join(d.text for d in items))
    assert texts[0] == texts[1]


def test_every_integer_seed_maps_to_a_32_bit_seed_that_is_not_llama_cpps_random_one():
    import llama_cpp

    from backends.llamacpp_backend import sampler_seed

    assert sampler_seed(None) == llama_cpp.LLAMA_DEFAULT_SEED
    for seed in (-1, -2, 0, 1, 2**31, 2**32 - 2, 2**32 - 1, 2**32, 2**63 - 1, -(2**63), 2**64 + 5):
        got = sampler_seed(seed)
        assert 0 <= got < llama_cpp.LLAMA_DEFAULT_SEED, seed
    assert sampler_seed(42) == 42  # a 32-bit seed stays llama.cpp's own
    assert sampler_seed(-1) != sampler_seed(-2)


# -- admission -----------------------------------------------------------------------------------
async def test_the_first_item_of_a_generation_is_admitted_and_only_the_first(backend):
    ids = await text_ids(backend, "Admission test: hello")
    items = await generate(backend, ids, max_tokens=3)
    assert items[0] is ADMITTED
    assert not any(item is ADMITTED for item in items[1:])
    assert items[-1].finish_reason is not None


# -- helpers -------------------------------------------------------------------------------------
async def suffix(backend, text: str) -> list[int]:
    return backend.model.tokenize(text.encode(), add_bos=False, special=False)


def record_keeps(backend) -> list[int]:
    """The cached tokens each request admitted from now on keeps (what _trim is asked to keep)."""
    scheduler, keeps = backend.scheduler, []
    trim = type(scheduler)._trim

    def recording(slot, keep, request):
        keeps.append(keep)
        return trim(scheduler, slot, keep, request)

    scheduler._trim = recording
    return keeps
