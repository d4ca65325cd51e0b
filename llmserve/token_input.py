"""Token-id input of /v1/embeddings: ids are ids of the served model's own vocabulary.

Where it sits: the embeddings operation gets ``input`` as lists of ids (OpenAI's API takes them),
turns them back into text with the model's tokenizer and embeds that text, as llama.cpp's server
and vLLM do. ``token_id_texts`` decodes them and first checks that they look like this model's
tokens, so that a client that tokenized with another vocabulary gets a 400 naming ``input``
instead of an embedding of whatever its ids happen to spell here.

The client that does this by default is LangChain's ``OpenAIEmbeddings`` (langchain-openai): it
encodes every text with tiktoken's cl100k_base (ids 0..100,276) and sends the ids, whatever the
served model. Two checks, measured on real texts (benchmarks/token_ids/README.md):
- an id past the vocabulary: most cl100k inputs of a sentence or more hold one;
- a round trip: ids of the model's own tokenizer decode to a text that encodes back to the same
  ids, while ids of another vocabulary decode to a jumble of this vocabulary's pieces that
  encodes to other ids. No input of the model's own ids fell below MIN_AGREEMENT there; on
  MiniLM every cl100k sentence did, on SmolLM2's byte-level vocabulary 83% of them.
Neither catches a one- to three-word cl100k input whose ids spell words here too (cl100k
"tuple" is MiniLM's "slices").
"""

from __future__ import annotations

from collections import Counter
from typing import Awaitable, Callable, Optional, Sequence

from .errors import InvalidRequest

# Below this share of ids back from the round trip (pooled over the request) it is refused. The
# lowest share of the model's own inputs measured was 0.938 (benchmarks/token_ids/RESULTS.md);
# 0.95 would catch more cl100k sentences on SmolLM2 (93% for 83%) but refused one own window.
MIN_AGREEMENT = 0.9
# A window of ids cut out of a longer encoding may start inside a word or a UTF-8 character: its
# first and last ids need not come back, so inputs this long are compared without their EDGE ids
# at either end.
EDGE, EDGE_FROM = 2, 16
# a character no vocabulary has (cuneiform sign A): the encoder gives it its unknown token
# ([UNK]), or its UTF-8 bytes where the vocabulary falls back to bytes (then no id is excused)
UNKNOWN_PROBE = "\U00012000"

CL100K_SIZE = 100_277  # tiktoken's cl100k_base: ids 0..100276, its specials at the top

LANGCHAIN_HINT = (
    "Token ids must be ids of this model's own tokenizer. LangChain's OpenAIEmbeddings sends tiktoken "
    "cl100k_base ids by default: create it with check_embedding_ctx_length=False to send the text "
    "instead, or send text (a string or a list of strings) as input."
)

Decode = Callable[[list[int]], Awaitable[str]]
Encode = Callable[[str], Awaitable[list[int]]]


def out_of_vocabulary(ids_lists: Sequence[Sequence[int]], vocab_size: Optional[int]) -> Optional[str]:
    """The message for ids past the vocabulary (None when all fit or the size is unknown)."""
    if vocab_size is None:
        return None
    top = max(max(ids) for ids in ids_lists)
    if top < vocab_size:
        return None
    hint = f" {LANGCHAIN_HINT}" if top < CL100K_SIZE else ""
    return f"input holds token id {top}, outside this model's vocabulary (0..{vocab_size - 1}).{hint}"


async def round_trips(ids_lists: Sequence[Sequence[int]], texts: Sequence[str], encode: Encode) -> list[tuple[int, int]]:
    """(ids back, ids compared) for each input: how many of its ids are among the ids of its
    decoded text encoded again, counted as a multiset (a local re-split costs only the ids it
    changes). Left out of the comparison: the ids ``encode`` adds to every text ([CLS]/[SEP], BOS:
    a client may send them or not), the EDGE ids at each end of a long input (a window cut out of
    a longer encoding may start inside a word or a UTF-8 character), and the unknown token (the
    model's own tokenizer gives [UNK] for what its vocabulary lacks, and decoding drops it). Other
    ids that decoding drops (control tokens in mid-text) count as changed: text does not encode to
    them."""
    added = frozenset(await encode(""))
    unknown = [t for t in await encode(UNKNOWN_PROBE) if t not in added]
    unknown = frozenset(unknown) if len(unknown) == 1 else frozenset()  # several: bytes, not an [UNK]
    out = []
    for ids, text in zip(ids_lists, texts):
        a = [t for t in ids if t not in added]
        if len(a) >= EDGE_FROM:
            a = a[EDGE:-EDGE]
        a = [t for t in a if t not in unknown]
        again = Counter(t for t in await encode(text) if t not in added)
        out.append((len(a) - sum((Counter(a) - again).values()), len(a)))
    return out


async def check_token_ids(ids_lists: Sequence[Sequence[int]], texts: Sequence[str], vocab_size: Optional[int],
                          encode: Encode) -> Optional[str]:
    """Why ``ids_lists`` do not look like this model's tokens, or None when they do. ``texts`` are
    their decoded texts (the engine's ``decode``), ``encode`` the engine's ``encode_text``.
    The round trip is pooled over the request: a batch of short inputs is judged on all its ids."""
    problem = out_of_vocabulary(ids_lists, vocab_size)
    if problem is not None:
        return problem
    trips = await round_trips(ids_lists, texts, encode)
    back, compared = sum(k for k, _ in trips), sum(n for _, n in trips)
    if compared and back / compared < MIN_AGREEMENT:
        return (f"input does not look like token ids of this model: decoded with its tokenizer and encoded "
                f"again, {compared - back} of {compared} ids come back different. {LANGCHAIN_HINT}")
    return None


async def token_id_texts(ids_lists: Sequence[Sequence[int]], vocab_size: Optional[int], decode: Decode,
                         encode: Encode) -> list[str]:
    """The texts token-id input spells in this model's vocabulary, each decoded once; an
    ``InvalidRequest`` on ``input`` when its ids are past the vocabulary or do not look like
    this model's tokens (``check_token_ids``)."""
    problem = out_of_vocabulary(ids_lists, vocab_size)
    if problem is None:
        texts = [await decode(list(ids)) for ids in ids_lists]
        problem = await check_token_ids(ids_lists, texts, None, encode)
    if problem is not None:
        raise InvalidRequest(problem, param="input", code="invalid_value")
    return texts
