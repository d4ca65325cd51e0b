"""The Responses API (/v1/responses) through the official `openai` client, on all three engines
(SmolLM2: llama.cpp, Transformers, vLLM on CPU): answers and usage, the streamed event
sequence, function tools, structured output, stored responses that continue a conversation
(also after a restart), retrieve / delete, and a 400 naming the field for what this server
does not do."""

from __future__ import annotations

import json
import time

import bentoml
import httpx
import openai
import pytest

from tests.conftest import BOUND, Capital, start_server
from tests.test_errors import assert_openai_error

QUESTION = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False},
    "strict": True,
}
TEXT_EVENTS = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
               "response.output_text.done", "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]




def collapsed(types: list[str]) -> list[str]:
    """Event types with runs of the same delta event counted once."""
    out: list[str] = []
    for t in types:
        if not (out and t == out[-1] and t.endswith(".delta")):
            out.append(t)
    return out


def assert_usage(usage, max_output: int) -> None:
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= max_output
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    # cached: the prompt tokens the engine's prefix cache held (the same prompts run on several tests)
    assert 0 <= usage.input_tokens_details.cached_tokens < usage.input_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_create_answers_one_message_with_usage(oai, alias):
    r = oai.responses.create(model=alias, input=QUESTION, max_output_tokens=12, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == alias
    assert r.status in ("completed", "incomplete")
    assert [item.type for item in r.output] == ["message"]
    message = r.output[0]
    assert message.role == "assistant" and message.status == r.status and message.id.startswith("msg_")
    assert [part.type for part in message.content] == ["output_text"] and r.output_text.strip()
    assert_usage(r.usage, 12)
    if r.status == "incomplete":
        assert r.usage.output_tokens == 12 and r.incomplete_details.reason == "max_output_tokens"


def test_stream_sends_every_event_in_order_numbered_and_the_same_text(oai, alias):
    args = dict(model=alias, input=QUESTION, max_output_tokens=12, temperature=0)
    whole = oai.responses.create(**args)
    with oai.responses.stream(**args) as stream:
        events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert collapsed([e.type for e in events]) == ["response.created", "response.in_progress", *TEXT_EVENTS, final]
    assert events[0].response.status == "in_progress" and events[0].response.id == events[-1].response.id
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas == done.text == whole.output_text  # greedy: the stream says what the single answer says
    streamed = events[-1].response
    assert streamed.output_text == whole.output_text and streamed.status == whole.status
    assert streamed.usage.output_tokens == whole.usage.output_tokens
    assert streamed.usage.input_tokens == whole.usage.input_tokens
    added = next(e for e in events if e.type == "response.output_item.added").item
    assert streamed.output[0].id == added.id


def test_function_tool_round_trip_with_function_call_output(oai, alias):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oai.responses.create(model=alias, input=ask, tools=[WEATHER], tool_choice="required", max_output_tokens=40,
                             temperature=0)
    assert r.status == "completed", r.output
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    assert set(json.loads(call.arguments)) == {"city"}
    answer = oai.responses.create(
        model=alias, tools=[WEATHER], tool_choice="none", max_output_tokens=16, temperature=0,
        input=ask + [call.model_dump(exclude_none=True),
                     {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}])
    assert [item.type for item in answer.output] == ["message"] and answer.output_text.strip()
    # the same conversation through the chat route: the same prompt, the same greedy answer
    chat = oai.chat.completions.create(
        model=alias, max_tokens=16, temperature=0, tool_choice="none",
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        messages=ask + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "18 C and sunny"}])
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.output_text == chat.choices[0].message.content


def test_streamed_function_call_events_and_final_response(oai, alias):
    args = dict(model=alias, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
                max_output_tokens=40, temperature=0)
    whole = oai.responses.create(**args)
    with oai.responses.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert collapsed([e.type for e in events]) == ["response.created", "response.in_progress", *CALL_EVENTS,
                                                   "response.completed"]
    [call] = final.output
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert call.type == "function_call" and call.arguments == done.arguments == whole.output[0].arguments
    assert call.name == whole.output[0].name == "get_weather"


def test_text_format_json_schema_parses_into_the_model(oai, alias):
    r = oai.responses.parse(model=alias, input=QUESTION, text_format=Capital, max_output_tokens=60, temperature=0)
    assert r.status == "completed"
    assert isinstance(r.output_parsed, Capital), r.output_text
    assert r.text.format.type == "json_schema"


def test_json_object_format_answers_a_json_object(oai):
    r = oai.responses.create(model="smollm2", input=QUESTION + " Answer in JSON.", max_output_tokens=40,
                             temperature=0, text={"format": {"type": "json_object"}})
    if r.status == "completed":  # a cut-off object cannot parse; a finished one must
        assert isinstance(json.loads(r.output_text), dict)
    else:
        assert r.output_text.lstrip().startswith("{")


def test_previous_response_id_continues_as_if_the_items_were_sent_again(oai):
    """A continuation is the earlier input and output plus the new input; the earlier
    instructions are not carried over (as OpenAI does)."""
    first = oai.responses.create(model="smollm2", instructions="Answer in one short sentence.",
                                 input="My name is Ada.", max_output_tokens=10, temperature=0)
    follow = oai.responses.create(model="smollm2", previous_response_id=first.id, input="What is my name?",
                                  max_output_tokens=10, temperature=0)
    assert follow.previous_response_id == first.id
    resent = oai.responses.create(model="smollm2", max_output_tokens=10, temperature=0, input=[
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert follow.usage.input_tokens == resent.usage.input_tokens
    assert follow.output_text == resent.output_text
    # and the chain goes on: the third turn holds both earlier ones
    third = oai.responses.create(model="smollm2", previous_response_id=follow.id, input="Thanks.",
                                 max_output_tokens=4, temperature=0)
    assert third.usage.input_tokens > follow.usage.input_tokens + follow.usage.output_tokens


def test_retrieve_returns_the_stored_response_and_delete_removes_it(oai):
    r = oai.responses.create(model="smollm2-hf", input=QUESTION, max_output_tokens=6, temperature=0,
                             metadata={"case": "retrieve"})
    got = oai.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    assert got.metadata == {"case": "retrieve"} and got.store is True
    oai.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.delete(r.id)
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model="smollm2", previous_response_id=r.id, input="Hi", max_output_tokens=2)
    assert info.value.body["param"] == "previous_response_id"


def test_input_items_lists_what_led_to_a_response_through_the_official_client(oai):
    first = oai.responses.create(model="smollm2", input="My name is Ada.", max_output_tokens=4, temperature=0)
    follow = oai.responses.create(model="smollm2", previous_response_id=first.id, max_output_tokens=4,
                                  temperature=0, input=[{"role": "developer", "content": "Be brief."},
                                                        {"role": "user", "content": "What is my name?"}])
    items = list(oai.responses.input_items.list(follow.id, order="asc"))
    # the whole conversation the model saw: the first input, its answer, then the new input
    assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "assistant"),
                                                 ("message", "developer"), ("message", "user")]
    assert items[0].content[0].text == "My name is Ada." and items[0].content[0].type == "input_text"
    assert items[1].content[0].type == "output_text" and items[1].content[0].text == first.output_text
    assert len({i.id for i in items}) == 4
    newest_first = oai.responses.input_items.list(follow.id, limit=2)  # OpenAI's default order: desc
    assert [i.id for i in newest_first.data] == [items[3].id, items[2].id] and newest_first.has_more
    rest = oai.responses.input_items.list(follow.id, limit=2, after=newest_first.data[-1].id)
    assert [i.id for i in rest.data] == [items[1].id, items[0].id] and not rest.has_more
    with pytest.raises(openai.NotFoundError):
        oai.responses.input_items.list("resp_unknown")


def test_instructions_and_a_developer_item_are_one_system_message(oai):
    """Templates that take one leading system turn would refuse two in a row."""
    r = oai.responses.create(model="smollm2", instructions="Be brief.", max_output_tokens=2, store=False,
                             input=[{"role": "developer", "content": "Answer in French."},
                                    {"role": "user", "content": "Hi"}])
    chat = oai.chat.completions.create(model="smollm2", max_tokens=2, messages=[
        {"role": "system", "content": "Be brief.\n\nAnswer in French."}, {"role": "user", "content": "Hi"}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_store_false_keeps_nothing(oai):
    r = oai.responses.create(model="smollm2", input=QUESTION, max_output_tokens=2, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)


def test_stored_responses_continue_after_a_restart(tmp_path):
    path = tmp_path / "responses.sqlite3"
    env = {"LLMSERVE_RESPONSES__STORE_PATH": str(path), "LLMSERVE_MODELS__MINILM__PRELOAD": "false"}
    server = start_server(env, name="test-server-responses")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        first = client.responses.create(model="smollm2", input="My name is Ada.", max_output_tokens=8,
                                        temperature=0)
    finally:
        server.stop()
    assert path.is_file()
    server = start_server(env, name="test-server-responses")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        follow = client.responses.create(model="smollm2", previous_response_id=first.id, input="What is my name?",
                                         max_output_tokens=8, temperature=0)
        assert follow.status in ("completed", "incomplete") and follow.previous_response_id == first.id
        assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    finally:
        server.stop()


def test_the_store_is_bounded_by_count(tmp_path):
    import asyncio

    from llmserve.response_store import ResponseStore

    async def fill():
        store = ResponseStore(tmp_path / "r.sqlite3", max_stored=3, max_age=3600)
        for i in range(5):
            await store.put({"id": f"resp_{i}", "output": []}, [])
        kept = [i for i in range(5) if await store.get(f"resp_{i}")]
        store.close()
        expired = ResponseStore(tmp_path / "r.sqlite3", max_stored=3, max_age=1e-9)
        gone = await expired.get("resp_4")
        expired.close()
        return kept, gone

    kept, gone = asyncio.run(fill())
    assert kept == [2, 3, 4] and gone is None


BAD = [
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input.0.content.0.type"),
    ({"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}},
     "tool_choice.name"),
    ({"input": "Hi", "tools": [WEATHER, {"type": "web_search"}]}, "tools.1.type"),
    ({"input": "Hi", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools.0.type"),
    ({"input": "Hi", "background": True}, "background"),
    ({"input": "Hi", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "Hi", "include": ["file_search_call.results"]}, "include"),
    ({"input": "Hi", "truncation": "auto"}, "truncation"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "input.0.call_id"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
    ({"input": "Hi", "max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_what_this_server_does_not_do_is_a_400_naming_the_field(http, body, param):
    r = http.post("/v1/responses", json={"model": "smollm2", "max_output_tokens": 4, **body})
    assert_openai_error(r, 400, param=param)


def test_a_lone_surrogate_in_previous_response_id_is_a_400_not_a_500(http):
    body = '{"model": "smollm2", "input": "Hi", "previous_response_id": "resp_\\ud800"}'  # JSON escape, sent as is
    r = http.post("/v1/responses", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, param="previous_response_id")


def test_unknown_ids_are_openai_shaped_404s(http):
    for method in ("GET", "DELETE"):
        assert_openai_error(http.request(method, "/v1/responses/resp_nope"), 404, param="response_id")


def test_the_api_v1_prefix_and_the_native_respond_api(server, http):
    r = http.post("/api/v1/responses", json={"model": "smollm2", "input": "Hi", "max_output_tokens": 3})
    assert r.status_code == 200 and r.json()["object"] == "response", r.text
    assert http.get(f"/api/v1/responses/{r.json()['id']}").json()["id"] == r.json()["id"]
    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        body = json.loads("".join(client.respond(model="smollm2", input="Hi", max_output_tokens=3, temperature=0)))
        assert body["object"] == "response" and body["usage"]["output_tokens"] <= 3
        sse = "".join(client.respond(model="smollm2", input="Hi", max_output_tokens=3, stream=True))
    kinds = [line[len("event: "):] for line in sse.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")


def test_a_client_that_leaves_mid_stream_stops_the_engine(server, http):
    body = {"model": "smollm2", "input": "Write a very long story:", "max_output_tokens": 1500, "stream": True,
            "temperature": 0.8}
    aborted = server.metric("llm_requests_total", model="smollm2", status="aborted")
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept open: leaving a for-loop over it would close the connection
        deltas = [ln for ln, _ in zip((ln for ln in lines if ln == "event: response.output_text.delta"), range(3))]
        assert len(deltas) == 3
        assert http.get("/v1/models/smollm2").json()["running_requests"] >= 1
    closed = time.monotonic()  # leaving the block closed the connection mid-stream
    while server.metric("llm_requests_total", model="smollm2", status="aborted") <= aborted:
        assert time.monotonic() - closed < BOUND, f"the chat generation under the stream was not aborted in {BOUND} s"
        time.sleep(0.05)


def test_a_generation_that_fails_mid_stream_ends_with_response_failed(tmp_path):
    """In-process on llama.cpp: a stall_timeout shorter than the engine's step fails the chat stream
    underneath (the limits count from admission, so it fails after the first step's token); the
    Responses stream ends with response.failed naming why, and the stored response says failed."""
    import asyncio

    from llmserve.config import load_settings
    from llmserve.manager import ModelManager
    from llmserve.serving import OpenAIOperations
    from llmserve.serving.responses import ResponsesOperations
    from llmserve.responses_schemas import ResponsesRequest

    async def run():
        settings = load_settings()
        settings.limits.stall_timeout = 0.001
        settings.responses.store_path = str(tmp_path / "r.sqlite3")
        manager = ModelManager(settings)
        responses = ResponsesOperations(OpenAIOperations(manager, settings), settings)
        try:
            await manager.load("smollm2")
            stream = await responses.create(ResponsesRequest(model="smollm2", input=QUESTION, max_output_tokens=64,
                                                             stream=True))
            events = [json.loads(line[6:]) async for chunk in stream for line in chunk.splitlines()
                      if line.startswith("data: ")]
            stored = await responses.retrieve(events[-1]["response"]["id"])
            return events, stored
        finally:
            responses.close()
            await manager.shutdown()

    events, stored = asyncio.run(run())
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.failed"
    assert "response.completed" not in kinds
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    error = events[-1]["response"]["error"]
    assert error["code"] == "timeout" and "limits.stall_timeout" in error["message"]
    assert stored["status"] == "failed" and stored["error"] == error


def test_a_chain_continues_from_a_response_whose_function_call_was_cut_short(tmp_path):
    """In-process on llama.cpp: a stored response whose call stopped at max_output_tokens holds
    half its arguments; continuing from it leaves that call out instead of a 400 on the input."""
    import asyncio

    from llmserve.config import load_settings
    from llmserve.manager import ModelManager
    from llmserve.serving import OpenAIOperations
    from llmserve.serving.responses import ResponsesOperations
    from llmserve.responses_schemas import ResponsesRequest

    async def run():
        settings = load_settings()
        settings.responses.store_path = str(tmp_path / "r.sqlite3")
        manager = ModelManager(settings)
        responses = ResponsesOperations(OpenAIOperations(manager, settings), settings)
        try:
            await manager.load("smollm2")
            cut = {"id": "resp_cut", "status": "incomplete", "output": [
                {"id": "fc_1", "type": "function_call", "status": "incomplete", "call_id": "call_1",
                 "name": "get_weather", "arguments": '{"city": "Par'}]}
            await responses.store.put(cut, [{"type": "message", "role": "user", "content": "Weather in Paris?"}])
            return await responses.create(ResponsesRequest(model="smollm2", previous_response_id="resp_cut",
                                                           input="Say hi.", max_output_tokens=3, temperature=0))
        finally:
            responses.close()
            await manager.shutdown()

    follow = asyncio.run(run())
    assert follow["status"] in ("completed", "incomplete") and follow["previous_response_id"] == "resp_cut"
    assert follow["output"][0]["type"] == "message"
