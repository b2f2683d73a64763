"""plot_run: one non-empty PNG per metric group present, a clear error without metrics."""

import json

import pytest

from tandem.align.plot import group_keys, main, plot_run


def fake_run(run_dir, num_steps=12):
    rows = []
    for s in range(1, num_steps + 1):
        rows.append(
            {
                "step": s,
                "time": 1.7e9 + s,
                "loss": 1.0 / s,
                "rewards/mean": 0.1 * s,
                "rewards/accuracy": None,  # NaN logged as null: a gap, not a crash
                "kl": 0.01 * s,
                "clip_fraction": 0.2,
                "entropy": 2.0 - 0.1 * s,
                "completion_length": 30 + s,
                "logprob_mismatch": 1e-3,
                "time/rollout": 1.5,
                "time/update": 0.5 + 0.01 * s,
                "time/handoff": 0.1,
                "lr": 1e-4,
            }
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_keys_fall_into_the_first_matching_group():
    keys = ["loss", "kl_loss", "rewards/chosen", "rewards/margins", "time/reward", "ppo/clipfrac"]
    assert group_keys(keys) == {
        "loss": ["loss"],
        "kl": ["kl_loss"],
        "rewards": ["rewards/chosen", "rewards/margins"],
        "time": ["time/reward"],
        "clip": ["ppo/clipfrac"],
    }


def test_plot_run_writes_a_png_per_group(tmp_path):
    fake_run(tmp_path / "run")
    paths = plot_run(tmp_path / "run")
    names = sorted(p.name for p in paths)
    expected = "clip entropy kl length loss mismatch optim rewards time".split()
    assert names == sorted(f"{n}.png" for n in expected)
    for p in paths:
        assert p.parent == tmp_path / "run" / "plots"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_only_present_groups_and_cli(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    assert main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "loss.png")]
    assert main([str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="empty: no metrics.jsonl"):
        plot_run(tmp_path / "empty")
