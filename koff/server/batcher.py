"""One worker thread owns the model; concurrent requests are batched into single ``KoffRuntime.run`` calls.

Handlers ``submit`` a :class:`Job` and read its events (``Started``, ``Delta``..., then ``Finished``
or ``Failed``) from an asyncio queue that the worker fills through ``loop.call_soon_threadsafe``.
The worker takes the first waiting job, waits up to ``batch_wait_ms`` for more (up to
``max_batch``), and runs them together even when they name different memories or sampling
parameters: both are per sample in the runtime. Everything that touches the model or the
tokenizer (chat templates, encoding, memory loads and removals) runs on this one thread, so a
memory change can never race with a running batch and the tokenizer is never shared across threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from koff.runtime import KoffRuntime, Sampling, TextStream
from koff.server.errors import APIError, not_found

log = logging.getLogger("koff.server")


# ----- events a job sends back to its handler ---------------------------------------------------
@dataclass
class Started:
    prompt_tokens: int
    max_tokens: int


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: APIError


Event = Started | Delta | Finished | Failed


@dataclass
class Job:
    """One prompt to complete. ``prompt`` is text, or chat messages rendered on the worker."""

    prompt: str | list[dict]
    memory: str | None  # None = the bare backbone
    max_tokens: int | None  # None = as many as fit (capped by the server's default)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    _emit: Callable[[Event], None] | None = None

    def emit(self, event: Event) -> None:
        if self._emit is not None:
            self._emit(event)


class JobHandle:
    """The handler's side of a job: ``await next()`` for events; ``cancel()`` when the client leaves."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job, self._events = job, asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(self._events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        job._emit = emit

    async def next(self) -> Event:
        return await self._events.get()

    def cancel(self) -> None:
        self.job.cancelled.set()


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future


class ServerStream(TextStream):
    """A ``TextStream`` that also ends its sample when the client went away."""

    def __init__(self, tokenizer, stop: Sequence[str], cancelled: threading.Event):
        super().__init__(tokenizer, stop)
        self.cancelled = cancelled

    @property
    def hit_stop(self) -> bool:
        return self.stopped and not self.cancelled.is_set()

    def push(self, token: int) -> str:
        if self.cancelled.is_set():
            self.ids.append(token)
            self.stopped = True
            return ""
        return super().push(token)

    def flush(self) -> str:
        return "" if self.cancelled.is_set() else super().flush()


class Batcher:
    def __init__(self, runtime: KoffRuntime, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 backbone_id: str = "backbone", default_max_tokens: int = 256):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.runtime, self.max_batch, self.batch_wait = runtime, max_batch, batch_wait_ms / 1000
        self.backbone_id, self.default_max_tokens = backbone_id, default_max_tokens
        self.context = int(getattr(runtime.model.base.config, "max_position_embeddings", 0) or 1 << 30)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        # A snapshot for handlers (the event loop thread) to check names and list models without
        # touching the model; the worker replaces it after every memory change.
        self.memory_names: tuple[str, ...] = tuple(runtime.memories)
        self.loaded_at = {name: int(time.time()) for name in self.memory_names}
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "mixed_batches": 0, "completion_tokens": 0,
                      "failed_batches": 0}

    # ----- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="koff-batcher", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            thread, self._stopping = self._thread, True
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
        for item in self._drain():
            if isinstance(item, Job):
                item.emit(Failed(APIError(503, "the server is shutting down")))
            elif isinstance(item, _Call):
                item.future.set_exception(APIError(503, "the server is shutting down"))

    def _drain(self) -> list:
        items = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return [i for i in items if i is not None]
            items.append(item)

    # ----- handlers' side -----------------------------------------------------------------------
    def known(self, model: str) -> bool:
        return model == self.backbone_id or model in self.memory_names

    def models(self) -> list[str]:
        return [self.backbone_id, *self.memory_names]

    def submit(self, job: Job) -> JobHandle:
        """Queue a job; its events arrive on the returned handle (call from the event loop)."""
        self.start()
        handle = JobHandle(job, asyncio.get_running_loop())
        self._queue.put(job)
        return handle

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread between batches (memory loads and removals)."""
        self.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Call(fn, future))
        return await asyncio.wrap_future(future)

    # ----- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            item = self._queue.get()
            if item is None:
                break
            if isinstance(item, _Call):
                self._run_call(item)
                continue
            jobs, call = self._gather(item)
            try:
                self._run_batch(jobs)
            except Exception as err:  # never let one batch take the worker down; fail only its requests
                log.exception("batch failed")
                for job in jobs:  # a handler stops reading at its first Finished/Failed: extras are harmless
                    job.emit(Failed(APIError(500, f"the batch failed: {type(err).__name__}: {err}")))
            if call is not None:
                self._run_call(call)

    def _gather(self, first: Job) -> tuple[list[Job], _Call | None]:
        """The first job plus whatever arrives within the wait window; a queued call ends the batch."""
        jobs, deadline = [first], time.monotonic() + self.batch_wait
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stopping = True
                break
            if isinstance(item, _Call):
                return jobs, item
            jobs.append(item)
        return jobs, None

    def _run_call(self, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            result = call.fn()
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting handler
            self.memory_names = tuple(self.runtime.memories)
            call.future.set_exception(err)
        else:
            self.memory_names = tuple(self.runtime.memories)  # before the handler wakes up and answers
            call.future.set_result(result)

    def _prepare(self, job: Job) -> tuple[str, Sampling, int]:
        """Render and encode the prompt and check that it fits: (text, sampling, prompt tokens)."""
        runtime = self.runtime
        if job.memory is not None and job.memory not in runtime.model.memories:
            raise not_found(job.memory, self.models())
        if isinstance(job.prompt, list):
            if not getattr(runtime.tokenizer, "chat_template", None):
                raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
            text = runtime.tokenizer.apply_chat_template(job.prompt, tokenize=False, add_generation_prompt=True)
        else:
            text = job.prompt
        prompt_tokens = len(runtime.encode(text)) if text else 0
        if prompt_tokens == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        slots = runtime.model.memories[job.memory].slots if job.memory is not None else 0
        room = self.context - slots - prompt_tokens
        max_tokens = job.max_tokens if job.max_tokens is not None else min(self.default_max_tokens, room)
        if max_tokens < 1 or prompt_tokens + max_tokens > self.context - slots:
            raise APIError(
                400, f"This model's maximum context length is {self.context - slots} tokens"
                f"{f' (with the {slots} memory slots of {job.memory!r})' if slots else ''}; the prompt has "
                f"{prompt_tokens} tokens and {max_tokens} were asked for the completion.",
                param="max_tokens" if prompt_tokens < self.context - slots else "prompt", code="context_length_exceeded",
            )
        return text, Sampling(max_tokens, job.temperature, job.top_p, job.seed), prompt_tokens

    def _run_batch(self, jobs: list[Job]) -> None:
        ready: list[tuple[Job, str, Sampling, int]] = []
        for job in jobs:
            if job.cancelled.is_set():
                continue
            try:
                text, sampling, prompt_tokens = self._prepare(job)
                sampling.validate()
            except APIError as err:
                job.emit(Failed(err))
                continue
            except ValueError as err:
                job.emit(Failed(APIError(400, str(err))))
                continue
            except Exception as err:  # noqa: BLE001
                log.exception("cannot prepare a request")
                job.emit(Failed(APIError(500, f"cannot prepare the request: {err}")))
                continue
            job.emit(Started(prompt_tokens, sampling.max_new_tokens))
            ready.append((job, text, sampling, prompt_tokens))
        if not ready:
            return
        runtime = self.runtime
        eos = runtime.tokenizer.eos_token_id
        streams = [ServerStream(runtime.tokenizer, job.stop, job.cancelled) for job, *_ in ready]
        finished = [False] * len(ready)
        self._count(ready)

        def finish(i: int) -> None:
            job, _, sampling, prompt_tokens = ready[i]
            stream = streams[i]
            tail = stream.flush()
            if tail:
                job.emit(Delta(tail))
            done_by_stop = stream.hit_stop or (eos is not None and stream.ids and stream.ids[-1] == eos)
            reason = "stop" if done_by_stop or len(stream.ids) < sampling.max_new_tokens else "length"
            job.emit(Finished(reason, prompt_tokens, len(stream.ids)))
            self.stats["completion_tokens"] += len(stream.ids)
            finished[i] = True

        try:
            for step in runtime.run([r[1] for r in ready], [r[0].memory for r in ready], [r[2] for r in ready], streams):
                for i, delta in step:
                    if delta:
                        ready[i][0].emit(Delta(delta))
                    stream = streams[i]
                    if stream.stopped or stream.ids[-1] == eos or len(stream.ids) >= ready[i][2].max_new_tokens:
                        finish(i)
        except Exception as err:  # noqa: BLE001 - fail this batch's requests, keep serving
            log.exception("generation failed for a batch of %d", len(ready))
            self.stats["failed_batches"] += 1
            for i, (job, *_) in enumerate(ready):
                if not finished[i]:
                    finished[i] = True
                    job.emit(Failed(APIError(500, f"generation failed: {type(err).__name__}: {err}")))
            return
        for i in range(len(ready)):
            if not finished[i]:
                finish(i)

    def _count(self, ready: list) -> None:
        stats = self.stats
        stats["requests"] += len(ready)
        stats["batches"] += 1
        stats["largest_batch"] = max(stats["largest_batch"], len(ready))
        if len({r[0].memory for r in ready}) > 1:
            stats["mixed_batches"] += 1


_ids = itertools.count()


def request_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):04x}"
