"""``create_app``: the OpenAI-compatible HTTP API over one ``KoffRuntime``.

Routes: ``GET /health``, ``GET /v1/models[/{id}]``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``model`` names a memory, or the bare backbone), and the admin
routes ``GET /v1/memories``, ``POST /v1/memories/load``, ``DELETE /v1/memories/{name}``.
Generation and memory changes all go through the :class:`~koff.server.batcher.Batcher`.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from koff.errors import UserInputError
from koff.runtime import AUTO, KoffRuntime
from koff.server.admin import install_admin_routes, within_export
from koff.server.batcher import Batcher, Delta, Failed, Finished, Job, JobHandle, Started, request_id
from koff.server.errors import APIError, install_error_handlers, not_found
from koff.server.guard import Guard
from koff.server.limits import ConnectionLimits
from koff.server.responses import DONE, Shape, sse
from koff.server.schemas import ChatRequest, CompletionRequest, SamplingFields

DEFAULT_MAX_BODY_BYTES = 1 << 20
MEMORY_HEADER = "x-koff-memory"


def _named(models: list[str]) -> str:
    """The answer's ``model``: the one every prompt ran on, else each in order, comma-separated."""
    return models[0] if len(set(models)) == 1 else ",".join(models)


def create_app(
    runtime: KoffRuntime,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = 8,
    batch_wait_ms: float = 5.0,
    backbone_id: str = "backbone",
    default_max_tokens: int = 256,
    limits: ConnectionLimits = ConnectionLimits(),
    auto_fallback: str | None = None,
) -> FastAPI:
    """An app serving ``runtime``; ``api_key`` (if set) is required as ``Authorization: Bearer``.
    ``limits`` bound how long reading a request may take; ``app.state.limits.protocol()`` is the
    uvicorn protocol that enforces the connection-level ones. ``model: "auto"`` asks the export's
    router for a memory; a prompt it is not confident about goes to ``auto_fallback`` (a memory
    name; None: the bare backbone)."""
    batcher = Batcher(runtime, max_batch=max_batch, batch_wait_ms=batch_wait_ms, backbone_id=backbone_id,
                      default_max_tokens=default_max_tokens)
    if auto_fallback is not None and auto_fallback not in batcher.memory_names:
        raise UserInputError(f"the fallback for model 'auto', {auto_fallback!r}, is not a loaded memory")
    if backbone_id in batcher.memory_names:
        raise UserInputError(f"a memory is named {backbone_id!r}, the id of the bare backbone; pass another backbone_id")
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="koff", summary="OpenAI-compatible API over a koff backbone and its memories", lifespan=lifespan)
    app.state.runtime, app.state.batcher, app.state.limits = runtime, batcher, limits
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=limits.body_timeout_s)

    # ----- information --------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        # open without a key (for probes): counts only, no model names
        return {"status": "ok", "memories": len(batcher.memory_names), "batcher": batcher.stats}

    def card(model: str) -> dict:
        kind = "backbone" if model == backbone_id else "memory"
        return {"id": model, "object": "model", "created": batcher.loaded_at.get(model, started), "owned_by": "koff",
                "koff_kind": kind}

    @app.get("/v1/models")
    async def list_models() -> dict:
        routed = [card(AUTO) | {"koff_kind": "router"}] if runtime.router is not None else []
        return {"object": "list", "data": [card(m) for m in batcher.models()] + routed}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        return card(_check_model(model))

    @app.get("/v1/memories")
    async def list_memories() -> dict:
        info = await batcher.call(runtime.info)
        broken = {name: within_export(reason, runtime.folder) for name, reason in info["broken"].items()}
        return {"object": "list", "backbone": backbone_id, "memories": info["memories"], "broken": broken}

    # ----- generation ---------------------------------------------------------------------------
    def _check_model(model: str) -> str:
        if not batcher.known(model):
            raise not_found(model, batcher.models())
        return model

    def _job(prompt: str | list[dict], body: SamplingFields, max_tokens: int | None, model: str) -> Job:
        memory = None if _check_model(model) == backbone_id else model
        return Job(prompt, memory, max_tokens, body.temperature, body.top_p, body.seed, body.stop)

    async def _models(body: SamplingFields, texts: list[str]) -> list[str]:
        """The model each prompt runs on: the one named, or for "auto" the router's pick, chosen
        before the request joins a batch (on the worker, between decode steps)."""
        if body.model != AUTO:
            return [body.model] * len(texts)
        try:
            picks = await batcher.call(lambda: runtime.route(texts))
        except UserInputError as err:
            raise APIError(400, str(err), param="model", code="no_router") from err
        return [name or auto_fallback or backbone_id for name, _ in picks]

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        models = await _models(body, body.prompts)
        jobs = [_job(prompt, body, body.max_tokens, model) for prompt, model in zip(body.prompts, models)]
        return await _respond(jobs, body, Shape(request_id("cmpl"), _named(models), chat=False), request, models)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [m.plain() for m in body.messages]
        models = await _models(body, ["\n".join(m["content"] for m in messages if m["role"] == "user")])
        job = _job(messages, body, body.limit, models[0])
        return await _respond([job], body, Shape(request_id("chatcmpl"), models[0], chat=True), request, models)

    async def _respond(jobs: list[Job], body: SamplingFields, shape: Shape, request: Request, models: list[str]):
        # Which memory served each prompt (the router's pick for "auto"), comma-separated.
        headers = {MEMORY_HEADER: ",".join(models)}
        handles = [batcher.submit(job) for job in jobs]
        try:
            if body.stream:
                first = await _started(handles[0])  # errors found before generation keep their HTTP status
                return StreamingResponse(_stream(handles[0], first, shape, body.include_usage),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
            results = await _unless_disconnected(request, asyncio.gather(*(_collect(h) for h in handles)))
            if results is None:  # the client went away: its samples were stopped; nobody reads this
                for handle in handles:
                    handle.cancel()
                return Response(status_code=499)
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        prompt_tokens = sum(r[2] for r in results)
        completion_tokens = sum(r[3] for r in results)
        return JSONResponse(shape.answer([(r[0], r[1]) for r in results], prompt_tokens, completion_tokens), headers=headers)

    install_admin_routes(app)
    return app


async def _unless_disconnected(request: Request, work):
    """The result of ``work``, or None as soon as the client has disconnected (``work`` is then
    cancelled): a non-streamed request must not go on generating for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.add_done_callback(_retrieve)  # its CancelledError is expected: not "never retrieved"
    task.cancel()
    return None


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _disconnect(request: Request, poll_seconds: float = 0.05) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(poll_seconds)


async def _started(handle: JobHandle) -> Started:
    event = await handle.next()
    if isinstance(event, Failed):
        raise event.error
    assert isinstance(event, Started), event
    return event


async def _collect(handle: JobHandle) -> tuple[str, str, int, int]:
    """(text, finish_reason, prompt tokens, completion tokens) of one job run to its end."""
    parts: list[str] = []
    while True:
        event = await handle.next()
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return "".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens


async def _stream(handle: JobHandle, first: Started, shape: Shape, include_usage: bool) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield shape.chunk(first=True)
        while True:
            event = await handle.next()
            if isinstance(event, Delta):
                yield shape.chunk(event.text)
            elif isinstance(event, Finished):
                yield shape.chunk(finish_reason=event.finish_reason)
                if include_usage:
                    yield shape.usage_chunk(event.prompt_tokens, event.completion_tokens)
                break
            elif isinstance(event, Failed):  # the status line is sent already: report in-band
                yield sse(event.error.body())
                break
        yield DONE
    finally:
        handle.cancel()  # a client that went away stops its sample at the next token
