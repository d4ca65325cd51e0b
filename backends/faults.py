"""Fault injection for tests: makes one chosen request fail inside an engine's step.

Off unless ``LLMSERVE_FAULTS`` is set when an engine loads, e.g.
``LLMSERVE_FAULTS=admit:990001,sample:990002`` (stage:seed, comma-separated): a request with
that ``seed`` raises InjectedFault at that stage, while every other request runs as usual.
Stages: ``admit``, ``sample``, ``detokenize`` (one request's part of a step), ``loop`` (the
step loop itself, outside any request: the loop thread dies) and ``trim`` (llama.cpp: removing
the tail of a slot's cached prompt reports failure, as on a sliding-window model).
Engines hold ``None`` when it is off, so the serving path pays one ``is not None`` test.

``LLMSERVE_HOLD_FILE=PATH`` (also for tests): while that file exists, the batched input passes
(embeddings, cross-encoder scoring: scheduling.InputBatcher) wait before they start, so a test
can line requests up behind a pass and let it go when it chooses (see Hold).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger("llmserve")

STAGES = ("admit", "sample", "detokenize", "loop", "trim")


class InjectedFault(RuntimeError):
    """Raised by a fault a test asked for."""


class Faults:
    def __init__(self, seeds: dict[int, str]):
        self._stage_of = seeds  # seed -> stage

    def hits(self, stage: str, seed: Optional[int]) -> bool:
        return seed is not None and self._stage_of.get(seed) == stage

    def check(self, stage: str, seed: Optional[int]) -> None:
        if self.hits(stage, seed):
            raise InjectedFault(f"injected fault at stage {stage!r} (seed {seed})")

    def check_any(self, stage: str, seeds: Iterable[Optional[int]]) -> None:
        for seed in seeds:
            self.check(stage, seed)


def from_env() -> Optional[Faults]:
    """The faults ``LLMSERVE_FAULTS`` asks for, or None (the default: no fault hook at all)."""
    spec = os.environ.get("LLMSERVE_FAULTS", "").strip()
    if not spec:
        return None
    seeds = {}
    for item in spec.split(","):
        stage, _, seed = item.strip().partition(":")
        if stage not in STAGES:
            raise ValueError(f"LLMSERVE_FAULTS: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        seeds[int(seed)] = stage
    log.warning("LLMSERVE_FAULTS is set: requests with seeds %s fail on purpose (a test setting; unset it to "
                "serve)", ", ".join(f"{seed} ({stage})" for seed, stage in seeds.items()))
    return Faults(seeds)


class Hold:
    """A gate a test opens by deleting a file: what waits on it goes on once the file is gone."""

    def __init__(self, path: Path):
        self.path = path

    async def passed(self) -> None:
        while self.path.exists():  # a test's hold lasts a second or so: polling costs nothing to serving
            await asyncio.sleep(0.01)


def hold_from_env() -> Optional[Hold]:
    """The gate ``LLMSERVE_HOLD_FILE`` names, or None (the default)."""
    path = os.environ.get("LLMSERVE_HOLD_FILE", "").strip()
    if not path:
        return None
    log.warning("LLMSERVE_HOLD_FILE is set: batched input passes wait while %s exists (a test setting)", path)
    return Hold(Path(path))
