"""Stop-sequence scanning and incremental detokenization, the text logic all engines share."""

from __future__ import annotations

import asyncio

import pytest

from backends.base import Delta
from backends.text import IncrementalDetokenizer, StopScanner, with_stops


def feed_all(stops, pieces):
    scanner, out = StopScanner(stops), []
    for p in pieces:
        text, hit = scanner.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + scanner.flush(), False


@pytest.mark.parametrize("pieces", [["Hello wor", "ld. END here"], ["Hello world. E", "N", "D here"],
                                    ["Hello world. END", " here"], list("Hello world. END here")])
def test_stop_found_across_chunk_borders(pieces):
    assert feed_all(["END"], pieces) == ("Hello world. ", True)


def test_no_stop_keeps_every_character():
    assert feed_all(["END", "STOP"], ["ab", "EN", "c", "S", "T"]) == ("abENcST", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(["b", "xyz"], ["axyzb"]) == ("a", True)


def test_with_stops_closes_the_engine_stream():
    closed = []

    async def engine():
        try:
            for i, t in enumerate(["one ", "two ", "STOP", " three"]):
                yield Delta(t, i + 1)
            yield Delta("", 4, "length")
        finally:
            closed.append(True)

    async def run():
        return [d async for d in with_stops(engine(), ["STOP"])]

    out = asyncio.run(run())
    assert "".join(d.text for d in out) == "one two "
    assert out[-1].finish_reason == "stop" and out[-1].completion_tokens == 3
    assert closed == [True]


def test_incremental_detokenizer_never_splits_a_character():
    # a byte-level vocabulary where "é" takes two tokens
    vocab = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b"!"}
    decode = lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    d = IncrementalDetokenizer(decode)
    assert [d.add(t) for t in (1, 2, 3, 4)] == ["caf", "", "é", "!"]


def sentencepiece_decode(pieces: dict[int, str]):
    """A decode that drops the leading space of what it decodes, as SentencePiece's does."""
    return lambda ids: "".join(pieces[i] for i in ids).removeprefix(" ")


def test_the_first_completion_token_keeps_its_leading_space_given_prompt_context():
    pieces = {1: "The", 2: " capital", 3: " is", 4: " Paris", 5: "."}
    detok = IncrementalDetokenizer(sentencepiece_decode(pieces), prompt=[1, 2, 3])
    assert "".join(detok.add(t) for t in (4, 5)) == " Paris."
    # without the prompt as context the space is lost: the reason for the context
    assert IncrementalDetokenizer(sentencepiece_decode(pieces)).add(4) == "Paris"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from llmserve.config import load_settings

    gguf = load_settings().models["smollm2-hf"].location()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_logprob_bytes_of_tokens_holding_part_of_a_character_are_the_real_bytes(smollm2_tokenizer):
    from backends.text import hf_token_bytes

    text = "I love 🦙 and café"
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    partial = [i for i in ids if "\ufffd" in smollm2_tokenizer.decode([i])]
    assert partial, "the llama emoji should take several byte-level tokens"
    pieces = [hf_token_bytes(smollm2_tokenizer, i) for i in ids]
    assert b"\xef\xbf\xbd" not in b"".join(pieces)  # no U+FFFD anywhere
    assert b"".join(pieces).decode("utf-8") == text


def test_incremental_detokenizing_with_a_real_tokenizer_matches_decoding_the_whole(smollm2_tokenizer):
    prompt = smollm2_tokenizer("Say something:", add_special_tokens=False)["input_ids"]
    answer = smollm2_tokenizer(" I love 🦙 and café, naïvely!", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(lambda ids: smollm2_tokenizer.decode(ids, skip_special_tokens=True), prompt)
    assert "".join(detok.add(t) for t in answer) == smollm2_tokenizer.decode(answer)


@pytest.mark.parametrize("row", [[float("nan"), 1.0, 2.0], [float("inf"), 1.0, 0.0], [float("-inf")] * 3,
                                 [1e38, -1e38, 0.0]])
def test_log_softmax_of_degenerate_logits_gives_numbers_json_can_carry(row):
    import math

    import numpy as np

    from backends.text import log_softmax

    out = log_softmax(np.array(row, dtype=np.float32))
    assert all(math.isfinite(x) and -9999.0 <= x <= 0 for x in out.tolist()), out


@pytest.mark.parametrize("temperature,greedy", [(0.0, True), (1e-30, True), (-1.0, True), (1e-5, False), (0.7, False)])
def test_temperatures_too_small_to_divide_by_sample_greedily(temperature, greedy):
    from backends.base import SamplingParams

    assert SamplingParams(max_tokens=1, temperature=temperature).greedy() is greedy


def test_the_cached_float32_copy_of_a_gguf_has_its_tokenizer_template_and_special_tokens(smollm2_tokenizer):
    """Transformers and vLLM aliases load a GGUF from backends/convert.py's dequantized copy:
    it tokenizes, renders chats and ends generations as the GGUF itself does."""
    from transformers import AutoTokenizer, GenerationConfig

    from backends.convert import gguf_to_hf_dir
    from llmserve.config import load_settings

    copy = gguf_to_hf_dir(load_settings().models["smollm2-hf"].location())
    converted = AutoTokenizer.from_pretrained(copy)
    for text in ("Hello, world!", "I love 🦙 and café", "  leading spaces\nand\ttabs", "<|im_start|>user"):
        assert converted(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"], text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    for prompt in (True, False):
        assert (converted.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
                == smollm2_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt))
    assert (converted.bos_token_id, converted.eos_token_id) == (smollm2_tokenizer.bos_token_id,
                                                                smollm2_tokenizer.eos_token_id)
    assert GenerationConfig.from_pretrained(copy).eos_token_id == smollm2_tokenizer.eos_token_id
