"""The operations behind every API front, one serving module per OpenAI family on a shared
base (the way vLLM's entrypoints keep one serving class per endpoint):

  base.py        settings, manager, prompt limits, sampling parameters from a request
  generation.py  the lifecycle of a generation: choices, deadlines, streams, release
  deadline.py    the time limits of a generation, counted from its admission
  chunks.py      the OpenAI encoder of answers and stream chunks (one for every path)
  chat.py, completion.py, embedding.py, models.py: one family each
  retrieval.py   rerank, score, tokenize, detokenize (and a chat request's prompt token count)
  responses.py   the Responses API, a front on the chat operation

The HTTP app (llmserve/web/) and the BentoML APIs (service.py) both call OpenAIOperations.
"""

from __future__ import annotations

from .chat import ChatServing
from .completion import CompletionServing
from .embedding import EmbeddingServing
from .generation import EventStream
from .models import ModelsServing
from .retrieval import RetrievalServing

__all__ = ["OpenAIOperations", "EventStream"]


class OpenAIOperations(ChatServing, CompletionServing, EmbeddingServing, RetrievalServing, ModelsServing):
    """chat / complete / embed, rerank / score / tokenize, and model admin, for one manager and settings."""
