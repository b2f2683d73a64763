"""MetricsLogger: JSON lines read back, resume drops re-logged steps, TensorBoard scalars."""

import glob
import json
import math
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from tandem.align.metrics_log import MetricsLogger, read_metrics, write_config

START = event_pb2.SessionLog.START


def tb_events(run_dir):
    """Event protos of every event file: TFRecord framing (u64 length, u32 crc, payload,
    u32 crc) around each."""
    events = []
    for path in sorted(glob.glob(f"{run_dir}/tb/events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def tb_scalars(run_dir):
    """(tag, step, value) of every scalar logged."""
    return [(v.tag, e.step, v.simple_value) for e in tb_events(run_dir) for v in e.summary.value]


def test_log_writes_json_lines_that_read_back(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, tensorboard=False, progress=False) as log:
        log.log(1, {"loss": 0.5, "kl": np.float32(0.25)})
        log.log(2, {"loss": float("nan"), "reward": float("inf")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["loss"] == 0.5 and first["kl"] == 0.25
    assert isinstance(first["time"], float)
    # Non-finite values are JSON null (strict JSON), read back as NaN.
    assert json.loads(lines[1])["loss"] is None and "NaN" not in lines[1]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and math.isnan(rows[1]["reward"])


def test_resume_drops_the_steps_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, tensorboard=False, progress=False) as log:
        for step in range(1, 7):
            log.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # the run was killed mid-write
    # Restarting from the checkpoint at step 4: steps 5.. will be logged again.
    with MetricsLogger(
        tmp_path, total_steps=10, start_step=4, tensorboard=False, progress=False
    ) as log:
        for step in range(5, 8):
            log.log(step, {"loss": 10.0 + step})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in rows] == [1, 2, 3, 4, 15, 16, 17]


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    with MetricsLogger(tmp_path, total_steps=5, progress=False) as log:
        log.log(1, {"loss": 0.75, "time/rollout": 2.0})
        log.log(2, {"loss": 0.5})
    scalars = tb_scalars(tmp_path)
    assert ("loss", 1, 0.75) in scalars and ("loss", 2, 0.5) in scalars
    assert ("time/rollout", 1, 2.0) in scalars
    # A resumed logger tells TensorBoard to drop the old file's events from its step on.
    with MetricsLogger(tmp_path, total_steps=5, start_step=1, progress=False) as log:
        log.log(2, {"loss": 0.25})
    assert ("loss", 2, 0.25) in tb_scalars(tmp_path)
    purges = [e.step for e in tb_events(tmp_path) if e.session_log.status == START]
    assert purges == [2]


def test_progress_bar_and_config(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=4, tensorboard=False) as log:
        log.log(1, {"loss": 1.5, "rewards/mean": 0.25, "kl": 0.125, "lr": 1e-3})
    err = capsys.readouterr().err
    assert "1/4" in err and "loss=1.5" in err and "rewards/mean=0.25" in err and "kl=0.125" in err
    path = write_config(tmp_path / "new", "train.lr = 1e-3\n")
    assert open(path).read() == "train.lr = 1e-3\n" and path.endswith("new/config.gin")


def test_bad_values_are_value_errors(tmp_path):
    with MetricsLogger(tmp_path, total_steps=4, tensorboard=False, progress=False) as log:
        with pytest.raises(ValueError, match="metric 'loss' is not a scalar"):
            log.log(1, {"loss": [1.0, 2.0]})
        with pytest.raises(ValueError, match="metric name 'step' is reserved"):
            log.log(1, {"step": 1.0})
    with pytest.raises(ValueError, match="start_step must be an int in"):
        MetricsLogger(tmp_path, total_steps=4, start_step=9)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl line 2: bad JSON"):
        read_metrics(tmp_path / "metrics.jsonl")
