"""What an engine checks of a PEFT LoRA adapter before it loads it: its adapter_config.json read
once, and its rank and target modules against what the base (or the engine) can take, so that an
adapter that does not fit is a BadInput naming the key at fault (`r`, `target_modules`), raised
before the engine is touched, and the base keeps serving."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Optional

from .base import Adapter
from .errors import BadInput


@dataclass(frozen=True)
class LoraShape:
    """The keys of a PEFT adapter_config.json that decide whether a base can take it."""

    r: int
    target_modules: frozenset[str] | str  # module names, or PEFT's regular expression
    peft_type: str


def lora_shape(adapter: Adapter) -> LoraShape:
    """The adapter's PEFT configuration; a missing or unreadable one is a BadInput naming `model`."""
    path = adapter.path / "adapter_config.json"
    if not adapter.path.is_dir():
        raise BadInput(f"Adapter {adapter.name!r}: no PEFT directory at {adapter.path} (its `adapters` entry in "
                       "configuration.yaml).", param="model", code="adapter_not_found")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"Adapter {adapter.name!r}: {path} cannot be read as a PEFT adapter_config.json ({exc}).",
                       param="model", code="adapter_invalid") from None
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise BadInput(f"Adapter {adapter.name!r}: peft_type is {peft_type}; only LoRA adapters are served.",
                       param="peft_type", code="adapter_invalid")
    targets = config.get("target_modules") or []
    return LoraShape(int(config.get("r", 8)), targets if isinstance(targets, str) else frozenset(targets), peft_type)


def check_rank(adapter: Adapter, shape: LoraShape, limit: int, key: str) -> None:
    """An adapter past the engine's largest rank (``key``: the setting that raises it)."""
    if shape.r > limit:
        raise BadInput(f"Adapter {adapter.name!r} has rank r={shape.r}, more than this engine's limit of {limit} "
                       f"({key}); raise {key} or serve an adapter of a smaller rank.", param="r",
                       code="adapter_rank_too_large")


def check_targets(adapter: Adapter, shape: LoraShape, module_names: Iterable[str],
                  supported: Optional[set[str]] = None) -> None:
    """Every target module the adapter names must be a module of the base (by its last name part,
    as PEFT matches a list), and one the engine can adapt where it says which (``supported``)."""
    if isinstance(shape.target_modules, str):  # a regular expression: PEFT itself matches it
        return
    names = {n.rsplit(".", 1)[-1] for n in module_names}
    missing = sorted(shape.target_modules - names)
    if missing:
        raise BadInput(f"Adapter {adapter.name!r}: target_modules {missing} are not modules of the base model; "
                       "it was trained on another architecture.", param="target_modules", code="adapter_mismatch")
    if supported is not None and not shape.target_modules <= supported:
        raise BadInput(f"Adapter {adapter.name!r}: target_modules {sorted(shape.target_modules - supported)} cannot "
                       f"take LoRA on this engine (it adapts {sorted(supported)}).", param="target_modules",
                       code="adapter_mismatch")
