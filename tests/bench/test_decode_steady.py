"""bench/decode_steady.py on CPU: its arithmetic and its flags. No model is built and jax is
never imported (the bench imports it inside `main`), so the file runs in a few seconds."""

import pytest

from tandem.bench.decode_steady import (
    build_parser,
    differential_step_seconds,
    format_rows,
    kv_bytes_per_token,
    main,
    mean_context,
    roofline_step_seconds,
)


def test_roofline_step_reads_the_weights_once_and_every_sequences_kv():
    # 2 layers x (K, V) x 1 kv head x head_dim 4 x 2 bytes = 32 bytes per token.
    # Context 10 + (2 + 6) / 2 = 14 tokens; 1000 + 2 seqs x 14 x 32 = 1896 bytes; / 100 B/s.
    kv = kv_bytes_per_token(num_layers=2, num_kv_heads=1, head_dim=4)
    assert kv == 32
    context = mean_context(10, 2, 6)
    assert context == 14
    assert roofline_step_seconds(1000, 2, context, kv, 100.0) == pytest.approx(18.96)
    # B=1 of llama3.2-1b's shape: 16 layers x 2 x 8 x 64 x 2 = 32 KiB per token.
    assert kv_bytes_per_token(16, 8, 64) == 32768


def test_differential_step_cancels_what_both_runs_share():
    # t(6) - t(2) = 3.0 - 1.0 = 2 s over 4 more steps: 0.5 s a step.
    assert differential_step_seconds(1.0, 3.0, 2, 6) == pytest.approx(0.5)
    # A fixed cost added to both runs cancels.
    assert differential_step_seconds(11.0, 13.0, 2, 6) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        differential_step_seconds(1.0, 3.0, 6, 6)


def test_flags_and_table():
    args = build_parser().parse_args([])
    assert args.batch_sizes == [1, 128, 256] and args.model == "models/llama3.2-1b.gin"
    assert (args.input_len, args.short, args.long, args.num_decode_steps) == (512, 16, 144, None)
    assert build_parser().parse_args(["--batch-sizes", "1"]).batch_sizes == [1]
    row = dict(model="m", batch_size=2, step_s=0.01, roofline_s=0.008, ratio=1.25,
               tok_per_s_per_stream=100.0, total_tok_per_s=200.0)  # fmt: skip
    table = format_rows([row])
    assert "ratio" in table.splitlines()[0] and "1.250" in table.splitlines()[1]


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--batch-sizes" in capsys.readouterr().out


def test_bad_lengths_are_refused():
    with pytest.raises(SystemExit):
        main(["--short", "16", "--long", "16"])
