"""bench/attention.py on CPU: the FLOP count behind its MFU figures, and its refusal to
run without a GPU (the timings themselves need the H200)."""

from tandem.bench.attention import CHUNKED_CASES, attention_flops, main


def test_attention_flops_count_the_keys_each_causal_query_sees():
    seqs = [(3, 5), (1, 4), (4, 4)]  # q_len, kv_len
    visible = 0
    for q_len, kv_len in seqs:
        for pos in range(kv_len - q_len, kv_len):
            visible += pos + 1  # keys 0..pos
    assert attention_flops(seqs, num_q_heads=2, head_dim=8) == 4 * visible * 2 * 8
    # 8 whole prompts of 2048: half the square plus the diagonal, per prompt.
    prompts = CHUNKED_CASES["prefill: 8 prompts of 2048"]
    assert attention_flops(prompts, 1, 1) == 4 * 8 * 2048 * 2049 // 2


def test_attention_bench_needs_a_gpu(capsys):
    assert main(["--batch-sizes", "8", "--context-lens", "1024"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
