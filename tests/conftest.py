"""Test-wide setup. Every test process sees 8 fake CPU devices, so the mesh tests run
alongside the single-device ones (which use device 0). It must be set before jax loads.

CI has 2 cores and a test process keeps about one busy, so the longest commands run in the
background, beside other tests: the README's quickstart, which tests/cli and tests/align
both check, runs once a session from the start (`quickstart_run`)."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()


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


_quickstart: dict = {}  # "run": Background, "dir": its --run_dir


def _start_quickstart():
    run_dir = Path(tempfile.mkdtemp(prefix="quickstart-"))
    _quickstart.update(
        dir=run_dir,
        run=Background(tandem_cmd() + ["quickstart", "--fast", "--run_dir", str(run_dir)]),
    )


def pytest_collection_finish(session):
    """The quickstart takes a minute or two: when a collected test uses it, start it now,
    beside the tests that run before that one."""
    if session.config.option.collectonly:
        return
    if any("quickstart_run" in getattr(item, "fixturenames", ()) for item in session.items):
        _start_quickstart()


def pytest_sessionfinish(session):
    if _quickstart:
        _quickstart["run"].close()
        shutil.rmtree(_quickstart["dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def quickstart_run() -> tuple[Path, str]:
    """(run directory, stdout) of `tandem quickstart --fast --run_dir DIR`, the README's main
    command, once it has succeeded. tests/cli checks what it prints and writes;
    tests/align/test_learning.py checks that its GRPO run learned."""
    if not _quickstart:
        _start_quickstart()
    done = _quickstart["run"].wait()
    assert done.returncode == 0, done.stderr[-3000:]
    return _quickstart["dir"], done.stdout
