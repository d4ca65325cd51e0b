"""Tool calling in the model's own format: the grammars each engine gets, rendering through the
chat template, and chat round trips on the tool-aware aliases of all three engines (SmolLM2 with
the Hermes template on llama.cpp and vLLM, the Llama 3.1 JSON template on Transformers), streamed
and not, through the official openai client. The parser alone: tests/test_tool_parsing.py."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from backends.grammar import CallGrammar, gbnf, structural_tag
from llmserve.schemas import ChatCompletionRequest
from llmserve.tools import ChatTools, template_text
from llmserve.tools.formats import FORMATS, detect
from tests.test_api_features import WEATHER  # get_weather(city), city at most 20 characters
from tests.test_errors import assert_openai_error

TIME = {"type": "function", "function": {"name": "get_time", "description": "The current time in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


# -- grammars -----------------------------------------------------------------------------------
def _grammar(fmt: str, tools, choice="required", parallel=True) -> CallGrammar:
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice=choice,
                                parallel_tool_calls=parallel)
    return FORMATS[fmt].grammar(req, req.tools)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_grammar_of_each_format_accepts_its_calls_and_nothing_else(fmt):
    import xgrammar
    from llama_cpp import LlamaGrammar
    from xgrammar.testing import _is_grammar_accept_string

    g = _grammar(fmt, [WEATHER, TIME])
    LlamaGrammar.from_string(gbnf(g), verbose=False)  # llama.cpp parses it
    grammar = xgrammar.Grammar.from_structural_tag(structural_tag(g))
    fmt_ = FORMATS[fmt]
    weather = json.dumps({"name": "get_weather", fmt_.args_key: {"city": "Rome"}})
    time = json.dumps({"name": "get_time", fmt_.args_key: {}})
    assert _is_grammar_accept_string(grammar, g.begin + weather + g.end)
    # several calls where the format has a way to write them (the generic prompt asks for one)
    assert _is_grammar_accept_string(grammar, g.begin + weather + g.separator + time + g.end) == fmt_.parallel
    assert not _is_grammar_accept_string(grammar, g.begin + weather.replace("Rome", "R" * 30) + g.end)  # maxLength
    assert not _is_grammar_accept_string(grammar, g.begin + weather.replace("get_weather", "nope") + g.end)
    single = xgrammar.Grammar.from_structural_tag(structural_tag(_grammar(fmt, [WEATHER, TIME], parallel=False)))
    assert not _is_grammar_accept_string(single, g.begin + weather + g.separator + time + g.end)


def test_the_call_format_is_detected_from_the_chat_template():
    assert detect(template_text("llmserve/tools/templates/hermes.jinja")).name == "hermes"
    assert detect(template_text("llmserve/tools/templates/llama3_json.jinja")).name == "llama3_json"
    assert detect("{{ messages }}").name == "json"  # a template that knows no tools (SmolLM2's own)
    assert detect("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]").name == "mistral"


def test_an_alias_chat_template_file_that_does_not_exist_or_an_unknown_parser_is_refused():
    from pydantic import ValidationError

    from llmserve.config import ModelConfig

    with pytest.raises(ValidationError, match="chat_template: no file 'nope.jinja'"):
        ModelConfig(source="x.gguf", chat_template="nope.jinja")
    with pytest.raises(ValidationError, match="tool_parser"):
        ModelConfig(source="x.gguf", tool_parser="pythonic")
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert template_text(ModelConfig(source="x.gguf", chat_template=inline).chat_template) == inline


# -- rendering through a real template (llama.cpp's renderer on the shipped GGUF) ---------------
@pytest.fixture(scope="module")
async def gguf_backend():
    from backends.llamacpp_backend import LlamaCppBackend
    from llmserve.config import load_settings

    backend = LlamaCppBackend("smollm2-tools", load_settings().models["smollm2-tools"])
    await backend.load()
    yield backend
    await backend.unload()


def _rendered(backend, ids) -> str:
    return backend.model.detokenize(ids, special=True).decode()


HISTORY = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "noon"},
]


async def test_two_tool_results_in_a_row_become_one_user_turn_in_both_kinds_of_template(gguf_backend):
    from llmserve.config import load_settings

    config = load_settings().models["smollm2-tools"]
    req = ChatCompletionRequest(messages=HISTORY, tools=[WEATHER, TIME])
    hermes = _rendered(gguf_backend, await ChatTools(req, config).encode(gguf_backend))
    assert hermes.count("<|im_start|>user") == 2  # the question, then both results in one turn
    assert "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response>" in hermes
    assert 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in hermes
    assert '"name": "get_time"' in hermes.split("<tools>\n")[1]  # the tools, through tools=
    generic = _rendered(gguf_backend, await ChatTools(req, config.model_copy(
        update={"chat_template": None, "tool_parser": None})).encode(gguf_backend))  # SmolLM2's own template
    assert generic.count("<|im_start|>user") == 2
    assert "Result of call c1: sunny\nResult of call c2: noon" in generic
    assert 'Checking.\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in generic


async def test_a_template_that_forbids_a_system_role_still_renders_a_tools_request(gguf_backend):
    from llmserve.config import load_settings

    gemma_like = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    config = load_settings().models["smollm2-tools"].model_copy(update={"chat_template": gemma_like, "tool_parser": None})
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER])
    text = _rendered(gguf_backend, await ChatTools(req, config).encode(gguf_backend))
    assert text.startswith("<|im_start|>user\nYou can call these functions:") and "Weather in Rome?" in text


TEMPLATES = {"json": None,  # SmolLM2's own, which knows no tools (and no developer role)
             "hermes": "llmserve/tools/templates/hermes.jinja",
             "llama3_json": "llmserve/tools/templates/llama3_json.jinja"}


@pytest.mark.parametrize("with_tools", [False, True], ids=["no-tools", "tools"])
@pytest.mark.parametrize("parser", sorted(TEMPLATES))
async def test_a_developer_message_reaches_the_template_as_the_system_message(gguf_backend, parser, with_tools):
    from llmserve.config import load_settings

    config = load_settings().models["smollm2-tools"].model_copy(
        update={"chat_template": TEMPLATES[parser], "tool_parser": parser})
    req = ChatCompletionRequest(messages=[{"role": "developer", "content": "Answer in French."},
                                          {"role": "user", "content": "Weather in Rome?"}],
                                tools=[WEATHER] if with_tools else None)
    text = _rendered(gguf_backend, await ChatTools(req, config).encode(gguf_backend))
    assert "developer" not in text
    first_turn = text.split("<|im_end|>")[0]
    assert first_turn.startswith("<|im_start|>system\n") and "Answer in French." in first_turn  # not a default's
    assert text.count("<|im_start|>system") == 1


# a template that writes the participant's name, as Hugging Face templates that know it do
# (llama.cpp's renderer trims the newline after a block tag: the newlines are expressions)
NAMED = ("{% for m in messages %}{{ '<|im_start|>' + m.role }}{% if m.name %}{{ ' name=' + m.name }}{% endif %}"
         "{{ '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}{{ '<|im_start|>assistant\\n' }}")


@pytest.mark.parametrize("parser", ["json", "hermes"])  # the generic format's rendering, the native formats'
async def test_the_participant_name_of_a_message_reaches_the_template(gguf_backend, parser):
    from llmserve.config import load_settings

    config = load_settings().models["smollm2-tools"].model_copy(update={"chat_template": NAMED, "tool_parser": parser})
    req = ChatCompletionRequest(messages=[{"role": "system", "content": "Be brief.", "name": "ops"},
                                          {"role": "user", "content": "Hi", "name": "alice"},
                                          {"role": "assistant", "content": "Hello", "name": "bot"},
                                          {"role": "user", "content": "Bye"}], tools=[WEATHER])
    text = _rendered(gguf_backend, await ChatTools(req, config).encode(gguf_backend))
    assert "<|im_start|>system name=ops\nBe brief." in text
    assert "<|im_start|>user name=alice\nHi<|im_end|>" in text
    assert "<|im_start|>assistant name=bot\nHello<|im_end|>" in text
    assert "<|im_start|>user\nBye<|im_end|>" in text  # no name, none written


# -- round trips on the three engines ----------------------------------------------------------
TOOL_ALIASES = ["smollm2-tools", "smollm2-hf-tools", "smollm2-vllm-tools"]  # llama.cpp, Transformers, vLLM


@pytest.fixture(scope="module", params=TOOL_ALIASES)
def alias(request, server):
    if request.param == "smollm2-vllm-tools":  # its engine takes a minute to start on CPU
        r = httpx.post(f"{server.url}/models/{request.param}/load", timeout=600)
        assert r.status_code == 200, r.text
    yield request.param
    if request.param == "smollm2-vllm-tools":  # the vLLM CPU engine is big: give its memory back
        httpx.post(f"{server.url}/models/{request.param}/unload", timeout=300)


def few_shot(n: int = 3) -> list[dict]:
    """Earlier turns in which the assistant called get_weather, then a new question (with
    these, SmolLM2-135M calls under tool_choice "auto" on all three engines)."""
    messages = []
    for i, city in enumerate(["Paris", "Berlin", "Madrid"][:n]):
        messages += [{"role": "user", "content": f"What is the weather in {city}?"},
                     {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function",
                      "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
                     {"role": "tool", "tool_call_id": f"call_{i}", "content": "sunny"},
                     {"role": "assistant", "content": f"It is sunny in {city}."}]
    return messages + [{"role": "user", "content": "What is the weather in Rome?"}]


def streamed(oai, **kwargs):
    """(content, [(id, name, arguments)], finish_reason, fragments per call) of a stream."""
    content, calls, fragments, finish = "", {}, {}, None
    for chunk in oai.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or ():
                if d.id:
                    assert d.index not in calls and d.function.name  # id and name come first, once
                    calls[d.index] = [d.id, d.function.name, ""]
                if d.function and d.function.arguments:
                    calls[d.index][2] += d.function.arguments
                    fragments[d.index] = fragments.get(d.index, 0) + 1
            finish = c.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish, fragments


@pytest.mark.parametrize("choice", ["required", "named", "auto"])
def test_a_call_its_result_and_the_answer_round_trip(oai, alias, choice):
    tool_choice = {"required": "required", "auto": "auto",
                   "named": {"type": "function", "function": {"name": "get_weather"}}}[choice]
    messages = few_shot() if choice == "auto" else [{"role": "user", "content": "What is the weather in Rome?"}]
    first = oai.chat.completions.create(model=alias, messages=messages, tools=[WEATHER, TIME], tool_choice=tool_choice,
                                        parallel_tool_calls=False, max_tokens=40, temperature=0)
    c = first.choices[0]
    if choice == "auto" and c.finish_reason != "tool_calls":  # auto: the model may answer in words instead
        assert c.finish_reason in ("stop", "length") and c.message.content and not c.message.tool_calls
        return
    assert c.finish_reason == "tool_calls", c.message
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [c.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "temperature_c": 18}'}]
    second = oai.chat.completions.create(model=alias, messages=messages, tools=[WEATHER, TIME], tool_choice="none",
                                         max_tokens=12, temperature=0)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


# required only: under auto, greedy output is not stable across batch shapes (vLLM), so the two
# answers may differ in whether they call at all
@pytest.mark.parametrize("choice", ["required"])
def test_streamed_call_deltas_reassemble_to_the_unstreamed_call_byte_for_byte(oai, alias, choice):
    body = dict(model=alias, messages=few_shot() if choice == "auto" else few_shot(0), tools=[WEATHER, TIME],
                tool_choice=choice, parallel_tool_calls=False, max_tokens=40, temperature=0)
    whole = oai.chat.completions.create(**body).choices[0]
    content, calls, finish, fragments = streamed(oai, **body)
    assert finish == whole.finish_reason == "tool_calls"
    assert content == (whole.message.content or "")
    assert [(name, args) for _, name, args in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    # the arguments came in pieces, not whole: one a token on llama.cpp and Transformers; vLLM
    # merges the deltas of steps that a busy server has not read yet, so fewer there
    assert fragments[0] > (1 if alias == "smollm2-vllm-tools" else 3)


TOM = {"name": "Tom", "species": "cat"}
TOM_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": {
    "type": "object", "properties": {"name": {"const": "Tom"}, "species": {"const": "cat"}},
    "required": ["name", "species"], "additionalProperties": False}}}


# the formats whose calls are bare JSON objects, on Transformers: the generic one (SmolLM2's own
# template) and Llama 3.1 JSON; response_format makes the reply {"name": "Tom", "species": "cat"}
@pytest.mark.parametrize("bare_alias", ["smollm2-hf", "smollm2-hf-tools"])
def test_a_json_reply_that_names_no_declared_tool_stays_content_streamed_and_not(oai, bare_alias):
    body = dict(model=bare_alias, messages=[{"role": "user", "content": "Describe my cat Tom as JSON."}],
                tools=[WEATHER, TIME], response_format=TOM_FORMAT, max_tokens=40, temperature=0)
    whole = oai.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "stop" and not whole.message.tool_calls, whole.message
    assert json.loads(whole.message.content) == TOM
    content, calls, finish, _ = streamed(oai, **body)
    assert (content, calls, finish) == (whole.message.content, [], "stop")


def test_tool_choice_none_never_calls_even_after_examples_of_calls(oai, alias):
    r = oai.chat.completions.create(model=alias, messages=few_shot(), tools=[WEATHER], tool_choice="none",
                                    max_tokens=30, temperature=0)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"


# -- bad input ---------------------------------------------------------------------------------------
BAD = [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None, "nope"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}]},
     "tools.0.function.parameters", "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters", "object"),
    ({"tools": [WEATHER], "messages": [{"role": "user", "content": "hi"},
                                       {"role": "tool", "tool_call_id": "call_x", "content": "42"}]},
     "messages.1.tool_call_id", "call_x"),
]


@pytest.mark.parametrize("body,param,contains", BAD, ids=["unknown-function", "bad-schema", "not-an-object",
                                                          "result-without-call"])
def test_bad_tool_input_is_a_400_naming_the_field(http, body, param, contains):
    full = {"model": "smollm2-tools", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    err = assert_openai_error(http.post("/v1/chat/completions", json=full), 400, param=param, contains=contains)
    assert param is None or param in err["message"]
