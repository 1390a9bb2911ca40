"""Admin routes: load a memory folder of the served export, or unload one, without a restart.

Both run on the batcher's worker thread between decode steps, so they never race with generation. A
folder must lie inside the export's ``memories/`` (after resolving ``..`` and symlinks), and
only its JSON manifest and safetensors files are read. The routes use the runtime's public methods only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import FastAPI

from koff.data.sources import DomainDataError, validate_domain_name
from koff.model import UnknownMemoryError
from koff.runtime import KoffRuntime, MemoryLoadError
from koff.runtime.runtime import inside
from koff.server.batcher import Batcher
from koff.server.errors import APIError, not_found
from koff.server.schemas import LoadMemoryRequest


def install_admin_routes(app: FastAPI) -> None:
    """``/v1/memories/load`` and ``DELETE /v1/memories/{name}``: change memories without a restart."""
    runtime: KoffRuntime = app.state.runtime
    batcher: Batcher = app.state.batcher
    root = (runtime.folder / "memories").resolve()

    def inside_memories(raw: str) -> Path:
        """The folder, resolved (symlinks too), if it lies inside the export's memories/ folder."""
        path = Path(raw)
        try:
            return inside(path if path.is_absolute() else root / path, root)
        except MemoryLoadError as err:
            raise APIError(400, f"the memory folder must lie inside {root.name}/ of the served export", param="path",
                           code="path_outside_memories") from err

    @app.post("/v1/memories/load")
    async def load_memory(body: LoadMemoryRequest) -> dict:
        folder = inside_memories(body.path)
        requested = _valid_name(body.name, batcher.backbone_id) if body.name is not None else None

        def load() -> str:
            name = requested if requested is not None else runtime.memory_name(folder)  # None: add_memory says why
            if name == batcher.backbone_id:
                raise APIError(400, f"{name!r} is the id of the bare backbone; load the memory under another name",
                               param="name")
            if name is not None and name in runtime.memories:
                raise APIError(409, f"a memory named {name!r} is already loaded; unload it first or pass another name",
                               param="name", code="memory_exists")
            try:
                return runtime.add_memory(folder, name)
            except MemoryLoadError as err:
                raise APIError(400, within_export(str(err), runtime.folder), param="path", code="invalid_memory") from err

        name = await batcher.call(load)
        batcher.loaded_at[name] = int(time.time())
        return {"id": name, "object": "model", "loaded": True, "models": batcher.models()}

    @app.delete("/v1/memories/{name}")
    async def unload_memory(name: str) -> dict:
        if name == batcher.backbone_id:
            raise APIError(400, "the bare backbone cannot be unloaded", param="name")

        def remove() -> None:
            try:
                runtime.remove_memory(name)
            except UnknownMemoryError as err:
                raise not_found(name, batcher.models()) from err

        await batcher.call(remove)
        batcher.loaded_at.pop(name, None)
        return {"id": name, "object": "model", "deleted": True}


def within_export(message: str, export: Path) -> str:
    """``message`` with the export's location on the server removed: clients see paths inside the export only."""
    for prefix in sorted({str(export.resolve()), str(export.absolute()), str(export)}, key=len, reverse=True):
        message = message.replace(prefix + os.sep, "")
    return message


def _valid_name(name: str, backbone_id: str) -> str:
    try:
        validate_domain_name(name)
    except DomainDataError as err:
        raise APIError(400, str(err), param="name") from err
    if name == backbone_id:
        raise APIError(400, f"{name!r} is the id of the bare backbone", param="name")
    return name
