"""An asyncio front for the single-threaded `Engine`, on a thread of this process.

One background thread owns the engine: it alone calls `add_request`, `abort`, `step` and
`stats`. Coroutines hand it commands through a locked queue (`EngineClient` streams the
outputs back to their loops). The thread steps while the engine has work and sleeps on a
condition when it has none. The HTTP server runs the engine in its own process instead
(serve/engine_process.py), so the two do not share one GIL; this one is for in-process
users and tests.

A failed `step()` kills the engine: every request in flight gets `EngineDeadError`, new
ones are refused, and `dead_error` says why.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import deque

from tandem.serve.engine_client import EngineClient, EngineDeadError, RequestStream

__all__ = ["AsyncEngine", "EngineDeadError", "RequestStream"]

logger = logging.getLogger(__name__)


class AsyncEngine(EngineClient):
    """`add_request()`/`generate()` put a request on the engine thread and stream back
    its `RequestOutput`s."""

    def __init__(self, engine):
        super().__init__()
        self._engine = engine
        # The HTTP layer tokenizes on its own thread while the engine thread detokenizes;
        # a private copy keeps the two off one Rust tokenizer ("Already borrowed").
        try:
            self.tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:  # noqa: BLE001 - some tokenizers do not copy; sharing is the fallback
            self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self._cond = threading.Condition(self._lock)
        self._commands: deque[tuple] = deque()
        self._stopping = False
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stops the engine thread (requests in flight get EngineDeadError)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _submit(self, command: tuple) -> None:
        self._commands.append(command)
        self._cond.notify()

    # The engine thread.

    def _run(self) -> None:
        has_work = False
        while True:
            with self._cond:
                while not (self._commands or has_work or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    self._commands.clear()
                    break
                commands, self._commands = self._commands, deque()
            try:
                for kind, *args in commands:
                    if kind == "add":
                        self._add(*args)
                    else:
                        self._engine.abort(*args)
                outputs = self._engine.step() if self._engine.has_unfinished() else []
                self._deliver(outputs)
                has_work = self._engine.has_unfinished()
                self._stats = self._engine.stats()
            except Exception as e:  # noqa: BLE001 - any step failure kills the engine
                logger.exception("engine step failed; failing every request in flight")
                self._die(EngineDeadError(f"engine step failed: {type(e).__name__}: {e}"))
                return
        self._die(EngineDeadError("the engine was shut down"))

    def _add(self, request_id, prompt_token_ids, params, client, priority) -> None:
        if not self._is_wanted(request_id):
            return  # aborted before the engine saw it
        try:
            self._engine.add_request(
                request_id, prompt_token_ids, params, client=client, priority=priority
            )
        except Exception as e:  # noqa: BLE001 - ValueError, QueueFullError: the caller's to raise
            self._added(request_id, e)
        else:
            self._added(request_id, None)
