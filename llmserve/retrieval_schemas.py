"""Request bodies of the retrieval API (rerank, score, tokenize, detokenize), pydantic only.

The shapes vLLM's and llama.cpp's servers accept: rerank in the Cohere / Jina shape (``query``,
``documents`` as strings or ``{"text": ...}``, ``top_n``, ``return_documents``), score with vLLM's
``text_1`` / ``text_2`` pairing, tokenize with vLLM's two bodies (``prompt``, or ``messages`` with
``add_generation_prompt``). The same models type the BentoML native APIs in service.py.
Unknown fields are ignored, as in llmserve/schemas.py; the truncation options of vLLM and Cohere,
which this server does not implement, are refused with a 400 naming them (unset or null they are
not sent by LangChain's or Cohere's clients).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Optional, Union

from pydantic import Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from .schemas import ChatMessage, Tool, _Body, _NullIsUnset


class TextDocument(_NullIsUnset):
    text: str


class _Truncation(_Body):
    """vLLM's truncate_prompt_tokens: a text past the context is a 400 here, not cut."""

    truncate_prompt_tokens: Any = None
    UNSERVED: ClassVar[tuple[str, ...]] = ("truncate_prompt_tokens",)

    @model_validator(mode="after")
    def _no_truncation(self):
        for name in self.UNSERVED:
            if getattr(self, name) is not None:
                raise _invalid(name, "is not supported by this server: a text past the model's context is refused "
                                     "with a 400 naming it, never truncated; leave it out and shorten the text")
        return self


class RerankRequest(_Truncation):
    model: Optional[str] = Field(None, description="alias of a rerank or embedding model; embedding_model when empty")
    query: str = Field(..., min_length=1)
    documents: list[Union[str, TextDocument]] = Field(..., min_length=1)
    top_n: Optional[StrictInt] = Field(None, ge=0, description="the n most relevant; 0 or none: all (as vLLM)")
    return_documents: bool = False
    # Cohere's truncation options (max_chunks_per_doc: v1's), refused as vLLM's is
    max_tokens_per_doc: Any = None
    max_chunks_per_doc: Any = None
    UNSERVED: ClassVar[tuple[str, ...]] = ("truncate_prompt_tokens", "max_tokens_per_doc", "max_chunks_per_doc")

    @model_validator(mode="after")
    def _no_empty_document(self) -> "RerankRequest":
        for i, d in enumerate(self.documents):
            if not (d if isinstance(d, str) else d.text):  # an engine reads no token of it
                raise _invalid(f"documents.{i}" if isinstance(d, str) else f"documents.{i}.text", "must not be empty")
        return self

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(_Truncation):
    """vLLM's pairing: one text_1 with each text_2 (1:N), or text_1[i] with text_2[i] (N:N)."""

    model: Optional[str] = Field(None, description="alias of a rerank or embedding model; embedding_model when empty")
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]

    @model_validator(mode="after")
    def _pairs_match(self) -> "ScoreRequest":
        one, two = self.firsts(), self.seconds()
        if not one:
            raise _invalid("text_1", "must not be empty")
        if not two:
            raise _invalid("text_2", "must not be empty")
        for field in ("text_1", "text_2"):
            value = getattr(self, field)
            for i, text in enumerate([value] if isinstance(value, str) else value):
                if not text:  # an engine reads no token of it
                    raise _invalid(field if isinstance(value, str) else f"{field}.{i}", "must not be empty")
        if len(one) > 1 and len(one) != len(two):
            raise _invalid("text_2", f"text_1 has {len(one)} texts and text_2 {len(two)}: give one text_1 for all "
                                     "text_2 (1:N) or as many of each (N:N)")
        return self

    def firsts(self) -> list[str]:
        return [self.text_1] if isinstance(self.text_1, str) else self.text_1

    def seconds(self) -> list[str]:
        return [self.text_2] if isinstance(self.text_2, str) else self.text_2

    def pairs(self) -> list[tuple[str, str]]:
        one, two = self.firsts(), self.seconds()
        return list(zip(one * len(two) if len(one) == 1 else one, two))


class TokenizeRequest(_Body):
    """vLLM's TokenizeCompletionRequest (``prompt``) or TokenizeChatRequest (``messages``) in one
    body: exactly one of the two."""

    model: Optional[str] = Field(None, description="alias; default_model when empty")
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    tools: Optional[list[Tool]] = None  # rendered by the chat template, as the chat route does
    # default: true for a prompt, false for messages (the chat template writes them), as in vLLM
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: bool = True
    # the chat route's prefill (ChatCompletionRequest.continue_final_message): the last assistant
    # message continued rather than closed; vLLM's field. add_generation_prompt does not apply to
    # it (vLLM refuses both true; here the prompt is the chat route's either way)
    continue_final_message: bool = False
    return_token_strs: bool = False
    # vLLM's; refused (serving/retrieval.py): the chat route renders with the alias's template only
    chat_template: Any = None
    chat_template_kwargs: Any = None

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise _invalid("prompt", "give exactly one of `prompt` or `messages`")
        return self


class DetokenizeRequest(_Body):
    model: Optional[str] = Field(None, description="alias; default_model when empty")
    tokens: list[Annotated[StrictInt, Field(ge=0)]]  # as vLLM's DetokenizeRequest


def _invalid(field: str, message: str) -> PydanticCustomError:
    """A check of the whole body that names the field at fault (llmserve.errors reads ``field``)."""
    return PydanticCustomError("invalid_value", message, {"field": field})
