"""Test-wide setup. Every test process sees 8 fake CPU devices, so the mesh tests run
alongside the single-device ones (which use device 0). It must be set before jax loads.

The README's quickstart, which tests/cli and tests/align both check, runs once a session, in
the background from the start (see `quickstart_run`)."""

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


class QuickstartRun:
    """`tandem quickstart --fast --run_dir RUN_DIR` in a subprocess, as a user runs it."""

    def __init__(self):
        self.run_dir = Path(tempfile.mkdtemp(prefix="quickstart-"))
        self._logs = [open(self.run_dir / name, "w+") for name in ("stdout.log", "stderr.log")]
        exe = shutil.which("tandem")
        cmd = [exe] if exe else [sys.executable, "-m", "tandem.cli.main"]
        self.proc = subprocess.Popen(
            cmd + ["quickstart", "--fast", "--run_dir", str(self.run_dir)],
            stdout=self._logs[0],
            stderr=self._logs[1],
            text=True,
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
        shutil.rmtree(self.run_dir, ignore_errors=True)


_quickstart: list[QuickstartRun] = []


def pytest_collection_finish(session):
    """The quickstart keeps about one core busy for a minute or two, most of it in one
    thread: when a collected test uses it, start it now, so that it runs beside the tests
    before that one (CI has 2 cores)."""
    if any("quickstart_run" in getattr(item, "fixturenames", ()) for item in session.items):
        _quickstart.append(QuickstartRun())


def pytest_sessionfinish(session):
    while _quickstart:
        _quickstart.pop().close()


@pytest.fixture(scope="session")
def quickstart_run() -> tuple[Path, str]:
    """(run directory, stdout) of the session's quickstart, once it has succeeded. Its
    SFT and GRPO runs are those of tests/align/test_learning.py (the same config)."""
    if not _quickstart:
        _quickstart.append(QuickstartRun())
    done = _quickstart[0].wait()
    assert done.returncode == 0, done.stderr[-3000:]
    return _quickstart[0].run_dir, done.stdout
