"""Requests real clients send, answered as OpenAI and vLLM answer them, on all three engines:
nulls for fields left unset, several prompts (text or token ids) in one completions request,
the prompt's own logprobs (echo with logprobs, what evaluation harnesses score with), and
text offsets that run on across a stream's chunks."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from tests.conftest import ALL_GENERATIVE
from tests.test_errors import assert_openai_error

PROMPT = "The capital of France is"


def completion(http, **body):
    r = http.post("/v1/completions", json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def streamed(http, path, body) -> list[dict]:
    chunks = []
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
            elif line.startswith("data: "):
                assert line == "data: [DONE]"
    return chunks


# -- item 8: null is "not given" ----------------------------------------------------------------

NULLS = {"temperature": None, "top_p": None, "n": None, "stream": None, "presence_penalty": None,
         "frequency_penalty": None, "seed": None, "stop": None, "stream_options": None, "user": None,
         "logit_bias": None, "max_tokens": None, "top_k": None, "metadata": None}


def test_nulls_in_a_chat_request_mean_not_given(http, alias):
    body = {"model": alias, "messages": [{"role": "user", "content": "Hi", "name": None}], "max_tokens": 3,
            **{k: v for k, v in NULLS.items() if k != "max_tokens"}, "logprobs": None, "top_logprobs": None,
            "parallel_tool_calls": None, "tools": None, "tool_choice": None, "response_format": None,
            "max_completion_tokens": None}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert len(answer["choices"]) == 1 and answer["choices"][0]["logprobs"] is None  # defaults: n 1, no logprobs
    assert 1 <= answer["usage"]["completion_tokens"] <= 3


def test_nulls_in_a_completions_request_mean_not_given(http, alias):
    body = {"model": alias, "prompt": PROMPT, **NULLS, "max_tokens": 3, "echo": None, "logprobs": None,
            "suffix": None, "best_of": None}
    answer = completion(http, **body)
    assert len(answer["choices"]) == 1 and answer["choices"][0]["logprobs"] is None
    assert not answer["choices"][0]["text"].startswith(PROMPT)  # echo: null is no echo


def test_null_for_a_required_field_is_a_400_naming_it(http):
    assert_openai_error(http.post("/v1/chat/completions", json={"model": "smollm2", "messages": None}), 400,
                        param="messages")


# -- item 9: several prompts, text or token ids ---------------------------------------------------

def test_a_list_of_prompts_answers_n_choices_per_prompt_in_openais_order(http, alias):
    prompts = [PROMPT, "One, two, three,"]
    both = completion(http, model=alias, prompt=prompts, max_tokens=4, n=2)
    alone = [completion(http, model=alias, prompt=p, max_tokens=4)["choices"][0]["text"] for p in prompts]
    choices = both["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    # prompt k's choices are k*n .. k*n+n-1; greedy, so each equals that prompt's answer alone
    assert [c["text"] for c in choices] == [alone[0], alone[0], alone[1], alone[1]]
    single = [completion(http, model=alias, prompt=p, max_tokens=1)["usage"]["prompt_tokens"] for p in prompts]
    assert both["usage"]["prompt_tokens"] == sum(single)  # each prompt counted once, not once per choice


def test_token_id_prompts_answer_as_their_text_does(http, alias, smollm2_token_id):
    words = [" Paris", " is", " a"]
    ids = [smollm2_token_id(w) for w in words]
    text = "".join(words)
    by_ids = completion(http, model=alias, prompt=ids, max_tokens=4, echo=True)
    assert by_ids["choices"][0]["text"].startswith(text)  # echo gives the ids' text
    lists = completion(http, model=alias, prompt=[ids, ids[:2]], max_tokens=2)
    assert [c["index"] for c in lists["choices"]] == [0, 1]
    assert by_ids["choices"][0]["text"][len(text):].startswith(lists["choices"][0]["text"])


def test_a_streamed_list_of_prompts_keeps_each_choices_index(http):
    prompts = [PROMPT, "One, two, three,"]
    chunks = streamed(http, "/v1/completions", {"model": "smollm2", "prompt": prompts, "max_tokens": 4,
                                                "temperature": 0})
    texts = {}
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    alone = [completion(http, model="smollm2", prompt=p, max_tokens=4)["choices"][0]["text"] for p in prompts]
    assert texts == {0: alone[0], 1: alone[1]}


@pytest.mark.parametrize("prompt, why", [([], "empty"), ([[]], "empty"), ([[-1]], "negative")])
def test_bad_prompt_lists_are_400s_naming_prompt(http, prompt, why):
    err = assert_openai_error(http.post("/v1/completions", json={"model": "smollm2", "prompt": prompt}), 400,
                              param="prompt")
    assert why in err["message"]


def test_a_token_id_outside_the_vocabulary_is_a_400_naming_prompt(http):
    assert_openai_error(http.post("/v1/completions", json={"model": "smollm2", "prompt": [[5, 10**7]]}), 400,
                        param="prompt", code="invalid_value")


# -- item 10: the prompt's logprobs ----------------------------------------------------------

def prompt_logprobs(http, alias, prompt, **extra):
    answer = completion(http, model=alias, prompt=prompt, echo=True, logprobs=1, max_tokens=0, **extra)
    return answer, answer["choices"][0]["logprobs"]


def test_echo_with_logprobs_and_no_tokens_gives_the_prompts_logprobs(http, alias):
    answer, lp = prompt_logprobs(http, alias, PROMPT)
    choice = answer["choices"][0]
    assert choice["text"] == PROMPT and answer["usage"]["completion_tokens"] == 0
    assert answer["usage"]["prompt_tokens"] == len(lp["tokens"])
    assert "".join(lp["tokens"]).endswith(PROMPT[1:])  # the tokens spell the prompt (after any BOS)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing before the first
    assert all(v is not None and v <= 0 for v in lp["token_logprobs"][1:])
    assert all(len(top) >= 1 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] < len(PROMPT)


def test_prompt_logprobs_rank_the_right_continuation_above_a_wrong_one(http, alias):
    """What lm-evaluation-harness does for every multiple-choice task: score each continuation
    by the sum of its tokens' logprobs after the context (max_tokens 1, echo, logprobs 1)."""

    def score(continuation: str) -> float:
        answer = completion(http, model=alias, prompt=PROMPT + continuation, echo=True, logprobs=1, max_tokens=1)
        lp, n_prompt = answer["choices"][0]["logprobs"], answer["usage"]["prompt_tokens"]
        start = next(i for i, o in enumerate(lp["text_offset"]) if o >= len(PROMPT))
        return sum(lp["token_logprobs"][start:n_prompt])  # the prompt's tokens after the context

    assert score(" Paris.") > score(" banana.")


def test_streamed_echo_with_logprobs_sends_the_prompts_logprobs_first(http, alias):
    _, whole = prompt_logprobs(http, alias, PROMPT)
    chunks = streamed(http, "/v1/completions", {"model": alias, "prompt": PROMPT, "echo": True, "logprobs": 1,
                                                "max_tokens": 2, "temperature": 0})
    first = chunks[0]["choices"][0]
    assert first["text"] == PROMPT
    assert first["logprobs"]["tokens"] == whole["tokens"]
    assert [round(v, 3) if v is not None else None for v in first["logprobs"]["token_logprobs"]] == \
        [round(v, 3) if v is not None else None for v in whole["token_logprobs"]]


def test_max_tokens_zero_needs_echo(http):
    assert_openai_error(http.post("/v1/completions", json={"model": "smollm2", "prompt": PROMPT, "max_tokens": 0}),
                        400, param="max_tokens")


def test_an_engine_without_prompt_logprobs_says_so_naming_echo(http):
    r = http.post("/v1/completions", json={"model": "smollm2-hf-paged", "prompt": PROMPT, "echo": True,
                                           "logprobs": 1, "max_tokens": 1})
    if r.status_code == 200:  # the paged engine learnt it: then it must be right
        assert r.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None
    else:  # it has no logprobs at all: the first field it lacks is named
        err = assert_openai_error(r, 400, code="unsupported_parameter")
        assert err["param"] in ("echo", "logprobs")


# -- item 7: text offsets of a streamed completion --------------------------------------------

@pytest.mark.parametrize("model", ["smollm2", "smollm2-hf"])
def test_streamed_text_offsets_run_on_across_chunks(http, model):
    chunks = streamed(http, "/v1/completions", {"model": model, "prompt": PROMPT, "logprobs": 0,
                                                "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    offsets, tokens = [], []
    for c in chunks:
        for choice in c["choices"]:
            if choice["logprobs"]:
                offsets += choice["logprobs"]["text_offset"]
                tokens += choice["logprobs"]["tokens"]
    assert len(tokens) == 8
    expected = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert offsets == expected
    whole = completion(http, model=model, prompt=PROMPT, logprobs=0, max_tokens=8, ignore_eos=True)
    assert whole["choices"][0]["logprobs"]["text_offset"] == expected


# -- item 11: no max_tokens ----------------------------------------------------------------------

def test_without_max_tokens_a_generation_may_run_to_the_context_bounded_by_limits_max_tokens():
    """OpenAI and vLLM generate to the end of the context when max_tokens is not given: the
    default is what is left of the context, at most limits.max_tokens (no silent 256)."""
    from backends.base import Backend

    from llmserve.config import load_settings
    from llmserve.schemas import ChatCompletionRequest
    from llmserve.serving.base import Serving

    class Model:  # what _sampling reads of an engine
        features = Backend.features
        name = "stub"

        def context_length(self):
            return 2048

        def vocab_size(self):
            return 100

    settings = load_settings()
    serving = Serving(manager=None, settings=settings)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}])
    assert serving._sampling(req, 48, Model()).max_tokens == min(2048 - 48, settings.limits.max_tokens)
    settings.limits.max_tokens = 300
    assert serving._sampling(req, 48, Model()).max_tokens == 300
