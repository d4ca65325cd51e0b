"""Output constrained to tool calls in a model's own format, in each engine's grammar terms.

The server describes the calls neutrally (CallGrammar: literal text around JSON objects valid
under the call schemas); llama.cpp gets GBNF, Transformers and vLLM an xgrammar structural tag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class CallGrammar:
    """``begin`` call (``separator`` call)* ``end``: each call a JSON object valid under one of
    ``schemas``; exactly one call unless ``repeat``."""

    begin: str
    schemas: tuple[dict, ...]
    separator: str
    end: str
    repeat: bool


def gbnf(g: CallGrammar) -> str:
    """llama.cpp's grammar (GBNF), its JSON rules from llama-cpp-python's schema converter."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    names = [converter.visit(converter.resolve_refs(s, "tools"), f"call{i}") for i, s in enumerate(g.schemas)]
    call = "( " + " | ".join(names) + " )"
    parts = [_literal(g.begin), call]
    if g.repeat:
        parts.append(f"( {_literal(g.separator)} {call} )*")
    parts.append(_literal(g.end))
    converter._add_rule("root", " ".join(p for p in parts if p))
    return converter.format_grammar()


def structural_tag(g: CallGrammar) -> str:
    """xgrammar's structural tag (JSON text): Transformers compiles it, vLLM takes it as
    ``structural_tag``."""
    schemas = [{"type": "json_schema", "json_schema": s} for s in g.schemas]
    call = schemas[0] if len(schemas) == 1 else {"type": "or", "elements": schemas}
    elements = [call]
    if g.repeat:
        more = {"type": "sequence", "elements": [_const(g.separator), call]} if g.separator else call
        elements.append({"type": "star", "content": more})
    if g.begin:
        elements.insert(0, _const(g.begin))
    if g.end:
        elements.append(_const(g.end))
    return json.dumps({"type": "structural_tag", "format": {"type": "sequence", "elements": elements}})


def _literal(text: str) -> str:
    return json.dumps(text) if text else ""


def _const(text: str) -> dict:
    return {"type": "const_string", "value": text}
