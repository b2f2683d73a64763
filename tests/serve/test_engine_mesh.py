"""The engine on a mesh serves what it serves on one device.

tests/conftest.py gives the process 8 CPU devices. With `mesh=`, the weights sit on the
mesh (`shard_model`), the KV pages are sharded on kv heads over 'tensor', and each step
runs under the mesh, attention per device on its heads. Greedy tokens must equal the
single-device engine's (f32: the mesh changes the summation order, not what is summed),
over prompts of different lengths prefilled in chunks of the 16-token budget.
"""

import importlib

import numpy as np
import pytest
from flax import nnx

from tandem.model import ModelConfig, Transformer
from tandem.model.sharding import make_mesh, shard_model
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.sampling_params import SamplingParams

# 8 q / 4 kv heads: both split over tensor=2 and tensor=4.
CFG = ModelConfig(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    head_dim=16,
    max_position_embeddings=128,
)
TOK = byte_tokenizer()
rpa_module = importlib.import_module("tandem.pallas_kernels.ragged_paged_attention")
ENGINE = EngineConfig(page_size=8, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=80)
# 3, 21 and 44 prompt tokens: one chunk, two, three.
PROMPTS = ["abc", "a prompt of two chunks", "a prompt long enough for three prefill chunks"]
# Prompt logprobs: the step also hands the full [T, V] logits back to the host.
GREEDY = SamplingParams(
    max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0
)


def run(engine, prompts):
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), TOK.encode(prompt), GREEDY)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[str(i)] for i in range(len(prompts))]


def logprobs(output) -> list[float]:
    """The prompt's then the completion's token logprobs."""
    prompt = [lp.logprob for lp in output.prompt_logprobs[1:]]
    return prompt + [lp.logprob for lp in output.outputs[0].logprobs]


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def single_device(model):
    return run(Engine(model, TOK, ENGINE), PROMPTS)


@pytest.fixture
def split_calls(monkeypatch):
    """The meshes attention was split over (recorded at trace time)."""
    calls = []
    split = rpa_module.sharded_ragged_paged_attention

    def record(kernel, mesh, *args, **kwargs):
        calls.append(dict(mesh.shape))
        return split(kernel, mesh, *args, **kwargs)

    monkeypatch.setattr(rpa_module, "sharded_ragged_paged_attention", record)
    return calls


@pytest.mark.parametrize("tensor", [2, 4])
def test_mesh_engine_equals_single_device(model, single_device, split_calls, tensor):
    mesh = make_mesh(fsdp=8 // tensor, tensor=tensor)
    engine = Engine(shard_model(model, mesh), TOK, ENGINE, mesh=mesh)
    outputs = run(engine, PROMPTS)
    # The step ran under the mesh: every layer's attention went through shard_map.
    assert split_calls and all(shape == dict(mesh.shape) for shape in split_calls)
    for prompt, got, want in zip(PROMPTS, outputs, single_device):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert len(logprobs(got)) == len(prompt) - 1 + GREEDY.max_tokens
        np.testing.assert_allclose(logprobs(got), logprobs(want), atol=1e-4)
    # The donated pages came back where they were: 1 of the 4 kv heads' (K, V) pairs per
    # device at tensor=4, 2 at tensor=2.
    for kv in engine.kv:
        pages, page, num_combined, head_dim = kv.shape
        assert {s.data.shape for s in kv.addressable_shards} == {
            (pages, page, num_combined // tensor, head_dim)
        }


def test_mesh_engine_serves_updated_params_without_recompiling(model, single_device):
    """What RL does between rollouts: hand the engine new (same-sharded) params."""
    mesh = make_mesh(fsdp=4, tensor=2)
    engine = Engine(shard_model(model, mesh), TOK, ENGINE, mesh=mesh)
    run(engine, PROMPTS)
    compiles = engine.stats()["num_compiles"]
    engine.update_params(nnx.state(shard_model(model, mesh), nnx.Param))
    outputs = run(engine, PROMPTS)
    assert [o.outputs[0].token_ids for o in outputs] == [
        o.outputs[0].token_ids for o in single_device
    ]
    assert engine.stats()["num_compiles"] == compiles


def test_a_mesh_engine_compiles_each_bucket_once(model):
    """A call hands back the pages and the batch with the shardings they came in with: a
    3-token prompt's prefill and its decodes compile at most one mixed step and one decode
    call (none if an earlier engine of this model compiled them), and a second request of
    the same shapes compiles nothing."""
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    engine = Engine(shard_model(model, mesh), TOK, ENGINE, mesh=mesh)
    before = engine.stats()["num_compiles"]
    for rid in ("first", "second"):
        greedy = SamplingParams(max_tokens=4, temperature=0.0)
        engine.add_request(rid, TOK.encode("abc"), greedy)
        while engine.has_unfinished():
            engine.step()
        if rid == "first":
            compiles = engine.stats()["num_compiles"]
            assert compiles - before <= 2
    assert engine.stats()["num_compiles"] == compiles
