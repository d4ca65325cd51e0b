"""Reading tool calls out of generated text, the parser alone (no engine): each format's calls,
a stream cut anywhere joining to the answer unstreamed, what a stream holds back while a call
may still begin, and where a JSON object is a call and where it is only text."""

from __future__ import annotations

import json
import random

import pytest

from llmserve.tools.formats import FORMATS
from llmserve.tools.parser import Arguments, CallParser, CallStart, Content, parse_whole

DECLARED = frozenset({"get_weather", "get_time"})  # the request's tools in these tests
CALL_ARGS = '{"city": "Par\\"is {x}", "n": [1, 2]}'
# each format's way of writing two calls: after a preamble where a marker opens a call; a bare
# JSON call (llama3_json, json) must open the reply, so there only whitespace comes before it
ANSWERS = {
    "hermes": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + CALL_ARGS
              + '}\n</tool_call>\n<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>\n',
    "llama3_json": ' {"name": "get_weather", "parameters": ' + CALL_ARGS + '}; {"name": "get_time", "parameters": {}}',
    "mistral": 'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": ' + CALL_ARGS
               + '}, {"name": "get_time", "arguments": {}}]',
    "json": '\n{"name": "get_weather", "arguments": ' + CALL_ARGS + '}\n{"name": "get_time"}',
}
PREAMBLE = {"hermes": "Let me check.", "mistral": "Let me check.", "llama3_json": None, "json": None}
BARE = ["json", "llama3_json"]  # the formats whose calls have no marker


def stream_events(fmt: str, text: str, cuts: list[int], parallel: bool = True, names=DECLARED) -> list:
    parser = CallParser(FORMATS[fmt].syntax, parallel, names)
    events, at = [], 0
    for cut in [*cuts, len(text)]:
        events += parser.feed(text[at:cut])
        at = cut
    return events + parser.finish()


def reassemble(events) -> tuple[str, list[list[str]]]:
    content, calls = "", []
    for e in events:
        if isinstance(e, Content):
            content += e.text
        elif isinstance(e, CallStart):
            assert e.index == len(calls) and e.id.startswith("call_")
            calls.append([e.name, ""])
        else:
            calls[e.index][1] += e.text
    return content, calls


def answer(fmt: str, text: str, names=DECLARED) -> tuple[str, list[list[str]]]:
    """(content, [[name, arguments]]) of ``text`` unstreamed, once every way tried of cutting
    it into a stream's pieces has joined to the same."""
    content, calls = parse_whole(FORMATS[fmt].syntax, text, names=names)
    whole = (content or "", [[c["function"]["name"], c["function"]["arguments"]] for c in calls])
    rng = random.Random(text)
    cuttings = [[], list(range(1, len(text)))] + [
        sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) - 1))) for _ in range(30) if len(text) > 1]
    for cuts in cuttings:
        assert reassemble(stream_events(fmt, text, cuts, names=names)) == whole, cuts
    return whole


# -- each format's calls ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(ANSWERS))
def test_each_format_reads_its_calls_and_keeps_the_preamble_as_content(fmt):
    content, calls = parse_whole(FORMATS[fmt].syntax, ANSWERS[fmt], names=DECLARED)
    assert content == PREAMBLE[fmt]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", CALL_ARGS), ("get_time", "{}")]
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("fmt", sorted(ANSWERS))
def test_streamed_fragments_joined_equal_the_whole_answer_however_the_text_is_cut(fmt):
    text = ANSWERS[fmt]
    assert answer(fmt, text)[1] == [["get_weather", CALL_ARGS], ["get_time", "{}"]]
    one_char = stream_events(fmt, text, list(range(1, len(text))))
    # id and name come first, then the arguments in fragments as they are written
    first_call = next(i for i, e in enumerate(one_char) if isinstance(e, CallStart))
    assert sum(isinstance(e, Arguments) and e.index == 0 for e in one_char[first_call:]) > 5


def test_a_partial_marker_is_held_only_until_it_is_told_apart():
    parser = CallParser(FORMATS["hermes"].syntax, names=DECLARED)
    assert reassemble(parser.feed("Hello <tool")) == ("Hello", [])  # "<tool" may open a call
    assert reassemble(parser.feed("box> here")) == (" <toolbox> here", [])  # it did not
    assert reassemble(parser.feed(" <tool_call>")) == ("", [])
    assert reassemble(parser.feed('{"name": "f"')) == ("", [["f", ""]])  # the name as soon as it is whole


def test_text_after_a_call_is_content_too():
    text = 'Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\nDone.'
    content, calls = parse_whole(FORMATS["hermes"].syntax, text)
    assert content == "Sure.\nDone." and calls[0]["function"]["arguments"] == '{"a": 1}'


def test_parallel_tool_calls_false_keeps_only_the_first_call():
    content, calls = parse_whole(FORMATS["hermes"].syntax, ANSWERS["hermes"], parallel=False)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert reassemble(stream_events("hermes", ANSWERS["hermes"], [7, 40], parallel=False))[1] == [
        ["get_weather", CALL_ARGS]]


def test_arguments_that_do_not_parse_leave_the_whole_answer_as_content():
    cut_off = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'
    assert parse_whole(FORMATS["hermes"].syntax, cut_off) == (cut_off, [])


@pytest.mark.parametrize("fmt", sorted(ANSWERS))
def test_arguments_written_as_a_json_string_are_the_json_text_inside_it_streamed_or_not(fmt):
    # some models write "arguments": "{\"city\": ...}"; vLLM's hermes parser decodes the string
    # once, both ways; so does this one, in every format
    as_string = ANSWERS[fmt].replace(CALL_ARGS, json.dumps(CALL_ARGS))
    assert as_string != ANSWERS[fmt]
    content, calls = answer(fmt, as_string)
    assert calls == [["get_weather", CALL_ARGS], ["get_time", "{}"]]
    assert content == (PREAMBLE[fmt] or "")


# -- bare JSON calls: where a JSON object is a call, and where it is text ------------------------
@pytest.mark.parametrize("fmt", BARE)
def test_a_bare_json_object_is_a_call_only_where_the_reply_begins(fmt):
    args = FORMATS[fmt].args_key
    call = '{"name": "get_weather", "%s": {"city": "Rome"}}' % args
    assert answer(fmt, "\n " + call) == ("", [["get_weather", '{"city": "Rome"}']])
    for text in ["I would call " + call + " now.", "Sure.\n" + call, 'Tom says {"name": "get_time"}']:
        assert answer(fmt, text) == (text, [])


def test_llama3_calls_may_follow_the_python_tag():
    text = '<|python_tag|>{"name": "get_time", "parameters": {"city": "Oslo"}}'
    assert answer("llama3_json", text) == ("", [["get_time", '{"city": "Oslo"}']])
    code = '<|python_tag|>brave_search.call(query="Oslo")'  # Llama's built-in tools write code there
    assert answer("llama3_json", code) == (code, [])


@pytest.mark.parametrize("fmt", BARE)
def test_a_json_object_that_names_no_declared_function_is_content(fmt):
    tom = '{"name": "Tom", "species": "cat"}'
    assert answer(fmt, tom) == (tom, [])
    assert answer(fmt, '  {"name": 3, "n": 1}\n') == ('  {"name": 3, "n": 1}\n', [])
    # after a declared call, the next object is held and judged the same way
    sep = FORMATS[fmt].syntax.separator
    call = '{"name": "get_time", "%s": {}}' % FORMATS[fmt].args_key
    assert answer(fmt, call + sep + "\n" + tom) == (sep + "\n" + tom, [["get_time", "{}"]])


def test_a_stream_holds_a_bare_object_only_until_its_name_tells_whether_it_is_a_call():
    parser = CallParser(FORMATS["json"].syntax, names=DECLARED)
    assert reassemble(parser.feed(" {")) == ("", [])  # may open a call
    assert reassemble(parser.feed('"name": "To')) == ("", [])  # whose name is not whole yet
    assert reassemble(parser.feed('m", "species"')) == (' {"name": "Tom", "species"', [])  # no declared function
    assert reassemble(parser.feed(': "cat"}') + parser.finish()) == (': "cat"}', [])
    mid_text = CallParser(FORMATS["json"].syntax, names=DECLARED)
    # not at the start of the reply: text at once, "{" and "name" included
    assert reassemble(mid_text.feed('Sure: {"name": "get_weather"')) == ('Sure: {"name": "get_weather"', [])
    assert reassemble(mid_text.feed("a set {1, 2")) == ("a set {1, 2", [])


def test_a_call_region_that_yields_no_call_is_content():
    for fmt, text in [("hermes", "Hi\n<tool_call>not JSON at all</tool_call> bye"),
                      ("hermes", '<tool_call>\n{"name": "get_wea'),  # cut off before the name was whole
                      ("mistral", "[TOOL_CALLS] is how I would start a call"),
                      ("json", '{"name": "get_wea')]:
        assert answer(fmt, text) == (text, []), (fmt, text)


PIECES = ["Hi", " ", "\n", "{", "}", '"name"', ": ", '"get_time"', '"Tom"', ", ", '"parameters"', '"arguments"',
          "{}", "<tool_call>", "</tool_call>", "<tool", "[TOOL_CALLS]", "[", "]", ";", "<|python_tag|>", "x"]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_an_answer_that_makes_no_call_streams_exactly_its_text(fmt):
    # whatever the text holds (braces, markers, names, whitespace at either end), when no call
    # comes out of it, the content streamed is the text, as the unstreamed answer is
    rng = random.Random(fmt)
    tried = 0
    for _ in range(400):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14)))
        if reassemble(stream_events(fmt, text, list(range(1, len(text)))))[1]:
            continue  # it makes a call (a stream sends a call whose arguments are cut off, too)
        tried += 1
        assert answer(fmt, text) == (text, []), text
    assert tried > 100
