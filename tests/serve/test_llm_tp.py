"""Tensor parallel serving from the offline API and the throughput benchmark.

tests/conftest.py gives the process 8 CPU devices. `LLM(..., tensor_parallel_size=2)` puts the
tiny preset's 4 q / 2 kv heads on a (data 1, fsdp 1, tensor 2) mesh over the first 2 devices,
weights created straight into their shards; f32 greedy tokens equal the one-device engine's.
"""

import numpy as np
import pytest
from flax import nnx

from tandem.bench import throughput
from tandem.model import Transformer
from tandem.model.loading import config_for
from tandem.model.sharding import make_mesh
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.llm import LLM
from tandem.serve.sampling_params import SamplingParams

PRESET = "models/tiny.gin"
ENGINE = dict(page_size=8, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64)
# 3 and 37 prompt tokens: one prefill chunk, and two.
PROMPTS = ["abc", "a longer prompt, prefilled in two chunks"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)


def run(llm):
    return llm.generate(PROMPTS, GREEDY, use_tqdm=False)


@pytest.fixture(scope="module")
def one_device():
    return run(LLM(PRESET, **ENGINE))


@pytest.mark.parametrize("source", ["preset", "module"])
def test_tensor_parallel_llm_equals_one_device(one_device, source):
    if source == "preset":
        llm = LLM(PRESET, tensor_parallel_size=2, **ENGINE)
    else:  # the preset's weights, built here and sharded by LLM
        model = Transformer(config_for(PRESET), rngs=nnx.Rngs(0))
        llm = LLM(model, byte_tokenizer(), tensor_parallel_size=2, **ENGINE)
    mesh = llm.engine.mesh
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 2}
    # Each of the 2 devices holds half the q heads: [D, N, H] -> [D, N / 2, H].
    q_proj = llm.engine.params["layers"][0]["attn"]["q_proj"][...]
    assert {s.data.shape for s in q_proj.addressable_shards} == {(64, 2, 16)}
    for got, want in zip(run(llm), one_device):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        np.testing.assert_allclose(
            [lp.logprob for lp in got.outputs[0].logprobs],
            [lp.logprob for lp in want.outputs[0].logprobs],
            atol=1e-4,
        )


def test_llm_takes_a_mesh_or_a_size_not_both():
    with pytest.raises(ValueError, match="mesh or tensor_parallel_size, not both"):
        LLM(PRESET, mesh=make_mesh(fsdp=4, tensor=2), tensor_parallel_size=2)


def test_throughput_bench_runs_tensor_parallel(capsys):
    args = ["--num-prompts", "2", "--input-len", "8", "--output-len", "4"]
    args += ["--max-num-batched-tokens", "32", "--max-num-seqs", "4", "--num-baseline-prompts", "1"]
    assert throughput.main(args + ["--tensor-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert (
        "Tensor parallel size:" in out and out.split("Tensor parallel size:")[1].split()[0] == "2"
    )
    assert "Engine / no-cache (output tok/s)" in out


def test_throughput_bench_names_its_flag_for_a_bad_size():
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 3 does not divide .*num_heads"):
        throughput.main(["--tensor-parallel-size", "3"])
