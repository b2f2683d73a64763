"""`tandem train` as a user runs it: a run killed with SIGKILL resumes from its last
checkpoint and ends with the params of a run never stopped; broken inputs are clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tandem.align.data import synthetic_arithmetic

STEPS = 100
ARGS = [
    "--gin_file",
    "train/sft_tiny.gin",
    "--gin_param",
    "ModelConfig.num_layers = 1",
    "--gin_param",
    "ModelConfig.hidden_size = 32",
    "--gin_param",
    "ModelConfig.intermediate_size = 64",
    "--gin_param",
    f"TrainConfig.num_steps = {STEPS}",
    "--gin_param",
    "TrainConfig.batch_size = 8",
    "--gin_param",
    "TrainConfig.max_length = 16",
    "--gin_param",
    "TrainConfig.save_every = 10",
    "--gin_param",
    "TrainConfig.warmup_steps = 0",
    "--gin_param",
    "TrainConfig.progress = False",
]


def tandem(*args: str) -> list[str]:
    exe = shutil.which("tandem")
    return ([exe] if exe else [sys.executable, "-m", "tandem.cli.main"]) + list(args)


def train_cmd(run_dir, data) -> list[str]:
    return tandem(
        "train",
        "sft",
        *ARGS,
        "--gin_param",
        f"TrainConfig.run_dir = '{run_dir}'",
        "--gin_param",
        f"TrainConfig.train_file = '{data}'",
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_arithmetic(200, seed=0)))
    return str(path)


def committed_steps(run_dir) -> list[int]:
    ckpt = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt):
        return []
    return sorted(
        int(d)
        for d in os.listdir(ckpt)
        if d.isdigit() and os.path.exists(os.path.join(ckpt, d, "commit_success.txt"))
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data, start_in_background):
    """(run_dir, Background) of a run of STEPS steps never stopped. It starts when a test
    first asks for it, so the killed run and its resume run beside it (CI has 2 cores)."""
    run_dir = tmp_path_factory.mktemp("straight")
    return run_dir, start_in_background(train_cmd(run_dir, data))


def finished(straight):
    run_dir, run = straight
    done = run.wait()
    assert done.returncode == 0, done.stderr
    return run_dir


def test_killed_run_resumes_to_the_uninterrupted_params(tmp_path, data, straight):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, data), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not [s for s in committed_steps(killed) if s >= 20] and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    last = max(committed_steps(killed))
    assert last < STEPS

    resumed = subprocess.run(train_cmd(killed, data), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {last}" in resumed.stdout

    straight = finished(straight)
    a = load_file(str(straight / "hf" / "model.safetensors"))
    b = load_file(str(killed / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)
    # Each step is logged once, with the uninterrupted run's loss.
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [r["loss"] for r in rows], [r["loss"] for r in ref], rtol=1e-5, atol=1e-6
    )


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(tmp_path, data, straight):
    """A copy of the finished uninterrupted run, its last checkpoint damaged, asked for more
    steps."""
    run = tmp_path / "run"
    shutil.copytree(finished(straight), run)
    step_dir = run / "checkpoints" / str(STEPS)
    # Damage the finished checkpoint: truncate every array data file.
    damaged = 0
    for root, _, names in os.walk(step_dir / "state"):
        for name in names:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64 and "d" in os.path.relpath(path, step_dir):
                with open(path, "r+b") as f:
                    f.truncate(16)
                damaged += 1
    assert damaged
    more = ["--gin_param", f"TrainConfig.num_steps = {STEPS + 10}"]
    again = subprocess.run(train_cmd(run, data) + more, capture_output=True, text=True)
    assert again.returncode == 1
    assert "error:" in again.stderr and str(step_dir) in again.stderr
    assert not (run / "checkpoints" / str(STEPS + 10)).exists()


def test_bad_config_key_and_missing_file_are_named(tmp_path, data):
    # Both at once: each spends its few seconds importing.
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bad_key = subprocess.Popen(
        tandem("train", "sft", *ARGS, "--gin_param", "TrainConfig.not_a_field = 1"), **pipes
    )
    missing = subprocess.Popen(train_cmd(tmp_path / "r", tmp_path / "nope.jsonl"), **pipes)
    _, err = bad_key.communicate()
    assert bad_key.returncode != 0 and "not_a_field" in err
    _, err = missing.communicate()
    assert missing.returncode == 2 and "nope.jsonl" in err
