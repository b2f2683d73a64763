"""The asyncio side of an `Engine` that runs elsewhere: a thread (`AsyncEngine`) or its
own process (`ProcessEngine`).

`EngineClient` keeps one stream per request in flight and hands each output to the
request's own event loop (`call_soon_threadsafe` into its `asyncio.Queue`). A subclass
carries commands to the engine (`_submit`) and reports back from any thread: `_added`
once the engine took or refused a request, `_deliver` with each step's outputs, `_die`
when the engine is gone. A dead engine fails every request in flight with
`EngineDeadError`, refuses new ones, and `dead_error` says why (/health reports it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator

from tandem.serve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine stopped (a step raised, its process died, or it was shut down)."""


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput, then an exception or nothing
    added: asyncio.Future  # None once add_request returned, or its exception


class RequestStream:
    """One request's outputs as an async iterator; `close()` aborts it if unfinished."""

    def __init__(self, engine: EngineClient, request_id: str, queue: asyncio.Queue):
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True  # failed with the engine: nothing left to abort
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    def __enter__(self) -> RequestStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()  # a dropped, unfinished stream must not pin its pages


class EngineClient:
    """`add_request()`/`generate()` send a request to the engine and stream back its
    `RequestOutput`s. Subclasses set `tokenizer`, `model_name` and `max_model_len` and
    implement `_submit` and `shutdown`."""

    tokenizer: object
    model_name: str
    max_model_len: int

    def __init__(self):
        self.dead_error: EngineDeadError | None = None
        # Guards _streams, dead_error and _submit's queue. Reentrant: a dropped stream's
        # `__del__` aborts from whatever code the garbage collector interrupts, this
        # class's own locked sections included.
        self._lock = threading.RLock()
        self._streams: dict[str, _Stream] = {}
        self._stats: dict = {}

    # Called from event loops.

    @property
    def is_running(self) -> bool:
        return self.dead_error is None

    def stats(self) -> dict:
        """The engine's `stats()` as of its last step (a snapshot; never blocks)."""
        return self._stats

    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        client: str = "default",
        priority: int = 0,
    ) -> RequestStream:
        """Queues a request and waits until the engine took it.

        Raises `add_request`'s ValueError or QueueFullError, or EngineDeadError. Iterate
        the returned stream for the outputs; close it (or use it as a context manager) to
        abort the request early, so its pages return to the pool.
        """
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), loop.create_future())
        with self._lock:
            if self.dead_error is not None:
                raise self.dead_error
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = stream
            self._submit(("add", request_id, prompt_token_ids, params, client, priority))
        try:
            await stream.added
        except BaseException:
            self.abort(request_id)  # cancelled while queued, or refused (a no-op then)
            raise
        return RequestStream(self, request_id, stream.queue)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        client: str = "default",
        priority: int = 0,
    ) -> AsyncIterator:
        """Yields the request's outputs until one is `finished`. Errors of `add_request`
        come before the first output; stopping early aborts the request."""
        stream = await self.add_request(
            request_id, prompt_token_ids, params, client=client, priority=priority
        )
        with stream:
            async for out in stream:
                yield out

    def abort(self, request_id: str) -> None:
        """Stops the request and drops its outputs; unknown or finished ids are ignored."""
        with self._lock:
            if self._streams.pop(request_id, None) is None or self.dead_error is not None:
                return
            self._submit(("abort", request_id))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stops the engine (requests in flight get EngineDeadError)."""
        raise NotImplementedError

    # The subclass's side.

    def _submit(self, command: tuple) -> None:
        """Passes `("add", request_id, prompt_token_ids, params, client, priority)` or
        `("abort", request_id)` on to the engine, in order. Called with `_lock` held:
        it must only queue, never wait on the engine."""
        raise NotImplementedError

    def _is_wanted(self, request_id: str) -> bool:
        """False once the request was aborted (the engine may skip adding it)."""
        with self._lock:
            return request_id in self._streams

    def _added(self, request_id: str, error: Exception | None) -> None:
        """The engine took the request (`error` None) or refused it with `error`."""
        with self._lock:
            stream = self._streams.get(request_id)
            if error is not None:
                self._streams.pop(request_id, None)
        if stream is not None:
            _call(stream.loop, _settle, stream.added, error)

    def _deliver(self, outputs: list) -> None:
        """Hands each output to its request's loop: one callback per loop per step."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # aborted: nobody is listening
                if out.finished:
                    del self._streams[out.request_id]
                batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in batches.items():
            _call(loop, _put_all, items)

    def _die(self, error: EngineDeadError) -> None:
        """Fails every request in flight with `error` (the first death's error stays)."""
        with self._lock:
            if self.dead_error is None:
                self.dead_error = error
            error = self.dead_error
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            # A request still being added is refused; one already running gets the error
            # as its next output.
            _call(stream.loop, _settle, stream.added, error)
            _call(stream.loop, _put_all, [(stream.queue, error)])


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the loop is closed: its requests are gone with it


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)
