"""The Anthropic Messages routes: filled in by issue 32's work."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
