"""Rerank, score, tokenize and detokenize (issue 33) on real engines, through the session's server.

Relevance is checked for meaning on the embedding path (minilm, cosine similarity: a relevant
document above an unrelated one). The cross-encoder path runs a small BERT cross-encoder with
random weights (tests/cross_encoder.py), on Transformers and on vLLM: its scores mean nothing,
so they are checked against the same model's forward pass in this process, and the ordering
against those scores.
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from conftest import start_server, wait_for
from cross_encoder import build
from test_disconnects import send_and_keep_open

QUERY = "What is the capital of France?"
DOCS = ["Bananas are a good source of potassium.", "Paris is the capital and largest city of France.",
        "The stock market fell sharply on Monday."]
PAIRS = [("how do cats sleep", "Cats sleep for most of the day."), ("how do cats sleep", "Rust has no garbage collector."),
         ("python lists", "A list in Python holds items in order.")]


@pytest.fixture(scope="module", autouse=True)
def cross_encoder():
    """The random cross-encoder's directory (what the rerank-tiny aliases load)."""
    return build()


@pytest.fixture(scope="module")
def reference(cross_encoder):
    """Scores of pairs by the cross-encoder's own forward pass here: sigmoid of its one logit."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cross_encoder)
    model = AutoModelForSequenceClassification.from_pretrained(cross_encoder).eval()

    def scores(pairs):
        batch = tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True, return_tensors="pt")
        with torch.no_grad():
            return torch.sigmoid(model(**batch).logits[:, 0]).tolist()

    return scores


def rerank(http, path="/v1/rerank", **body):
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def error(response, status=400):
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_embedding_model_ranks_the_relevant_document_first(http):
    out = rerank(http, model="minilm", query=QUERY, documents=DOCS)
    results = out["results"]
    assert [r["index"] for r in results][0] == 1  # the Paris document
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in results) == [0, 1, 2]
    assert scores[0] > scores[-1] + 0.2
    assert all("document" not in r for r in results)  # only when asked
    assert out["model"] == "minilm" and out["usage"]["prompt_tokens"] > len(DOCS)


def test_top_n_and_return_documents_in_both_document_shapes(http):
    docs = [DOCS[0], {"text": DOCS[1]}, DOCS[2]]
    out = rerank(http, model="minilm", query=QUERY, documents=docs, top_n=1, return_documents=True)
    assert out["results"] == [{"index": 1, "relevance_score": out["results"][0]["relevance_score"],
                               "document": {"text": DOCS[1]}}]
    everything = rerank(http, model="minilm", query=QUERY, documents=docs, top_n=0)  # 0: all, as vLLM
    assert len(everything["results"]) == 3
    assert everything["results"][0]["relevance_score"] == pytest.approx(out["results"][0]["relevance_score"])


@pytest.mark.parametrize("path", ["/v1/rerank", "/api/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_answers_on_every_path_v2_in_cohere_v2_shape(http, path):
    out = rerank(http, path, model="minilm", query=QUERY, documents=DOCS, top_n=2)
    assert out["id"].startswith("rerank-") and len(out["results"]) == 2
    assert set(out["results"][0]) == {"index", "relevance_score"}
    assert out["meta"]["api_version"]["version"] == ("2" if path == "/v2/rerank" else "1")
    assert out["meta"]["billed_units"] == {"search_units": 1}


@pytest.mark.parametrize("alias", ["rerank-tiny", "rerank-tiny-vllm"])
def test_cross_encoder_scores_are_the_models_own_on_each_engine(http, alias, reference):
    expected = reference(PAIRS)
    out = http.post("/v1/score", json={"model": alias, "text_1": [q for q, _ in PAIRS],
                                       "text_2": [d for _, d in PAIRS]}, timeout=600).json()
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    assert [d["score"] for d in out["data"]] == pytest.approx(expected, abs=1e-4)
    docs = ["Cats sleep for most of the day.", "Rust has no garbage collector.", "Cats purr when content."]
    ranked = rerank(http, model=alias, query="how do cats sleep", documents=docs, return_documents=True)
    want = reference([("how do cats sleep", d) for d in docs])
    assert [r["index"] for r in ranked["results"]] == sorted(range(3), key=lambda i: -want[i])
    assert [r["document"]["text"] for r in ranked["results"]] == [docs[r["index"]] for r in ranked["results"]]
    assert ranked["usage"]["prompt_tokens"] > 3 * 5  # each pair read whole: [CLS] query [SEP] document [SEP]


def test_score_pairs_text_1_with_text_2_as_vllm_does(http):
    one_to_n = http.post("/v1/score", json={"model": "minilm", "text_1": QUERY, "text_2": DOCS}).json()
    ranked = rerank(http, model="minilm", query=QUERY, documents=DOCS)
    by_index = {r["index"]: r["relevance_score"] for r in ranked["results"]}
    assert [d["score"] for d in one_to_n["data"]] == pytest.approx([by_index[i] for i in range(3)])
    n_to_n = http.post("/score", json={"model": "minilm", "text_1": [QUERY, "Which fruit has potassium?"],
                                       "text_2": [DOCS[1], DOCS[0]]}).json()
    assert len(n_to_n["data"]) == 2 and all(d["score"] > 0.3 for d in n_to_n["data"])
    same = http.post("/v1/score", json={"model": "minilm", "text_1": "a cat", "text_2": "a cat"}).json()
    assert same["data"][0]["score"] == pytest.approx(1.0)
    err = error(http.post("/v1/score", json={"model": "minilm", "text_1": ["a", "b"], "text_2": ["a", "b", "c"]}))
    assert err["param"] == "text_2" and "1:N" in err["message"]


def test_models_list_says_how_each_alias_scores(http):
    rows = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert rows["rerank-tiny"]["score_type"] == "cross-encoder" and rows["rerank-tiny"]["task"] == "rerank"
    assert rows["minilm"]["score_type"] == "bi-encoder" and rows["smollm2-embed"]["score_type"] == "bi-encoder"
    assert rows["smollm2"]["score_type"] is None


@pytest.mark.parametrize("path", ["/v1/rerank", "/v1/score"])
def test_a_generation_alias_cannot_rerank(http, path):
    body = {"model": "smollm2", "query": "q", "documents": ["d"], "text_1": "q", "text_2": "d"}
    err = error(http.post(path, json=body))
    assert err["param"] == "model" and err["code"] == "unsupported_capability"


def test_llamacpp_embedding_alias_reranks_by_cosine(http):
    out = rerank(http, model="smollm2-embed", query="a cat", documents=["a cat", "quantum chromodynamics lecture"])
    assert out["results"][0]["index"] == 0 and out["results"][0]["relevance_score"] == pytest.approx(1.0)


@pytest.mark.parametrize("alias", ["smollm2", "smollm2-hf", "smollm2-vllm", "smollm2-tools"])
def test_tokenize_of_a_chat_is_the_prompt_the_chat_route_counts(http, request, alias):
    if alias == "smollm2-vllm":
        request.getfixturevalue("vllm_loaded")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}] if alias == "smollm2-tools" else None
    chat = http.post("/v1/chat/completions", json={"model": alias, "messages": messages, "tools": tools,
                                                   "max_tokens": 1}, timeout=300).json()
    tok = http.post("/tokenize", json={"model": alias, "messages": messages, "tools": tools}).json()
    assert tok["count"] == len(tok["tokens"]) == chat["usage"]["prompt_tokens"]
    assert tok["max_model_len"] == http.get(f"/v1/models/{alias}").json()["context_length"]
    bare = http.post("/v1/tokenize", json={"model": alias, "messages": messages, "tools": tools,
                                           "add_generation_prompt": False}).json()
    assert bare["count"] < tok["count"] and tok["tokens"][:bare["count"]] == bare["tokens"]


@pytest.mark.parametrize("alias, text", [("smollm2", "Hello world, again."), ("smollm2-hf", "Hello world, again."),
                                         ("minilm", "hello world, again."), ("rerank-tiny", "hello world, again.")])
def test_detokenize_gives_back_the_tokenized_text(http, alias, text, cross_encoder):
    plain = http.post("/v1/tokenize", json={"model": alias, "prompt": text, "add_special_tokens": False}).json()
    assert http.post("/detokenize", json={"model": alias, "tokens": plain["tokens"]}).json() == {"prompt": text}
    special = http.post("/tokenize", json={"model": alias, "prompt": text}).json()
    assert special["count"] >= plain["count"] and special["max_model_len"] > 0
    if alias in ("minilm", "rerank-tiny"):  # BERT's tokenizer adds [CLS] ... [SEP]
        assert special["tokens"] == [101, *plain["tokens"], 102]


def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(http, cross_encoder):
    cases = [
        ("/v1/rerank", {"model": "minilm", "query": "q", "documents": []}, "documents"),
        ("/v1/rerank", {"model": "minilm", "documents": ["d"]}, "query"),
        ("/v1/rerank", {"model": "minilm", "query": "q", "documents": ["d"], "top_n": -1}, "top_n"),
        ("/v1/rerank", {"model": "minilm", "query": "q", "documents": ["d"] * 257}, "documents"),
        ("/v1/rerank", {"model": "minilm", "query": "q", "documents": ["x" * 200_001]}, "documents"),
        ("/v1/rerank", {"model": "nope", "query": "q", "documents": ["d"]}, "model"),
        ("/v1/score", {"model": "minilm", "text_1": [], "text_2": "d"}, "text_1"),
        ("/v1/rerank", {"model": "minilm", "query": "q", "documents": ["d"], "max_tokens_per_doc": 64},
         "max_tokens_per_doc"),
        ("/v1/rerank", {"model": "minilm", "query": "q", "documents": ["d"], "truncate_prompt_tokens": 64},
         "truncate_prompt_tokens"),
        ("/v1/score", {"model": "minilm", "text_1": "q", "text_2": "d", "truncate_prompt_tokens": 64},
         "truncate_prompt_tokens"),
        ("/v1/tokenize", {"model": "smollm2", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ("/v1/tokenize", {"model": "smollm2"}, "prompt"),
        ("/v1/tokenize", {"model": "smollm2", "prompt": "a", "chat_template": "{{ messages }}"}, "chat_template"),
        ("/v1/tokenize", {"model": "smollm2", "messages": [{"role": "user", "content": "b"}],
                          "continue_final_message": True}, "continue_final_message"),  # no assistant turn to continue
        ("/v1/tokenize", {"model": "minilm", "messages": [{"role": "user", "content": "b"}]}, "model"),  # no template
        ("/v1/detokenize", {"model": "smollm2", "tokens": [10**9]}, "tokens"),
        ("/api/v1/detokenize", {"model": "smollm2", "tokens": [-1]}, "tokens.0"),
        ("/detokenize", {"model": "smollm2", "tokens": [10**9]}, "tokens"),  # the native API, past validation
        # a pair past the cross-encoder's 512 positions, on both engines: the document, or the query alone
        ("/v1/rerank", {"model": "rerank-tiny", "query": "q", "documents": ["ok", "word " * 600]}, "documents.1"),
        ("/v1/rerank", {"model": "rerank-tiny-vllm", "query": "q", "documents": ["ok", "word " * 600]}, "documents.1"),
        ("/v1/rerank", {"model": "rerank-tiny", "query": "word " * 600, "documents": ["ok"]}, "query"),
        ("/v1/rerank", {"model": "rerank-tiny-vllm", "query": "word " * 600, "documents": ["ok", "fine"]}, "query"),
        ("/v1/score", {"model": "rerank-tiny", "text_1": "q", "text_2": ["word " * 600]}, "text_2.0"),
        ("/v1/score", {"model": "rerank-tiny", "text_1": "word " * 600, "text_2": ["ok", "fine"]}, "text_1"),
        # the embedding path names the field of the text it embedded once, not its place among them
        ("/v1/score", {"model": "minilm", "text_1": "q", "text_2": ["word " * 600]}, "text_2.0"),
        ("/v1/score", {"model": "minilm", "text_1": ["q", "word " * 600], "text_2": ["a", "b"]}, "text_1.1"),
        ("/v1/score", {"model": "minilm", "text_1": "q", "text_2": ["a", "q", "word " * 600]}, "text_2.2"),
        ("/v1/rerank", {"model": "minilm", "query": "q", "documents": ["ok", "fine", "word " * 600]}, "documents.2"),
        ("/v1/rerank", {"model": "minilm", "query": "word " * 600, "documents": ["ok"]}, "query"),
        ("/v1/rerank", {"model": "smollm2-embed", "query": "q", "documents": ["ok", "word " * 5000]}, "documents.1"),
        # an empty text (llama.cpp would embed zero tokens), in each field that holds texts
        ("/v1/rerank", {"model": "smollm2-embed", "query": "q", "documents": ["ok", ""]}, "documents.1"),
        ("/v1/rerank", {"model": "smollm2-embed", "query": "q", "documents": [{"text": ""}]}, "documents.0.text"),
        ("/v1/score", {"model": "smollm2-embed", "text_1": "q", "text_2": ["a", ""]}, "text_2.1"),
        ("/v1/score", {"model": "smollm2-embed", "text_1": "", "text_2": "a"}, "text_1"),
    ]
    for path, body, param in cases:
        r = http.post(path, json=body, timeout=600)
        status = 404 if body.get("model") == "nope" else 400
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, body.get("model"), r.text[:300])
        err = r.json()["error"]
        if err["code"] == "context_length_exceeded" and "limits." not in err["message"]:  # an engine's: the same field
            assert err["message"].startswith(f"{param} has "), r.text[:300]
    # the native APIs' body validation is BentoML's own (a 400 in its shape, as for /chat)
    assert http.post("/tokenize", json={"model": "smollm2"}).status_code == 400
    assert rerank(http, model="rerank-tiny", query="q", documents=["ok"])["results"][0]["index"] == 0


def test_a_long_query_counts_once_per_document_on_a_cross_encoder(http):
    """A cross-encoder reads the query with every document: 256 documents of a 5,000-character
    query are 1.28 M characters to read, past limits.max_prompt_chars (200,000), refused at once
    naming the query; a bi-encoder embeds the query once, so there the same request is served."""
    body = {"model": "rerank-tiny", "query": "word " * 1000, "documents": ["a"] * 256}
    err = error(http.post("/v1/rerank", json=body))
    assert err["param"] == "query" and "limits.max_prompt_chars" in err["message"]
    err = error(http.post("/v1/score", json={"model": "rerank-tiny", "text_1": body["query"], "text_2": body["documents"]}))
    assert err["param"] == "text_1"
    assert len(rerank(http, **{**body, "model": "minilm", "query": "word " * 100})["results"]) == 256


@pytest.mark.parametrize("alias", ["smollm2", "smollm2-hf"])
def test_tokenize_of_a_continued_final_message_is_the_prompt_the_chat_route_counts(http, alias):
    messages = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "The color is"}]
    chat = http.post("/v1/chat/completions", json={"model": alias, "messages": messages, "max_tokens": 1,
                                                   "continue_final_message": True}).json()
    tok = http.post("/tokenize", json={"model": alias, "messages": messages, "continue_final_message": True,
                                       "add_generation_prompt": False}).json()  # vLLM's pairing of the two
    assert tok["count"] == chat["usage"]["prompt_tokens"]
    assert http.post("/tokenize", json={"model": alias, "messages": messages, "continue_final_message": True}
                     ).json()["tokens"] == tok["tokens"]
    closed = http.post("/tokenize", json={"model": alias, "messages": messages}).json()
    assert closed["count"] > tok["count"]  # the assistant turn closed, a new one opened
    text = http.post("/detokenize", json={"model": alias, "tokens": tok["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nThe color is")  # special tokens kept, as vLLM decodes


@pytest.mark.parametrize("alias", ["minilm", "rerank-tiny"])
def test_detokenize_keeps_special_tokens_as_vllm_does(http, alias, cross_encoder):
    special = http.post("/tokenize", json={"model": alias, "prompt": "hello world"}).json()
    assert http.post("/detokenize", json={"model": alias, "tokens": special["tokens"]}).json() == {
        "prompt": "[CLS] hello world [SEP]"}


def test_tokenize_returns_token_strs_on_each_engine(http, cross_encoder):
    strs = {}
    for alias in ("smollm2", "smollm2-hf", "minilm"):
        out = http.post("/v1/tokenize", json={"model": alias, "prompt": "Hello world", "add_special_tokens": False,
                                              "return_token_strs": True}).json()
        assert len(out["token_strs"]) == out["count"], out
        strs[alias] = out["token_strs"]
    assert strs["smollm2"] == strs["smollm2-hf"] == ["Hello", "Ġworld"]  # the vocabulary's own strings
    assert strs["minilm"] == ["hello", "world"]
    assert http.post("/tokenize", json={"model": "smollm2", "prompt": "a"}).json()["token_strs"] is None


# -- on a server whose batched passes wait while a file exists (backends/faults.py: Hold) ---------

@pytest.fixture(scope="module")
def held(tmp_path_factory, cross_encoder):
    """A server of its own: its InputBatcher passes wait while ``gate`` exists, so a test lines
    requests up behind a pass and lets it go; drain_timeout 0, so an unload does not wait for them."""
    gate = tmp_path_factory.mktemp("hold") / "gate"
    server = start_server({"LLMSERVE_HOLD_FILE": str(gate), "LLMSERVE_LIMITS__DRAIN_TIMEOUT": "0"},
                          name="test-server-held")
    with httpx.Client(base_url=server.url, timeout=120) as client:
        rerank(client, model="rerank-tiny", query="warm", documents=["up"])
        yield server, client, gate
    server.stop()


def _row(client):
    return client.get("/v1/models/rerank-tiny").json()


def test_concurrent_reranks_share_forward_passes(held):
    """16 reranks arrive while one pass is held: once it goes, the 15 behind it run as one pass."""
    _, client, gate = held
    before = _row(client)["score_batches"]
    gate.touch()
    queries = [f"question {i} about cats" for i in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(rerank, client, model="rerank-tiny", query=q, documents=DOCS) for q in queries]
        wait_for(lambda: _row(client)["running_requests"] == 16, "16 reranks waiting", every=0.02)
        gate.unlink()
        answers = [f.result() for f in futures]
    assert _row(client)["score_batches"] - before == 2  # the first request's pass, then the other 15's
    alone = rerank(client, model="rerank-tiny", query=queries[3], documents=DOCS)
    assert [r["relevance_score"] for r in answers[3]["results"]] == pytest.approx(
        [r["relevance_score"] for r in alone["results"]], abs=1e-5)


def test_a_client_that_leaves_is_dropped_from_the_batch(held):
    """B waits behind A's held pass; B's client leaves; B never runs (one pass, A's), and the
    alias's in-use count and its engine's count go back to zero."""
    server, client, gate = held
    before = _row(client)["score_batches"]
    gate.touch()
    with cf.ThreadPoolExecutor(1) as pool:
        a = pool.submit(rerank, client, model="rerank-tiny", query="long", documents=DOCS)
        wait_for(lambda: _row(client)["running_requests"] >= 1, "A reached the engine", every=0.02)
        b = send_and_keep_open(server, "/v1/rerank", {"model": "rerank-tiny", "query": "short", "documents": ["one"]})
        wait_for(lambda: _row(client)["running_requests"] >= 2, "B waits behind A", every=0.02)
        b.close()
        wait_for(lambda: _row(client)["in_use"] <= 1, "B's place was given back")
        assert not a.done()
        gate.unlink()
        assert len(a.result()["results"]) == 3
    wait_for(lambda: _row(client)["in_use"] == 0 and _row(client)["running_requests"] == 0, "every count back at zero")
    assert _row(client)["score_batches"] - before == 1, "B's pair ran after its client had left"


def test_an_unload_under_a_held_batch_answers_503_retry_and_the_model_loads_again(held):
    """A's pass is held and B waits behind it when the model is unloaded: both get a 503 that
    says to retry (not a 500 from a pass on an engine that is gone), and the next rerank loads it."""
    _, client, gate = held
    gate.touch()
    with cf.ThreadPoolExecutor(2) as pool:
        post = lambda q: client.post("/v1/rerank", json={"model": "rerank-tiny", "query": q, "documents": DOCS})  # noqa: E731
        a = pool.submit(post, "a")
        wait_for(lambda: _row(client)["running_requests"] >= 1, "A reached the engine", every=0.02)
        b = pool.submit(post, "b")
        wait_for(lambda: _row(client)["running_requests"] >= 2, "B waits behind A", every=0.02)
        assert client.post("/v1/models/rerank-tiny/unload").json()["was_loaded"] is True
        gate.unlink()
        for answer in (a.result(), b.result()):
            err = error(answer, 503)
            assert err["code"] == "model_unloaded" and "retry" in err["message"], err
    assert rerank(client, model="rerank-tiny", query="q", documents=["d"])["results"][0]["index"] == 0


def test_langchains_cohere_reranker_works_unchanged_against_v2(server):
    """LangChain's CohereRerank (the Cohere SDK's ClientV2 underneath) with base_url at this server."""
    pytest.importorskip("langchain_cohere")
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    reranker = CohereRerank(model="minilm", base_url=server.url, cohere_api_key="unused", top_n=2)
    docs = [Document(page_content=d, metadata={"n": i}) for i, d in enumerate(DOCS)]
    best = reranker.compress_documents(docs, QUERY)
    assert [d.metadata["n"] for d in best][0] == 1 and len(best) == 2
    assert best[0].metadata["relevance_score"] > best[1].metadata["relevance_score"]
