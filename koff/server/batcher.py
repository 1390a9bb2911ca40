"""One worker thread owns the model; concurrent requests are batched into single ``KoffRuntime.run`` calls.

Handlers ``submit`` a :class:`Job` and read its events (``Started``, ``Delta``..., then ``Finished``
or ``Failed``) from an asyncio queue that the worker fills through ``loop.call_soon_threadsafe``.
The worker keeps one running batch (continuous batching): when idle it takes the first waiting
job and waits up to ``batch_wait_ms`` for more; while generating, jobs that arrive join the
running batch at the next step (up to ``max_batch`` samples) and finished ones leave it. Samples
may name different memories and sampling parameters: both are per sample in the runtime. Everything that touches the model or the
tokenizer (chat templates, encoding, memory loads and removals) runs on this one thread, so a
memory change can never race with a running batch and the tokenizer is never shared across threads.
Memory loads, removals and listings wait in their own queue and run before the next decode step,
even while the batch is full. A sample whose output turns non-finite fails alone; the rest of the
batch goes on.
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

from koff.errors import UserInputError
from koff.runtime import DecodeBatch, KoffRuntime, Sampling, TextStream
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
            raise UserInputError("max_batch must be at least 1")
        self.runtime, self.max_batch, self.batch_wait = runtime, max_batch, batch_wait_ms / 1000
        self.backbone_id, self.default_max_tokens = backbone_id, default_max_tokens
        self.context = runtime.context
        self._queue: queue.Queue = queue.Queue()  # jobs, _WAKE (a call is waiting) and None (stop)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        # A snapshot for handlers (the event loop thread) to check names and list models without
        # touching the model; the worker replaces it after every memory change.
        self.memory_names: tuple[str, ...] = tuple(runtime.memories)
        self.loaded_at = {name: int(time.time()) for name in self.memory_names}
        # steps: decode steps; step_rows: samples over all steps (mean batch = step_rows / steps);
        # mixed_steps: steps whose samples named more than one memory (or the bare backbone and one).
        self.stats = {"requests": 0, "steps": 0, "step_rows": 0, "largest_batch": 0, "mixed_steps": 0,
                      "completion_tokens": 0, "failed_steps": 0, "failed_requests": 0, "cancelled": 0}

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
        for item in _drain(self._queue) + _drain(self._calls):
            if isinstance(item, Job):
                item.emit(Failed(APIError(503, "the server is shutting down")))
            elif isinstance(item, _Call):
                item.future.set_exception(APIError(503, "the server is shutting down"))

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
        """Run ``fn`` on the worker thread between decode steps (memory loads and removals)."""
        self.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put(_Call(fn, future))
        self._queue.put(_WAKE)  # an idle worker wakes up; a busy one runs it before its next step
        return await asyncio.wrap_future(future)

    # ----- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        batch, live = self.runtime.new_batch(), {}
        while not self._stopping:
            self._run_calls()  # between steps, however full the batch is
            if live:  # join the running batch at its next step
                jobs = self._take([], self.max_batch - len(live))
            else:
                item = self._queue.get()
                if item is None:
                    break
                if item is _WAKE:
                    continue
                jobs = self._take([item], self.max_batch, time.monotonic() + self.batch_wait)  # start from idle
            for job in jobs:
                self._admit(job, batch, live)
            if live and not self._step(batch, live):
                batch = self.runtime.new_batch()  # a failed step leaves the batch's state unknown
        for entry in live.values():
            entry.job.emit(Failed(APIError(503, "the server is shutting down")))

    def _next_item(self, timeout: float | None) -> Job | None:
        """The next queued job, running calls (memory loads) on the way; None when none is waiting."""
        while True:
            try:
                item = self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
            except queue.Empty:
                return None
            if item is None:
                self._stopping = True
                return None
            if item is _WAKE:
                self._run_calls()  # between steps: never during a forward pass
                continue
            return item

    def _take(self, jobs: list[Job], limit: int, deadline: float | None = None) -> list[Job]:
        """Add queued jobs to ``jobs`` up to ``limit``: those already waiting, and until ``deadline``
        (a ``time.monotonic()`` value) those that arrive."""
        while len(jobs) < limit and not self._stopping:
            remaining = deadline - time.monotonic() if deadline is not None else 0.0
            job = self._next_item(remaining if remaining > 0 else None)
            if job is None:
                break
            jobs.append(job)
        return jobs

    def _run_calls(self) -> None:
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            self._run_call(call)

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

    def _prepare(self, job: Job) -> tuple[list[int], Sampling]:
        """Render and encode the prompt and check that it fits: (token ids, sampling)."""
        runtime = self.runtime
        if job.memory is not None and job.memory not in runtime.memories:
            raise not_found(job.memory, self.models())
        if isinstance(job.prompt, list):
            if not getattr(runtime.tokenizer, "chat_template", None):
                raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
            text = runtime.tokenizer.apply_chat_template(job.prompt, tokenize=False, add_generation_prompt=True)
        else:
            text = job.prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            field = "messages" if isinstance(job.prompt, list) else "prompt"
            raise APIError(400, f"the {field} is not valid Unicode text: it holds {err.object[err.start:err.end]!r} "
                           "(a lone surrogate), which no tokenizer can encode", param=field, code="invalid_text") from err
        ids = runtime.encode(text) if text else []
        prompt_tokens = len(ids)
        if prompt_tokens == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        slots = runtime.memory_slots(job.memory)
        room = self.context - slots - prompt_tokens
        max_tokens = job.max_tokens if job.max_tokens is not None else min(self.default_max_tokens, room)
        if max_tokens < 1 or prompt_tokens + max_tokens > self.context - slots:
            raise APIError(
                400, f"This model's maximum context length is {self.context - slots} tokens"
                f"{f' (with the {slots} memory slots of {job.memory!r})' if slots else ''}; the prompt has "
                f"{prompt_tokens} tokens and {max_tokens} were asked for the completion.",
                param="max_tokens" if prompt_tokens < self.context - slots else "prompt", code="context_length_exceeded",
            )
        return ids, Sampling(max_tokens, job.temperature, job.top_p, job.seed)

    def _admit(self, job: Job, batch: DecodeBatch, live: dict) -> None:
        """Check and encode a job and add it to the running batch, or fail it with its error."""
        if job.cancelled.is_set():
            return
        try:
            ids, sampling = self._prepare(job)
            key = batch.add(ids, job.memory, sampling)
        except APIError as err:
            job.emit(Failed(err))
            return
        except ValueError as err:
            job.emit(Failed(APIError(400, str(err))))
            return
        except Exception as err:  # noqa: BLE001
            log.exception("cannot prepare a request")
            job.emit(Failed(APIError(500, f"cannot prepare the request: {err}")))
            return
        job.emit(Started(len(ids), sampling.max_new_tokens))
        live[key] = _Live(job, ServerStream(self.runtime.tokenizer, job.stop, job.cancelled), sampling, len(ids))
        self.stats["requests"] += 1

    def _step(self, batch: DecodeBatch, live: dict) -> bool:
        """One token for every live job; False (and every live job failed) when the step raised."""
        try:
            step = batch.step()
        except Exception as err:  # noqa: BLE001 - fail the batch's requests, keep serving
            log.exception("generation failed for a batch of %d", len(live))
            self.stats["failed_steps"] += 1
            for entry in live.values():
                entry.job.emit(Failed(APIError(500, f"generation failed: {type(err).__name__}: {err}")))
            live.clear()
            return False
        for key, reason in batch.take_failures().items():  # these failed alone; the rest go on
            self.stats["failed_requests"] += 1
            log.warning("a request failed alone: %s", reason)
            live.pop(key).job.emit(Failed(APIError(500, f"generation failed for this request: {reason}",
                                                   code="generation_failed")))
        self._count(step, live)
        for key, token in step:
            entry = live[key]
            delta = entry.stream.push(token)
            if entry.stream.stopped:
                batch.stop(key)
            if delta:
                entry.job.emit(Delta(delta))
            if batch.is_done(key):
                self._finish(live.pop(key))
        return True

    def _finish(self, entry: "_Live") -> None:
        stream = entry.stream
        tail = stream.flush()
        if tail:
            entry.job.emit(Delta(tail))
        done_by_stop = stream.hit_stop or bool(stream.ids and stream.ids[-1] in self.runtime.eos_ids)
        reason = "stop" if done_by_stop or len(stream.ids) < entry.sampling.max_new_tokens else "length"
        entry.job.emit(Finished(reason, entry.prompt_tokens, len(stream.ids)))
        self.stats["completion_tokens"] += len(stream.ids)
        self.stats["cancelled"] += entry.job.cancelled.is_set()

    def _count(self, step: list[tuple[int, int]], live: dict) -> None:
        stats = self.stats
        stats["steps"] += 1
        stats["step_rows"] += len(step)
        stats["largest_batch"] = max(stats["largest_batch"], len(step))
        if len({live[key].job.memory for key, _ in step}) > 1:
            stats["mixed_steps"] += 1


@dataclass
class _Live:
    """A job in the running batch."""

    job: Job
    stream: ServerStream
    sampling: Sampling
    prompt_tokens: int


def _drain(q: queue.Queue | queue.SimpleQueue) -> list:
    """Everything waiting in ``q`` but the wake-up and stop markers."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return [i for i in items if i is not None and i is not _WAKE]


_WAKE = object()  # put on the job queue when a call waits: wakes an idle worker
_ids = itertools.count()


def request_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):04x}"
