"""The OpenAI API as clients use it, on all three engines (SmolLM2: llama.cpp, Transformers,
vLLM on CPU): structured output, tool calls, logprobs, n, penalties and logit_bias, and a
400 naming the field for what this server does not do."""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import pytest

from tests.conftest import Capital
from tests.test_errors import assert_openai_error

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}




def test_parse_with_a_pydantic_model_returns_a_valid_object(oai, alias):
    completion = oai.chat.completions.parse(model=alias, messages=QUESTION, response_format=Capital,
                                            max_tokens=60, temperature=0)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Capital), message.content
    assert Capital.model_validate_json(message.content) == message.parsed


def test_json_object_mode_answers_a_json_object(http, alias):
    body = {"model": alias, "messages": QUESTION, "max_tokens": 40, "temperature": 0,
            "response_format": {"type": "json_object"}}
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":  # a cut-off object cannot parse; a finished one must
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["message"]["content"].lstrip().startswith("{")


def test_a_named_tool_choice_returns_a_call_whose_arguments_validate_and_its_result_is_answered(oai, alias):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = oai.chat.completions.create(model=alias, messages=messages, tools=[WEATHER, TIME], max_tokens=40,
                                        temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the second turn: the call and its result go back, the model answers in text
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "clear"}'}]
    second = oai.chat.completions.create(model=alias, messages=messages, tools=[WEATHER], tool_choice="none",
                                         max_tokens=12, temperature=0)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


def test_tool_choice_required_always_calls_one_of_the_tools(oai, alias):
    r = oai.chat.completions.create(model=alias, messages=[{"role": "user", "content": "Hello"}], max_tokens=40,
                                    tools=[WEATHER, TIME], tool_choice="required", temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")


def test_tool_calls_stream_as_delta_tool_calls(oai, alias):
    stream = oai.chat.completions.create(model=alias, messages=[{"role": "user", "content": "Weather in Rome?"}],
                                         tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                         max_tokens=40, temperature=0, stream=True)
    name, arguments, finish = None, "", None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:  # the id and name first, then the arguments in pieces
                name = name or d.function.name
                arguments += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_logprobs_give_one_entry_per_token_with_the_greedy_choice_on_top(http, alias):
    body = {"model": alias, "messages": QUESTION, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    data = http.post(CHAT, json=body).json()
    entries = data["choices"][0]["logprobs"]["content"]
    assert len(entries) == data["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in entries) == data["choices"][0]["message"]["content"]
    for e in entries:
        assert len(e["top_logprobs"]) == 3
        assert e["logprob"] <= 0 and all(t["logprob"] <= 0 for t in e["top_logprobs"])
        assert e["token"] == e["top_logprobs"][0]["token"]  # greedy: the most likely token was taken
        assert e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"])
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]


def test_completion_logprobs_in_the_legacy_shape_also_when_streamed(http, alias):
    body = {"model": alias, "prompt": "The sky is", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    plain = http.post(COMPLETIONS, json=body).json()["choices"][0]
    lp = plain["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(len(top) == 2 for top in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    with http.stream("POST", COMPLETIONS, json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]


def test_n_gives_several_choices_streamed_or_not(http, alias):
    body = {"model": alias, "messages": QUESTION, "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 7}
    data = http.post(CHAT, json=body).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"]["completion_tokens"] == 18
    assert len({c["message"]["content"] for c in data["choices"]}) > 1  # seeds 7, 8, 9 differ
    with http.stream("POST", CHAT, json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = {0: "", 1: "", 2: ""}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    assert texts == {c["index"]: c["message"]["content"] for c in data["choices"]}  # same seeds, same text


def test_a_strong_negative_logit_bias_on_the_greedy_first_token_changes_it(http, alias, smollm2_token_id):
    body = {"model": alias, "messages": QUESTION, "max_tokens": 1, "temperature": 0, "logprobs": True}
    first = http.post(CHAT, json=body).json()["choices"][0]["logprobs"]["content"][0]["token"]
    biased = http.post(CHAT, json={**body, "logit_bias": {str(smollm2_token_id(first)): -100}}).json()
    assert biased["choices"][0]["logprobs"]["content"][0]["token"] != first


def test_penalties_make_a_repetitive_greedy_answer_less_repetitive(http, alias):
    body = {"model": alias, "prompt": "Fruits: apple, apple, apple, apple,", "max_tokens": 16, "temperature": 0,
            "logprobs": 0}

    def most_repeated(extra):
        tokens = http.post(COMPLETIONS, json={**body, **extra}).json()["choices"][0]["logprobs"]["tokens"]
        return Counter(tokens).most_common(1)[0][1]

    plain = most_repeated({})
    assert most_repeated({"frequency_penalty": 2.0}) < plain
    assert most_repeated({"presence_penalty": 2.0}) < plain
    assert most_repeated({"repetition_penalty": 2.0}) < plain


UNSUPPORTED = [
    (COMPLETIONS, {"prompt": "Hi", "suffix": "end"}, "suffix"),
    (COMPLETIONS, {"prompt": "Hi", "best_of": 3}, "best_of"),
    (COMPLETIONS, {"prompt": "Hi", "logprobs": 1000}, "logprobs"),
    (CHAT, {"messages": QUESTION, "functions": [{"name": "f", "parameters": {}}]}, "functions"),
    (CHAT, {"messages": QUESTION, "audio": {"voice": "alloy"}}, "audio"),
    (CHAT, {"messages": QUESTION, "tool_choice": "required"}, None),  # no tools to choose from
    (CHAT, {"messages": QUESTION, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
]


@pytest.mark.parametrize("route,body,param", UNSUPPORTED, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(UNSUPPORTED)])
def test_what_is_not_supported_is_a_400_naming_the_field(http, route, body, param):
    err = assert_openai_error(http.post(route, json={"model": "smollm2", "max_tokens": 2, **body}), 400, param=param)
    assert (param or "tool_choice") in err["message"]


def test_hints_are_accepted_and_echo_repeats_the_prompt(http):
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 3, "echo": True, "user": "u-1",
            "metadata": {"team": "a"}, "service_tier": "auto"}
    r = http.post(COMPLETIONS, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith("Once upon a time")
