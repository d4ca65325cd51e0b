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
