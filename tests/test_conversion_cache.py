"""backends/convert.py's cache keys its copies by content: two different GGUFs of one file name and
size (here the shipped SmolLM2 file, and a copy of it with one byte of a tensor changed) never serve
each other's weights, whether the copy is llama.cpp's requantized GGUF or the float32 Hugging Face
directory Transformers and vLLM load."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest

from backends import convert
from backends.convert import content_key, gguf_requantize, gguf_to_hf_dir
from llmserve.config import load_settings
from tests.conftest import wait_for

TENSOR = "blk.0.ffn_down.weight"  # a Q4_1 tensor: a block is 2 + 2 bytes of scales, then 16 of quants


def shipped():
    return load_settings().models["smollm2"].location()


@pytest.fixture(scope="module")
def weight_byte() -> int:
    """Where in the shipped file the first quantized weight byte of TENSOR lies (reading the
    GGUF's metadata takes ~6 s here: once)."""
    import gguf

    return next(t for t in gguf.GGUFReader(shipped()).tensors if t.name == TENSOR).data_offset + 4


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


@pytest.fixture
def twins(tmp_path, weight_byte):
    """Two GGUFs of one name and size in two folders: a copy of the shipped file, and a copy with
    one quantized weight of TENSOR changed."""
    a, b = tmp_path / "a" / shipped().name, tmp_path / "b" / shipped().name
    for path in (a, b):
        path.parent.mkdir()
        shutil.copyfile(shipped(), path)
    flip(b, weight_byte)
    assert a.stat().st_size == b.stat().st_size and sha256(a) != sha256(b)
    return a, b


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_two_ggufs_of_one_name_and_size_get_their_own_requantized_copies(tmp_path, monkeypatch, twins):
    """llama.cpp's quantizer, for real: each file's Q8_0 copy is made from that file."""
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    a, b = twins
    qa = gguf_requantize(a, "Q8_0")
    qb = gguf_requantize(b, "Q8_0")
    assert qa != qb, "b was served a's requantized copy"
    assert sha256(qa) != sha256(qb)  # b's copy was quantized from b's weights
    assert gguf_requantize(a, "Q8_0") == qa and gguf_requantize(b, "Q8_0") == qb  # each found again


def test_a_gguf_of_the_same_name_and_size_is_not_served_anothers_hugging_face_directory(tmp_path, monkeypatch,
                                                                                         twins):
    """The float32 directory made from the shipped GGUF (the one smollm2-hf and smollm2-vllm load)
    is found for an identical copy of it, and never for a copy whose weights differ: that one is
    converted (stopped here as it starts: a conversion takes ~15 s on 2 cores)."""
    monkeypatch.delenv("LLMSERVE_CACHE_DIR", raising=False)
    made = gguf_to_hf_dir(shipped())  # in the user's cache, where the suite's loads keep it
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / made.name).symlink_to(made, target_is_directory=True)
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(cache))
    a, b = twins
    assert gguf_to_hf_dir(a) == cache / made.name  # the same bytes: the same directory

    class Converting(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Converting

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(Converting):
        served = gguf_to_hf_dir(b)
        pytest.fail(f"b was served {served.name}, made from another file")


def test_a_file_rewritten_in_place_with_its_mtime_set_back_is_hashed_anew(tmp_path, monkeypatch):
    """The remembered hash is keyed by the file's times too: one byte changed in place, size kept
    and mtime restored (as `cp -p` or `touch -r` do) still gives a new key, in this process and in
    a fresh one (the remembered hashes under cache_dir()/digests)."""
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    a = tmp_path / shipped().name
    shutil.copyfile(shipped(), a)
    settled = lambda: time.time() - max(a.stat().st_mtime, a.stat().st_ctime) > convert.RECENT  # noqa: E731
    wait_for(settled, "the copy's times never settled", every=0.2)
    before = content_key(a)
    assert list((tmp_path / "cache" / "digests").iterdir()), "the hash of a settled file is remembered"
    assert content_key(a) == before
    times = a.stat()
    flip(a, times.st_size - 1)
    os.utime(a, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert a.stat().st_mtime_ns == times.st_mtime_ns and a.stat().st_size == times.st_size
    assert content_key(a) != before
    monkeypatch.setattr(convert, "_digests", {})  # as a new process: only the files under digests/
    wait_for(settled, "the rewritten copy's times never settled", every=0.2)
    assert content_key(a) != before
