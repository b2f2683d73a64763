"""bench/engine_e2e.py on CPU: its roofline arithmetic, its flags and its refusal to run
without a GPU."""

import pytest

from tandem.bench.engine_e2e import build_parser, main, make_workload, roofline_seconds
from tandem.model import ModelConfig

CFG = ModelConfig(
    vocab_size=100,
    hidden_size=8,
    intermediate_size=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
)
KV_PER_TOKEN = 2 * 2 * 1 * 4 * 2  # layers x (K, V) x kv heads x head_dim x bf16 = 32 bytes


def test_roofline_is_prefill_flops_plus_decode_bytes():
    kw = dict(input_lens=[5] * 3, output_lens=[2] * 3, flops=1e3, bandwidth=1e2)
    one = roofline_seconds(CFG, 1000, tp=1, **kw)
    prefill = 2 * 500 * 3 * 5 / 1e3  # 2 FLOPs per weight (1000 bytes of bf16) per token
    decode = sum((1000 + 3 * (5 + i) * KV_PER_TOKEN) / 1e2 for i in range(2))
    assert one == pytest.approx(prefill + decode)
    assert roofline_seconds(CFG, 1000, tp=2, **kw) == pytest.approx(one / 2)


def test_roofline_of_variable_lengths_reads_the_kv_of_live_sequences():
    # Sequence A: 2 prompt tokens, 3 outputs; B: 4 prompt tokens, 1 output.
    # prefill: 2 FLOPs x 500 weights x (2 + 4) tokens / 1e3 FLOP/s = 6 s
    # decode step 0: 1000 weight bytes + (A: 2 + B: 4 tokens) x 32 = 1192 bytes
    #        step 1: 1000 + (A: 3 tokens) x 32 = 1096 bytes (B has finished)
    #        step 2: 1000 + (A: 4 tokens) x 32 = 1128 bytes
    # (1192 + 1096 + 1128) / 1e2 B/s = 34.16 s; total 40.16 s
    seconds = roofline_seconds(
        CFG, 1000, input_lens=[2, 4], output_lens=[3, 1], tp=1, flops=1e3, bandwidth=1e2
    )
    assert seconds == pytest.approx(40.16)


def test_workload_flags():
    nano = make_workload(build_parser().parse_args(["--workload", "nanovllm"]))
    assert nano.name == "nanovllm" and nano.num_seqs == 256
    fixed = make_workload(build_parser().parse_args(["--input-len", "7", "--output-len", "3"]))
    assert fixed.num_seqs == 128 and set(fixed.input_lens) == {7} and set(fixed.output_lens) == {3}
    assert build_parser().parse_args(["--no-peer"]).peer == "none"
    assert build_parser().parse_args([]).peer == "hf"
    assert build_parser().parse_args([]).num_decode_steps is None


def test_engine_bench_needs_a_gpu(capsys):
    assert main(["--num-prompts", "2", "--no-peer"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
