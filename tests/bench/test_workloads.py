"""bench/workloads.py: nano-vllm's workload (256 sequences, lengths in [100, 1024], seeded)
and the fixed one."""

import numpy as np

from tandem.bench.workloads import fixed_workload, nanovllm_workload


def test_nanovllm_workload_is_256_seqs_within_bounds():
    w = nanovllm_workload(seed=0)
    assert w.num_seqs == 256 and len(w.output_lens) == 256
    for lens in (w.input_lens, w.output_lens):
        assert min(lens) >= 100 and max(lens) <= 1024
        assert len(set(lens)) > 100  # lengths vary, not one value repeated
    assert w.num_output_tokens == sum(w.output_lens)
    assert w.max_model_len == max(i + o for i, o in zip(w.input_lens, w.output_lens))


def test_nanovllm_workload_is_determined_by_its_seed():
    assert nanovllm_workload(seed=3) == nanovllm_workload(seed=3)
    assert nanovllm_workload(seed=3) != nanovllm_workload(seed=4)


def test_prompts_have_the_workload_lengths_and_token_range():
    w = nanovllm_workload(seed=0, num_seqs=8)
    prompts = w.prompts(np.random.default_rng(0), vocab_size=151936)
    assert [len(p) for p in prompts] == list(w.input_lens)
    assert max(max(p) for p in prompts) <= 10000  # nano-vllm's randint(0, 10000)
    small = w.prompts(np.random.default_rng(0), vocab_size=50)
    assert max(max(p) for p in small) < 50  # clipped to the vocab
    assert w.prompts(np.random.default_rng(1), 50) != w.prompts(np.random.default_rng(2), 50)


def test_fixed_workload():
    w = fixed_workload(3, 5, 2)
    assert w.input_lens == (5, 5, 5) and w.output_lens == (2, 2, 2)
    assert w.num_input_tokens == 15 and w.max_model_len == 7
    assert [len(p) for p in w.prompts(np.random.default_rng(0), 100)] == [5, 5, 5]
