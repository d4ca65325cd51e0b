"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) on all three engines, through
the official `anthropic` SDK: answers, the event stream, a tool round trip under tool_choice any and
a named tool, streamed input_json_delta joining to the unstreamed input, stop sequences, the
max_tokens cut, count_tokens against usage, and bad input answered in Anthropic's error shape.
Keys (x-api-key): tests/test_hardening.py; a client that leaves: tests/test_disconnects.py. ``alias``
(tests/conftest.py) is each engine's chat alias."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"]}}
TIME = {"name": "get_time", "description": "The current time in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# greedy answers, for tests that compare two of them; the SDK (2.16) no longer has a temperature
# argument, but older clients send the field and the server takes it
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def anthropic_error(r: httpx.Response, status: int, field: str | None = None, kind: str = "invalid_request_error"):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    if field is not None:
        assert field in body["error"]["message"], body
    return body["error"]["message"]


def events(sse: str) -> list[tuple[str, dict]]:
    """(event name, data) of each event of an Anthropic stream."""
    out = []
    for block in sse.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]  # the event: line names what the data says it is
        out.append((lines["event"], data))
    return out


def prompt_tokens(usage) -> int:
    """The whole prompt, as Anthropic counts it: tokens read from the prefix cache apart."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)

def test_a_message_answers_with_text_blocks_a_stop_reason_and_usage(claude, alias):
    m = claude.messages.create(model=alias, max_tokens=24, messages=QUESTION, extra_body=GREEDY,
                               system="You answer in one short sentence.")
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == alias
    assert [b.type for b in m.content] == ["text"] and m.content[0].text.strip()
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert prompt_tokens(m.usage) > 10 and 0 < m.usage.output_tokens <= 24
    assert 0 <= m.usage.cache_read_input_tokens < prompt_tokens(m.usage)  # read from the prefix cache


def test_a_stream_sends_anthropics_events_in_order_and_the_same_text_as_the_sdk_builds(claude, server, alias):
    body = {"model": alias, "max_tokens": 16, "messages": QUESTION, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=120,
                      headers={"anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r.read().decode())
    names = [name for name, _ in got]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = got[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 10
    text = "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta")
    delta = got[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert 0 < delta["usage"]["output_tokens"] <= 16
    with claude.messages.stream(model=alias, max_tokens=16, messages=QUESTION, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == streamed == text  # greedy: the same answer each time
    assert final.usage.output_tokens == delta["usage"]["output_tokens"]
    whole = claude.messages.create(model=alias, max_tokens=16, messages=QUESTION, extra_body=GREEDY)
    assert whole.content[0].text == text


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_a_tool_call_its_result_and_the_answer_round_trip(claude, alias, choice):
    messages = [{"role": "user", "content": "What is the weather in Rome?"}]
    first = claude.messages.create(model=alias, max_tokens=48, messages=messages, tools=[WEATHER, TIME],
                                   tool_choice={**choice, "disable_parallel_tool_use": True}, extra_body=GREEDY)
    assert first.stop_reason == "tool_use", first
    (call,) = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" or choice["type"] == "any" and call.name in ("get_weather", "get_time")
    jsonschema.validate(call.input, WEATHER["input_schema"] if call.name == "get_weather" else TIME["input_schema"])
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": [{"type": "text", "text": "sunny, 18 C"}]}]}]
    second = claude.messages.create(model=alias, max_tokens=12, messages=messages, tools=[WEATHER, TIME],
                                    tool_choice={"type": "none"}, extra_body=GREEDY)
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in second.content] == ["text"] and second.content[0].text.strip()


def test_streamed_input_json_deltas_join_to_the_unstreamed_input(claude, server, alias):
    body = {"model": alias, "max_tokens": 48, "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}}
    whole = claude.messages.create(**body, extra_body=GREEDY)
    (call,) = [b for b in whole.content if b.type == "tool_use"]
    r = httpx.post(f"{server.url}/v1/messages", json={**body, **GREEDY, "stream": True}, timeout=120)
    got = events(r.text)
    starts = [d["content_block"] for n, d in got if n == "content_block_start"]
    assert [(b["type"], b["name"], b["input"]) for b in starts if b["type"] == "tool_use"] == [
        ("tool_use", "get_weather", {})]
    fragments = [d["delta"]["partial_json"] for n, d in got
                 if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"]
    assert len(fragments) > 1  # the arguments come as the model writes them, not in one piece
    assert json.loads("".join(fragments)) == call.input
    assert got[-2][1]["delta"]["stop_reason"] == "tool_use" == whole.stop_reason
    with claude.messages.stream(**body, extra_body=GREEDY) as stream:  # the SDK's own accumulation agrees
        assert [b.input for b in stream.get_final_message().content if b.type == "tool_use"] == [call.input]


def test_a_stop_sequence_ends_the_answer_and_is_named(claude, alias):
    free = claude.messages.create(model=alias, max_tokens=24, messages=QUESTION, extra_body=GREEDY).content[0].text
    words = free.split()
    assert len(words) >= 3, free
    stop = " " + words[2]  # a sequence the greedy answer writes, past its start
    cut = claude.messages.create(model=alias, max_tokens=24, messages=QUESTION, extra_body=GREEDY,
                                 stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == free[:free.index(stop)]
    with claude.messages.stream(model=alias, max_tokens=24, messages=QUESTION, extra_body=GREEDY,
                                stop_sequences=[f"never written {i}" for i in range(5)] + [stop]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, final.content[0].text) == ("stop_sequence", stop,
                                                                               cut.content[0].text)


def test_a_final_assistant_turn_is_a_prefill_the_answer_continues(claude, oai, alias):
    free = claude.messages.create(model=alias, max_tokens=24, messages=QUESTION, extra_body=GREEDY).content[0].text
    words = free.split(" ")
    assert len(words) >= 4, free
    prefill = " ".join(words[:2])  # what the model wrote first: the same tokens as it would have made
    prefilled = QUESTION + [{"role": "assistant", "content": prefill}]
    m = claude.messages.create(model=alias, max_tokens=22, messages=prefilled, extra_body=GREEDY)
    rest = m.content[0].text
    assert free.startswith(prefill + rest[:12]), (free, prefill, rest)  # greedy: it writes on as before
    assert claude.messages.count_tokens(model=alias, messages=prefilled).input_tokens == prompt_tokens(m.usage)
    # the chat route takes the same as vLLM's continue_final_message
    chat = oai.chat.completions.create(model=alias, messages=prefilled, max_tokens=22, temperature=0,
                                       extra_body={"continue_final_message": True})
    assert chat.choices[0].message.content == rest
    with pytest.raises(Exception, match="continue_final_message"):
        oai.chat.completions.create(model=alias, messages=QUESTION, max_tokens=2,
                                    extra_body={"continue_final_message": True})


def test_turns_of_one_role_in_a_row_are_one_turn_and_blocks_are_paragraphs(claude):
    def count(messages):
        return claude.messages.count_tokens(model="smollm2", messages=messages).input_tokens

    joined = count([{"role": "user", "content": "Hello there.\n\nWhat is 2+2?"}])
    assert count([{"role": "user", "content": "Hello there."}, {"role": "user", "content": "What is 2+2?"}]) == joined
    assert count([{"role": "user", "content": [{"type": "text", "text": "Hello there."},
                                               {"type": "text", "text": "What is 2+2?"}]}]) == joined


def test_a_prefill_that_ends_in_whitespace_is_refused_and_an_empty_one_ignored(server, claude):
    r = httpx.post(f"{server.url}/v1/messages", timeout=30, json={
        "model": "smollm2", "max_tokens": 2, "messages": QUESTION + [{"role": "assistant", "content": "The "}]})
    anthropic_error(r, 400, "messages")
    empty = claude.messages.count_tokens(model="smollm2", messages=QUESTION + [{"role": "assistant", "content": []}])
    assert empty.input_tokens == claude.messages.count_tokens(model="smollm2", messages=QUESTION).input_tokens


def test_arguments_a_model_writes_freely_go_out_whole_and_only_when_they_parse():
    """tool_choice auto has no grammar: the SDK parses every input_json_delta and fails on a
    fragment that is no JSON prefix, so such calls' arguments are held until complete (in-process,
    the chat stream's call deltas into the SDK's own accumulation)."""
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent
    from pydantic import TypeAdapter

    from llmserve.serving.anthropic import ContentBlocks, Run

    def stream(arguments: list[str], live: bool):
        run, blocks = Run("m"), ContentBlocks(live_arguments=live)
        sse = [blocks.call({"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}})]
        sse += [blocks.call({"index": 0, "function": {"arguments": a}}) for a in arguments]
        sse.append(blocks.close())
        got = events("".join(s for s in sse if s))
        message, bufs = None, {}
        for kind, data in [("message_start", {"type": "message_start", "message": run.message([], None, None, {
                "input_tokens": 1, "output_tokens": 0})})] + got:
            message = accumulate_event(event=TypeAdapter(RawMessageStreamEvent).validate_python(data),
                                       current_snapshot=message, json_bufs=bufs)
        return got, blocks.content[0]["input"], message.content[0].input

    got, ours, sdk = stream(['{"city": ', "'Paris'}"], live=False)  # not JSON: Python's quotes
    assert [d["delta"]["type"] for n, d in got if n == "content_block_delta"] == [] and ours == sdk == {}
    got, ours, sdk = stream(['{"city": ', '"Paris"}'], live=False)
    assert [d["delta"]["partial_json"] for n, d in got if n == "content_block_delta"] == ['{"city": "Paris"}']
    assert ours == sdk == {"city": "Paris"}
    got, ours, sdk = stream(['{"city": ', '"Paris"}'], live=True)  # under a grammar: as written
    assert len([n for n, _ in got if n == "content_block_delta"]) == 2 and ours == sdk == {"city": "Paris"}
    with pytest.raises(ValueError, match="Unable to parse tool parameter JSON"):  # what holding them prevents
        stream(['{"city": ', "'Paris'}"], live=True)


def test_max_tokens_cuts_the_answer_with_stop_reason_max_tokens(claude, alias):
    m = claude.messages.create(model=alias, max_tokens=3, messages=[{"role": "user", "content": "Tell me a story."}],
                               extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3


def test_count_tokens_equals_the_input_tokens_of_the_same_request(claude, alias):
    convo = {"system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
             "messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": [WEATHER, TIME]}
    counted = claude.messages.count_tokens(model=alias, **convo).input_tokens
    used = prompt_tokens(claude.messages.create(model=alias, max_tokens=2, **convo).usage)
    assert counted == used > 20
    plain = claude.messages.count_tokens(model=alias, messages=QUESTION).input_tokens
    assert 0 < plain < counted  # the tools' descriptions and the system text are counted too


# -- bad input, in Anthropic's error shape ------------------------------------------------------
@pytest.mark.parametrize("change, status, field", [
    ({"max_tokens": None}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}]}]},
     400, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, 400,
     "messages.0.content.0.type"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "thinking"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "tools.0.type"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": 5}}]}, 400, "tools.0.input_schema"),
    ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]}, 400, "tool_choice.name"),
    ({"temperature": 1.5}, 400, "temperature"),
    ({"stop_sequences": [""]}, 400, "stop_sequences"),
    ({"model": "no-such-model"}, 404, "model"),
])
def test_bad_input_is_refused_in_anthropics_shape_naming_the_field(server, change, status, field):
    body = {"model": "smollm2", "max_tokens": 4, "messages": QUESTION, **change}
    r = httpx.post(f"{server.url}/v1/messages", json={k: v for k, v in body.items() if v is not None}, timeout=60)
    anthropic_error(r, status, field, "not_found_error" if status == 404 else "invalid_request_error")


def test_the_sdk_raises_its_own_error_classes_and_the_server_keeps_serving(claude):
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="smollm2", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=QUESTION)
    assert claude.messages.create(model="smollm2", max_tokens=2, messages=QUESTION).usage.output_tokens > 0


def test_invalid_json_and_unknown_block_types_are_400s_not_500s(server):
    r = httpx.post(f"{server.url}/v1/messages", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    anthropic_error(r, 400)
    # bodies FastAPI cannot even read (its HTTPException, not a validation error)
    for raw in (b'{"model": "smollm2", "max_tokens": 2, "messages": [{"role": "user", "content": "\xff"}]}',
                b'{"model": ' + b"[" * 100_000):
        r = httpx.post(f"{server.url}/v1/messages", content=raw, timeout=30, headers={"content-type": "application/json"})
        anthropic_error(r, 400)
    r = httpx.post(f"{server.url}/api/v1/messages", timeout=30, json={
        "model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "video"}]}]})
    anthropic_error(r, 400, "messages.0.content.0.type")
    r = httpx.post(f"{server.url}/v1/messages/count_tokens", timeout=30, json={"model": "smollm2", "messages": [
        {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "hi"}]}]})
    anthropic_error(r, 400, "messages.0.content.0.type")


def test_the_bentoml_native_api_answers_as_the_route_does(server):
    import bentoml

    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        body = json.loads("".join(client.messages(model="smollm2", max_tokens=3, messages=QUESTION, temperature=0)))
        assert body["type"] == "message" and body["usage"]["output_tokens"] <= 3
        sse = "".join(client.messages(model="smollm2", max_tokens=3, messages=QUESTION, stream=True))
    names = [name for name, _ in events(sse)]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    # what the operation refuses comes in Anthropic's shape; a body that fails the API's own schema
    # is refused by BentoML before the operation runs, in BentoML's shape, as on every native API
    r = httpx.post(f"{server.url}/messages", json={"model": "nope", "max_tokens": 2, "messages": QUESTION}, timeout=30)
    anthropic_error(r, 404, "model", "not_found_error")
    r = httpx.post(f"{server.url}/messages", json={"model": "smollm2", "messages": QUESTION}, timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.text
