"""The prompt's logprobs (SamplingParams.prompt_logprobs: what completions' echo + logprobs and
lm-evaluation-harness ask for) and the admission signal (base.ADMITTED), on the engines
themselves, in-process on the real SmolLM2 weights: the Transformers loop (smollm2-hf) and vLLM
(smollm2-vllm), each loaded once here.

The reference is independent of both engines' serving code: one plain forward of the whole prompt
through the AutoModelForCausalLM the Transformers backend loaded (float32, from the same converted
directory vLLM loads), log_softmax at every position."""

from __future__ import annotations

import asyncio

import pytest

from backends.base import ADMITTED, SamplingParams
from backends.text import hf_token_bytes

# ~300 tokens: more than two of the loop's prefill chunks (prefill_chunk 128), so the logprobs of
# the tokens at chunk borders come from the chunk before them
LONG = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a "
    "goldsmith from Mainz, combined movable metal type, oil-based ink and a wooden screw press into a "
    "system that could produce books far faster than any scribe. Before him, texts in Europe were "
    "copied by hand, mostly in monasteries, and a single Bible could take a year to finish. The new "
    "method spread quickly: by 1500 there were presses in more than two hundred and fifty cities, and "
    "millions of volumes had been printed. Prices fell, literacy rose, and ideas travelled farther "
    "than ever before. Scholars could compare identical copies of a text, which made errors easier to "
    "find and knowledge easier to build upon. Pamphlets carried the arguments of the Reformation "
    "across borders within weeks, and newspapers appeared in the following century. Scientists shared "
    "their observations in printed journals, and maps, tables and diagrams could be reproduced "
    "exactly. Some historians argue that the press did not cause these changes by itself, since paper, "
    "trade routes and universities mattered too, but few doubt that it accelerated them. Today the "
    "word press still names the news industry, a reminder of how closely printing and public life "
    "were bound together for five hundred years. The machines themselves changed as well: iron "
    "frames replaced wood, steam replaced muscle, and rotary presses fed by rolls of paper printed "
    "thousands of pages an hour."
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOLERANCE = 2e-4  # the loop prefills in chunks, the reference in one pass (measured: 2.4e-5)
VLLM_TOLERANCE = 2e-3  # another engine's kernels (vLLM's CPU attention), float32 both (measured: 4.6e-5)


def settings(alias: str):
    from llmserve.config import load_settings

    return load_settings().models[alias]


@pytest.fixture(scope="module")
async def hf():
    from backends.transformers_backend import TransformersBackend

    backend = TransformersBackend("smollm2-hf", settings("smollm2-hf"))
    await backend.load()
    yield backend
    await backend.unload()


@pytest.fixture(scope="module")
async def vllm(hf):
    from backends.vllm_backend import VllmBackend

    backend = VllmBackend("smollm2-vllm", settings("smollm2-vllm"))
    await backend.load()
    yield backend
    await backend.unload()


async def reference(hf, prompt: list[int]):
    """log_softmax of one plain forward of ``prompt``: row i is the distribution of token i + 1."""
    import torch

    def forward():
        with torch.no_grad():
            logits = hf.model(input_ids=torch.tensor([prompt], device=hf.model.device)).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    return await asyncio.to_thread(forward)


async def run(backend, prompt: list[int], params: SamplingParams) -> list:
    return [d async for d in backend.generate(prompt, params)]


def tokens(items: list) -> list:
    """The generation's Deltas, without the admission signal."""
    return [d for d in items if d is not ADMITTED]


def text(items: list) -> str:
    return "".join(d.text for d in tokens(items))


def check_against(ref, prompt: list[int], entries: list, k: int, tolerance: float, tokenizer) -> None:
    """One entry per prompt token, None first; each the prompt token's logprob, its bytes, and
    the k most likely there, as the reference has them."""
    import torch

    assert len(entries) == len(prompt)
    assert entries[0] is None
    worst = 0.0
    for i in range(1, len(prompt)):
        entry, row = entries[i], ref[i - 1]
        assert entry is not None, f"position {i} has no entry"
        assert entry.bytes == list(hf_token_bytes(tokenizer, prompt[i])), f"position {i} is not the prompt's token"
        worst = max(worst, abs(entry.logprob - float(row[prompt[i]])))
        assert len(entry.top) == k
        if not k:
            continue
        values, ids = torch.topk(row, k + 1)
        got = [lp for _, _, lp in entry.top]
        assert got == sorted(got, reverse=True)
        for a, b in zip(got, values[:k].tolist()):  # the k best values, whichever of tied tokens holds them
            worst = max(worst, abs(a - b))
        if values[0] - values[1] > 5 * tolerance:  # a clear best token: the same one
            assert entry.top[0][1] == list(hf_token_bytes(tokenizer, int(ids[0]))), f"position {i}"
    assert worst <= tolerance, f"largest difference from the reference: {worst}"


async def test_the_loops_prompt_logprobs_equal_a_plain_forward_of_the_prompt(hf):
    prompt = await hf.encode_text(LONG)
    assert len(prompt) > 2 * hf.config.transformers.prefill_chunk
    ref = await reference(hf, prompt)
    for k in (5, 0):
        items = await run(hf, prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k))
        first = tokens(items)[0]
        assert first.finish_reason == "length"  # lm-evaluation-harness's max_tokens 1: the one Delta
        check_against(ref, prompt, first.prompt_logprobs, k, TOLERANCE, hf.tokenizer)
    # the greedy token after the prompt is the reference's argmax at its last position
    assert first.text == hf.tokenizer.decode([int(ref[-1].argmax())])


async def test_prompt_logprobs_come_on_the_first_delta_only_and_on_a_one_token_prompt_are_one_none(hf):
    prompt = await hf.encode_chat(QUESTION)
    deltas = tokens(await run(hf, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                         prompt_logprobs=1)))
    assert len(deltas) == 6
    assert len(deltas[0].prompt_logprobs) == len(prompt)
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    one = tokens(await run(hf, prompt[:1], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)))
    assert one[0].prompt_logprobs == [None]


async def test_a_request_with_prompt_logprobs_batched_with_others_keeps_every_answer_right(hf):
    long, chat = await hf.encode_text(LONG), await hf.encode_chat(QUESTION)
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    solo = text(await run(hf, chat, plain))
    ref_long, ref_chat = await reference(hf, long), await reference(hf, chat)

    # the plain request decodes while the long prompt prefills in chunks beside it, and a short
    # prompt with logprobs joins too (prefilled in a step that shares its budget with the long one)
    decoding = hf.generate(chat, plain)
    head = [await decoding.__anext__(), await decoding.__anext__()]  # admitted, first token: decoding now
    rest = asyncio.ensure_future(_rest(decoding))
    scored = await asyncio.gather(run(hf, long, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=3)),
                                  run(hf, chat, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                               prompt_logprobs=2)))
    other = head + await rest
    assert hf.batcher.running() == 0
    assert text(other) == solo
    assert all(d.prompt_logprobs is None for d in other)
    check_against(ref_long, long, tokens(scored[0])[0].prompt_logprobs, 3, TOLERANCE, hf.tokenizer)
    check_against(ref_chat, chat, tokens(scored[1])[0].prompt_logprobs, 2, TOLERANCE, hf.tokenizer)
    assert text(scored[1]) == solo  # asking for the prompt's logprobs does not change the greedy answer


async def _rest(stream) -> list:
    return [d async for d in stream]


async def test_the_first_item_a_transformers_stream_yields_is_admitted(hf):
    prompt = await hf.encode_chat(QUESTION)
    items = await run(hf, prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert items[0] is ADMITTED
    assert sum(d is ADMITTED for d in items) == 1
    assert len(items) == 5 and items[-1].finish_reason == "length"


async def test_vllms_prompt_logprobs_equal_the_transformers_reference(hf, vllm):
    assert "prompt_logprobs" in vllm.features
    prompt = await vllm.encode_text(LONG)
    assert prompt == await hf.encode_text(LONG)
    ref = await reference(hf, prompt)
    chat = await vllm.encode_chat(QUESTION)
    plain = SamplingParams(max_tokens=16, temperature=0)
    solo = text(await run(vllm, chat, plain))
    # beside a request without them, which answers as it does alone
    scored, other = await asyncio.gather(
        run(vllm, prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5)), run(vllm, chat, plain))
    check_against(ref, prompt, scored[0].prompt_logprobs, 5, VLLM_TOLERANCE, hf.tokenizer)
    assert scored[0].finish_reason == "length" and len(scored) == 1
    assert text(other) == solo and "Paris" in solo
    assert all(d.prompt_logprobs is None for d in other)
    # k = 0: the prompt's own tokens only, wherever they rank
    zero = await run(vllm, prompt, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0))
    check_against(ref, prompt, zero[0].prompt_logprobs, 0, VLLM_TOLERANCE, hf.tokenizer)
    assert all(d.prompt_logprobs is None for d in zero[1:])
