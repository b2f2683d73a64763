"""Token constraints in the engine (logit_bias, allowed_token_ids, min_tokens, bad_words,
grammars) keep the engine's promises: a seed gives the same tokens whatever the overlap,
the number of device steps per call, preemption or the other requests in the batch."""

import json

import jsonschema
import pytest
from flax import nnx

from tandem.model import ModelConfig, Transformer
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.sampling_params import SamplingParams, StructuredOutput

CFG = ModelConfig(
    vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, max_position_embeddings=256,
)  # fmt: skip
TOK = byte_tokenizer()
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
    },
    "required": ["id", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(3))


def run(model, requests, **config):
    cfg = dict(page_size=8, max_num_batched_tokens=64, max_num_seqs=8, **config)
    engine = Engine(model, TOK, EngineConfig(**cfg))
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, TOK.encode(prompt), params)
    done = engine.run_until_done()
    return {rid: [c.token_ids for c in out.outputs] for rid, out in done.items()}, engine


def controlled():
    z, a, b = ord("Z"), ord("a"), ord("b")
    return {
        "bias": ("hello", SamplingParams(max_tokens=20, seed=1, logit_bias={z: 4.0, a: -100})),
        "allowed": ("x", SamplingParams(max_tokens=16, seed=2, allowed_token_ids=[a, b, z])),
        "min": ("yy", SamplingParams(max_tokens=12, seed=3, stop_token_ids=[a, b], min_tokens=6)),
        "bad": ("zz", SamplingParams(max_tokens=24, seed=4, bad_words=[[a], [b, z]])),
        "plain": ("plain", SamplingParams(max_tokens=18, seed=5, n=2)),
        "json": (
            "{",
            SamplingParams(
                max_tokens=60,
                seed=6,
                n=2,
                structured_output=StructuredOutput(json=json.dumps(SCHEMA)),
            ),
        ),
    }


def test_constraints_hold_and_do_not_depend_on_overlap_steps_or_preemption(model):
    ref, _ = run(model, controlled(), async_scheduling=False, num_decode_steps=1)
    fast, _ = run(model, controlled(), async_scheduling=True, num_decode_steps=8)
    # 12 pages of 8 tokens for 8 sequences of up to ~70 tokens: preemptions happen.
    tight, engine = run(model, controlled(), num_pages=12)
    assert engine.scheduler.make_stats()["num_preemptions"] > 0
    assert ref == fast == tight
    z, a, b = ord("Z"), ord("a"), ord("b")
    assert a not in ref["bias"][0]
    assert set(ref["allowed"][0]) <= {a, b, z}
    min_out = ref["min"][0]
    assert not {a, b} & set(min_out[:6])
    bad = ref["bad"][0]
    assert a not in bad and all(bad[i : i + 2] != [b, z] for i in range(len(bad) - 1))
    for tokens in ref["json"]:
        text = TOK.decode([t for t in tokens if t != TOK.eos_token_id])
        jsonschema.validate(json.loads(text), SCHEMA)
