"""An asyncio front for the single-threaded `Engine`.

One background thread owns the engine: it alone calls `add_request`, `abort`, `step` and
`stats`. Coroutines hand it commands through a locked queue and get their outputs back
on their own event loop (`call_soon_threadsafe` into a per-request `asyncio.Queue`).
The thread steps while the engine has work and sleeps on a condition when it has none.

A failed `step()` kills the engine: every request in flight gets `EngineDeadError`, new
ones are refused, and `dead_error` says why (the HTTP layer's /health reports it).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from tandem.serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a step raised, or it was shut down)."""


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput, then an exception or nothing
    added: asyncio.Future  # None once add_request returned, or its exception


class RequestStream:
    """One request's outputs as an async iterator; `close()` aborts it if unfinished."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
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


class AsyncEngine:
    """`add_request()`/`generate()` put a request on the engine thread and stream back
    its `RequestOutput`s."""

    def __init__(self, engine):
        self._engine = engine
        # The HTTP layer tokenizes on its own thread while the engine thread detokenizes;
        # a private copy keeps the two off one Rust tokenizer ("Already borrowed").
        try:
            self.tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:  # noqa: BLE001 - some tokenizers do not copy; sharing is the fallback
            self.tokenizer = engine.tokenizer
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.dead_error: EngineDeadError | None = None
        self._cond = threading.Condition()
        self._commands: deque[tuple[str, Any]] = deque()
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._stats: dict = engine.stats()
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

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
        with self._cond:
            if self.dead_error is not None:
                raise self.dead_error
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = stream
            args = (request_id, prompt_token_ids, params, client, priority)
            self._commands.append(("add", args))
            self._cond.notify()
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
        with self._cond:
            if self._streams.pop(request_id, None) is None:
                return
            self._commands.append(("abort", request_id))
            self._cond.notify()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stops the engine thread (requests in flight get EngineDeadError)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # The engine thread.

    def _run(self) -> None:
        has_work = False
        while True:
            with self._cond:
                while not (self._commands or has_work or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    self._die(EngineDeadError("the engine was shut down"))
                    return
                commands, self._commands = self._commands, deque()
            try:
                for kind, args in commands:
                    if kind == "add":
                        self._add(*args)
                    else:
                        self._engine.abort(args)
                outputs = self._engine.step() if self._engine.has_unfinished() else []
                self._deliver(outputs)
                has_work = self._engine.has_unfinished()
                self._stats = self._engine.stats()
            except Exception as e:  # noqa: BLE001 - any step failure kills the engine
                logger.exception("engine step failed; failing every request in flight")
                self._die(EngineDeadError(f"engine step failed: {type(e).__name__}: {e}"))
                return

    def _add(self, request_id, prompt_token_ids, params, client, priority) -> None:
        with self._cond:
            stream = self._streams.get(request_id)
        if stream is None:
            return  # aborted before the engine saw it
        try:
            self._engine.add_request(
                request_id, prompt_token_ids, params, client=client, priority=priority
            )
        except Exception as e:  # noqa: BLE001 - ValueError, QueueFullError: the caller's to raise
            with self._cond:
                self._streams.pop(request_id, None)
            _call(stream.loop, _settle, stream.added, e)
        else:
            _call(stream.loop, _settle, stream.added, None)

    def _deliver(self, outputs: list) -> None:
        """Hands each output to its request's loop: one callback per loop per step."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._cond:
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
        with self._cond:
            self.dead_error = error
            streams, self._streams = self._streams, {}
            self._commands.clear()
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
