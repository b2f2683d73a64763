"""bench/engine_e2e.py on CPU: its roofline arithmetic and its refusal to run without a GPU."""

from tandem.bench.engine_e2e import main, roofline_seconds
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


def test_roofline_is_prefill_flops_plus_decode_bytes():
    kw = dict(num=3, input_len=5, output_len=2, flops=1e3, bandwidth=1e2)
    one = roofline_seconds(CFG, 1000, tp=1, **kw)
    kv_per_token = 2 * 2 * 1 * 4 * 2  # layers x (K, V) x kv heads x head_dim x bf16
    prefill = 2 * 500 * 3 * 5 / 1e3  # 2 FLOPs per weight (1000 bytes of bf16) per token
    decode = sum((1000 + 3 * (5 + i) * kv_per_token) / 1e2 for i in range(2))
    assert one == prefill + decode
    assert roofline_seconds(CFG, 1000, tp=2, **kw) == one / 2


def test_engine_bench_needs_a_gpu(capsys):
    assert main(["--num-prompts", "2"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
