"""The engine loop in its own process, so the HTTP front end does not share its GIL.

`ProcessEngine(EngineSpec(...))` spawns a child ("spawn": JAX is not fork safe) that
builds the model and `Engine` from the spec, and serves the same asyncio API as
`AsyncEngine`. Two one-way pipes carry pickled messages:

    parent -> child: a list of commands, each ("add", request_id, prompt_token_ids,
                     params, client, priority), ("abort", request_id) or ("shutdown",)
    child -> parent: ("ready", model_name, max_model_len, stats) once, or
                     ("failed", error_type, message, traceback) if start-up failed;
                     then per loop ("step", [(request_id, error or None)], outputs, stats):
                     the adds it took or refused and all outputs of one step, one message;
                     ("dead", message) when a step raised.

The child drains commands, steps while it has work and blocks on the command pipe when
idle. In the parent a writer thread sends the queued commands (an event loop never waits
on a busy child) and a reader thread hands each step's outputs to the requests' loops.
The tokenizer of the HTTP layer is loaded in the parent from the same source.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
import pickle
import signal
import threading
import time
import traceback

from tandem.serve.engine_client import EngineClient, EngineDeadError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What the engine process builds: everything here must pickle."""

    model_source: str
    """An HF checkpoint directory or a gin preset (model/loading.py's `load`)."""
    dtype: str = "auto"
    """The weights' dtype (model/loading.py's `resolve_dtype`)."""
    seed: int = 0
    """Seeds a preset's random weights."""
    tensor_parallel_size: int = 1
    """Devices the heads are split over (a tensor mesh over the first ones)."""
    served_model_name: str | None = None
    """The model's name in the API; the checkpoint's or preset's when None."""
    engine_config: dict = dataclasses.field(default_factory=dict)
    """EngineConfig fields."""
    tensor_parallel_flag: str = "tensor_parallel_size"
    """How errors about the size name it (the CLI passes its flag)."""
    warm_up: bool | None = None
    """Compile every step shape before serving; None: on an accelerator only."""
    compilation_cache_dir: str | None = None
    """JAX's persistent compilation cache (serve/startup.py); the default when None."""


def build_engine(spec: EngineSpec, mesh=None):
    """The `Engine` that `spec` describes, built on this process's devices (warmed up
    as `spec.warm_up` says). `mesh` (in process only): where the weights and KV pages
    live, instead of the tensor mesh `spec.tensor_parallel_size` asks for."""
    from tandem.model.loading import config_for, load
    from tandem.serve.engine import Engine, EngineConfig
    from tandem.serve.llm import tensor_parallel_mesh
    from tandem.serve.startup import enable_compilation_cache, serving_defaults, warm_up_engine

    enable_compilation_cache(spec.compilation_cache_dir)
    if mesh is None:
        mesh = tensor_parallel_mesh(
            config_for(spec.model_source),
            spec.tensor_parallel_size,
            flag=spec.tensor_parallel_flag,
        )
    model, tokenizer, name = load(spec.model_source, dtype=spec.dtype, seed=spec.seed, mesh=mesh)
    config = EngineConfig(**serving_defaults(spec.engine_config))
    engine = Engine(model, tokenizer, config, model_name=spec.served_model_name or name, mesh=mesh)
    warm_up_engine(engine, spec.warm_up)
    return engine


class EngineStartupError(RuntimeError):
    """The engine process failed before it was ready."""


class _RemoteTraceback(Exception):
    """The child's traceback, chained under the error the parent raises for it."""

    def __str__(self) -> str:
        return self.args[0]


class ProcessEngine(EngineClient):
    """`AsyncEngine`'s API over an engine in a child process. Blocks until the child is
    ready; raises the child's start-up error (its type, naming the model source) or
    EngineStartupError if the child died or `startup_timeout` seconds passed first."""

    def __init__(self, spec: EngineSpec, *, startup_timeout: float | None = None):
        super().__init__()
        self.spec = spec
        ctx = multiprocessing.get_context("spawn")
        command_reader, self._command_writer = ctx.Pipe(duplex=False)
        self._output_reader, output_writer = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_engine_main,
            args=(spec, command_reader, output_writer),
            name="tandem-engine",
            daemon=True,
        )
        self._process.start()
        # Only the child holds these ends now, so its death reads as EOF here.
        command_reader.close()
        output_writer.close()
        try:
            from tandem.model.loading import tokenizer_for

            # Loaded while the child starts (the tokenizer needs no device). A source both
            # fail on raises the child's error: it has the engine's traceback.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                tokenizer = pool.submit(tokenizer_for, spec.model_source)
                self.model_name, self.max_model_len, self._stats = self._wait_ready(startup_timeout)
                self.tokenizer = tokenizer.result()
        except BaseException:
            self._process.kill()
            self._process.join()
            self._close_pipes()
            raise
        self._cond = threading.Condition(self._lock)
        self._commands: list[tuple] = []
        self._stopping = False
        self._writer = threading.Thread(target=self._write, name="tandem-engine-writer")
        self._reader = threading.Thread(target=self._read, name="tandem-engine-reader")
        self._writer.daemon = self._reader.daemon = True
        self._writer.start()
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stops the engine process (requests in flight get EngineDeadError); kills it if
        it does not exit within `timeout` seconds."""
        with self._cond:
            if not self._stopping:
                self._stopping = True
                self._commands.append(("shutdown",))
                self._cond.notify()
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._reader.join(timeout)
        self._writer.join(timeout)
        self._close_pipes()

    def _submit(self, command: tuple) -> None:
        self._commands.append(command)
        self._cond.notify()

    # Start-up.

    def _wait_ready(self, timeout: float | None) -> tuple[str, int, dict]:
        source = self.spec.model_source
        deadline = None if timeout is None else time.monotonic() + timeout
        # Polls so that a child that dies without a word does not hang us.
        while not self._output_reader.poll(0.1):
            if not self._process.is_alive() and not self._output_reader.poll(0):
                raise EngineStartupError(
                    f"the engine process for {source!r} {_exit_reason(self._process)} "
                    "before it was ready"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise EngineStartupError(
                    f"the engine process for {source!r} was not ready after {timeout} s"
                )
        try:
            kind, *payload = self._output_reader.recv()
        except EOFError:
            self._process.join(5)
            raise EngineStartupError(
                f"the engine process for {source!r} {_exit_reason(self._process)} "
                "before it was ready"
            ) from None
        if kind == "ready":
            return tuple(payload)
        error_type, message, child_traceback = payload
        text = f"could not start the engine for {source!r}: {message}"
        try:
            error = error_type(text)
        except Exception:  # noqa: BLE001 - a type that takes more than a message
            error = None
        if not isinstance(error, Exception):
            error = EngineStartupError(f"{text} ({getattr(error_type, '__name__', 'error')})")
        raise error from _RemoteTraceback(child_traceback)

    # The parent's threads.

    def _write(self) -> None:
        """Sends the queued commands, all at once, until the shutdown command went out."""
        while True:
            with self._cond:
                while not self._commands:
                    self._cond.wait()
                commands, self._commands = self._commands, []
            try:
                self._command_writer.send(commands)
            except OSError:
                return  # the child is gone: the reader reports it
            except Exception as e:  # noqa: BLE001 - a command that does not pickle
                logger.exception("could not send commands to the engine process")
                self._die(EngineDeadError(f"could not send to the engine: {e}"))
                self._process.kill()
                return
            if commands[-1][0] == "shutdown":
                return

    def _read(self) -> None:
        """Hands the child's outputs to their requests until its pipe closes."""
        while True:
            try:
                kind, *payload = self._output_reader.recv()
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - a message that does not unpickle
                logger.exception("could not read from the engine process")
                self._process.kill()
                break
            if kind == "step":
                added, outputs, stats = payload
                for request_id, error in added:
                    self._added(request_id, error)
                self._deliver(outputs)
                self._stats = stats
            elif kind == "dead":
                self._die(EngineDeadError(payload[0]))
        self._process.join(5)
        if self._stopping:
            self._die(EngineDeadError("the engine was shut down"))
        else:
            reason = _exit_reason(self._process)
            logger.error("the engine process %s", reason)
            self._die(EngineDeadError(f"the engine process {reason}"))

    def _close_pipes(self) -> None:
        self._command_writer.close()
        self._output_reader.close()


def _exit_reason(process) -> str:
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


# The child.


def _engine_main(spec: EngineSpec, commands, outputs) -> None:
    # The parent decides when the engine stops: Ctrl-C in a terminal reaches the whole
    # process group, and the server shuts down gracefully before it stops the engine.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = build_engine(spec)
    except BaseException as e:  # noqa: BLE001 - every start-up failure goes to the parent
        error_type = type(e) if _pickles(type(e)) else None
        outputs.send(("failed", error_type, f"{type(e).__name__}: {e}", traceback.format_exc()))
        return
    outputs.send(("ready", engine.model_name, engine.max_model_len, engine.stats()))
    try:
        _serve(engine, commands, outputs)
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone


def _serve(engine, commands, outputs) -> None:
    while True:
        batches = [] if engine.has_unfinished() else [commands.recv()]  # idle: block
        while commands.poll():
            batches.append(commands.recv())
        added = []
        for batch in batches:
            for kind, *args in batch:
                if kind == "shutdown":
                    return
                if kind == "add":
                    added.append(_add(engine, *args))
                else:
                    engine.abort(*args)
        try:
            step_outputs = engine.step() if engine.has_unfinished() else []
            stats = engine.stats()
        except Exception as e:  # noqa: BLE001 - any step failure kills the engine
            logger.exception("engine step failed; failing every request in flight")
            outputs.send(("dead", f"engine step failed: {type(e).__name__}: {e}"))
            return
        outputs.send(("step", added, step_outputs, stats))


def _add(engine, request_id, prompt_token_ids, params, client, priority):
    try:
        engine.add_request(request_id, prompt_token_ids, params, client=client, priority=priority)
    except Exception as e:  # noqa: BLE001 - ValueError, QueueFullError: the caller's to raise
        return request_id, e if _pickles(e) else RuntimeError(f"{type(e).__name__}: {e}")
    return request_id, None


def _pickles(obj) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:  # noqa: BLE001 - whatever pickle raises
        return False
    return True
