"""Test-wide setup. Every test process sees 8 fake CPU devices, so the mesh tests run
alongside the single-device ones (which use device 0). It must be set before jax loads.

CI has 2 cores and a test process keeps about one busy, so tests run in two pytest-xdist
workers (pyproject's addopts; a file stays on one worker) and the longest commands run in
the background, beside other tests: the README's quickstart, which tests/cli and
tests/align both check, runs once a session from the start (`quickstart_run`). All of them
share one persistent compilation cache."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# The models here are tiny and run a few steps: LLVM's optimisation of each compiled step
# costs more than it saves (a third of the suite's CPU time). Tests check values, never CPU
# speed, and what is computed is the same at every backend level. Commands the tests start
# inherit it; the learning tests (marked `slow`), which run thousands of steps, and the
# quickstart run turn it off (`optimized_compiles`).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One folder for the session, made by the first process (the xdist controller) and inherited
# by the workers and every command they start. It holds a persistent compilation cache: a
# train step or engine step compiled by one process (a CLI run, a resumed run, a served
# model) loads in another instead of compiling again.
if "TANDEM_TEST_SHARED" not in os.environ:
    os.environ["TANDEM_TEST_SHARED"] = tempfile.mkdtemp(prefix="tandem-tests-")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["TANDEM_TEST_SHARED"], "jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


@pytest.fixture(scope="module", autouse=True)
def optimized_compiles(request):
    """XLA's full optimisation for the modules marked `slow` (learning runs: execution, not
    compilation, is their cost); the rest of the suite compiles with most of it off."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    import jax

    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)


def tandem_cmd() -> list[str]:
    """The `tandem` console command as a user runs it."""
    exe = shutil.which("tandem")
    return [exe] if exe else [sys.executable, "-m", "tandem.cli.main"]


class Background:
    """A command started now in a subprocess, its output kept in files (a pipe nobody reads
    would fill and stall it)."""

    def __init__(self, cmd: list[str], env: dict | None = None):
        self._logs = [tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")]
        self.proc = subprocess.Popen(
            cmd, stdout=self._logs[0], stderr=self._logs[1], text=True, env=env
        )

    def wait(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """The finished command: its return code, stdout and stderr."""
        self.proc.wait(timeout=timeout)
        outputs = []
        for f in self._logs:
            f.seek(0)
            outputs.append(f.read())
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, *outputs)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in self._logs:
            f.close()


@pytest.fixture(scope="session")
def start_in_background():
    """start_in_background(cmd, env=None) -> Background; what still runs at the end of the
    session is killed."""
    started: list[Background] = []

    def start(cmd: list[str], env: dict | None = None) -> Background:
        started.append(Background(cmd, env))
        return started[-1]

    yield start
    for run in started:
        run.close()


def _shared_dir() -> Path:
    """A folder every process of this test session shares (pytest-xdist workers and the
    commands they start): the controller makes it, the workers inherit its name."""
    return Path(os.environ["TANDEM_TEST_SHARED"])


def _quickstart_dir() -> Path:
    return _shared_dir() / "quickstart"


def _start_quickstart():
    """Starts the quickstart once for the whole session: the first process to ask wins a
    lock; its return code lands in a file that every process can wait on."""
    folder = _quickstart_dir()
    try:
        folder.mkdir()
    except FileExistsError:
        return
    cmd = tandem_cmd() + ["quickstart", "--fast", "--run_dir", str(folder / "run")]
    script = '"$@" > "$0/stdout" 2> "$0/stderr"; echo $? > "$0/rc.tmp"; mv "$0/rc.tmp" "$0/rc"'
    env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
    proc = subprocess.Popen(
        ["sh", "-c", script, str(folder), *cmd], env=env, start_new_session=True
    )
    (folder / "pid").write_text(str(proc.pid))


def pytest_collection_modifyitems(items):
    """Files with a test that waits for the quickstart run last, so the workers do other
    tests while it runs (the order is the same in every worker, as xdist requires)."""
    waits = {item.path for item in items if "quickstart_run" in item.fixturenames}
    items.sort(key=lambda item: item.path in waits)


def pytest_collection_finish(session):
    """The quickstart takes a few minutes: when a collected test uses it, start it now,
    beside the tests that run before that one."""
    if session.config.option.collectonly:
        return
    if any("quickstart_run" in getattr(item, "fixturenames", ()) for item in session.items):
        _start_quickstart()


def pytest_sessionfinish(session):
    """The controller (or a lone process) ends what the session started and removes the
    shared folder; workers leave both to it."""
    if hasattr(session.config, "workerinput"):
        return
    pid_file = _quickstart_dir() / "pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(_shared_dir(), ignore_errors=True)


@pytest.fixture(scope="session")
def quickstart_run() -> tuple[Path, str]:
    """(run directory, stdout) of `tandem quickstart --fast --run_dir DIR`, the README's main
    command, once it has succeeded. tests/cli checks what it prints and writes;
    tests/align/test_learning.py checks that its GRPO run learned."""
    _start_quickstart()
    folder = _quickstart_dir()
    deadline = time.monotonic() + 900
    while not (folder / "rc").exists():
        assert time.monotonic() < deadline, "the quickstart did not finish in 15 minutes"
        time.sleep(1)
    stderr = (folder / "stderr").read_text()
    assert (folder / "rc").read_text().strip() == "0", stderr[-3000:]
    return folder / "run", (folder / "stdout").read_text()
