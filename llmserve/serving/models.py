"""Model admin: the alias list (/v1/models, /models) and loading and unloading at run time."""

from __future__ import annotations

from typing import Any

from .base import Serving


class ModelsServing(Serving):
    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": self.manager.list_models()}

    async def load_model(self, name: str) -> dict[str, Any]:
        return {"id": name, "loaded": True, **(await self.manager.load(name))}

    async def unload_model(self, name: str) -> dict[str, Any]:
        return {"id": name, "loaded": False, "was_loaded": await self.manager.unload(name)}
