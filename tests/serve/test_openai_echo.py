"""Prompt logprobs over HTTP: `echo` on /v1/completions and vLLM's `prompt_logprobs`.

As test_openai_server.py: a uvicorn server in a thread over the real engine and a tiny
random model with the byte tokenizer (one token per byte, no BOS). The reference for every
prompt logprob is the model's own teacher-forced forward: log_softmax(model(prompt))[i - 1]
at prompt[i].
"""

from __future__ import annotations

import json

import httpx
import jax
import numpy as np
import openai
import pytest
from flax import nnx
from test_openai_server import running

from tandem.model import ModelConfig, Transformer
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.async_engine import AsyncEngine
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.openai_server import build_app

MODEL = "tiny"
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
PROMPT = "Score me, tandem."
TOKENIZER = byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def url(model):
    # max_num_batched_tokens 16 splits a prompt into chunks: prompt logprobs span them.
    config = EngineConfig(
        page_size=16, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=16
    )
    engine = AsyncEngine(Engine(model, TOKENIZER, config, model_name=MODEL))
    with running(build_app(engine)) as base:
        yield base
    engine.shutdown()


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def reference_logprobs(model, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1, from the training forward."""
    logits = model(np.asarray([ids], np.int32))[0]  # [T, V]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return logp[np.arange(len(ids) - 1), ids[1:]]


def post(url: str, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/{endpoint}", json=body, timeout=60)


@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token_ids"])
def test_echo_max_tokens_0_scores_the_prompt(client, model, as_ids):
    ids = TOKENIZER.encode(PROMPT)
    prompt = ids if as_ids else PROMPT
    r = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=0, temperature=0.0
    )
    [choice] = r.choices
    assert choice.text == PROMPT
    lp = choice.logprobs
    assert lp.tokens == [TOKENIZER.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], reference_logprobs(model, ids), atol=1e-4)
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        # 2 alternatives plus the prompt's own token (which may be one of them).
        assert 2 <= len(top) <= 3 and max(top.values()) >= chosen
    assert lp.text_offset == list(range(len(ids)))  # one character per byte token
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0


def test_echo_with_generation(client, model):
    ids = TOKENIZER.encode(PROMPT)
    plain = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=1, **GREEDY
    ).choices[0]
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=1, echo=True, **GREEDY
    )
    [choice] = r.choices
    assert choice.text == PROMPT + plain.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4
    assert lp.tokens[len(ids) :] == plain.logprobs.tokens
    assert lp.token_logprobs[0] is None
    np.testing.assert_allclose(
        lp.token_logprobs[1 : len(ids)], reference_logprobs(model, ids), atol=1e-4
    )
    np.testing.assert_allclose(
        lp.token_logprobs[len(ids) :], plain.logprobs.token_logprobs, atol=1e-5
    )
    # Offsets continue from the prompt's tokens into the completion's.
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset[: len(ids)] == list(range(len(ids)))  # one character per byte
    assert r.usage.completion_tokens == 4


def test_echo_streams_the_prompt_first(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=3, logprobs=1, echo=True, **GREEDY)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True)]
    assert chunks[0].text.startswith(PROMPT)
    assert "".join(c.text for c in chunks) == whole.text
    tokens = [t for c in chunks for t in c.logprobs.tokens]
    offsets = [o for c in chunks for o in c.logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    # max_tokens 0 streams the prompt alone.
    only = client.completions.create(**{**kwargs, "max_tokens": 0}, stream=True)
    assert "".join(c.choices[0].text for c in only) == PROMPT


def test_echo_with_n(client):
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, n=2, seed=1, echo=True, temperature=1.0
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.text.startswith(PROMPT) and len(c.text) > len(PROMPT) for c in r.choices)


def check_vllm_prompt_logprobs(steps: list, model, ids: list[int], k: int) -> None:
    """vLLM's shape: None first, then {token_id: {logprob, rank, decoded_token}} holding
    the prompt's token and the top k, ranked from 1."""
    assert len(steps) == len(ids) and steps[0] is None
    expected = reference_logprobs(model, ids)
    for i, step in enumerate(steps[1:], 1):
        own = step[str(ids[i])]
        assert own["logprob"] == pytest.approx(expected[i - 1], abs=1e-4)
        assert own["decoded_token"] == TOKENIZER.decode([ids[i]])
        top = sorted((e for e in step.values() if e["rank"] is not None), key=lambda e: e["rank"])
        assert [e["rank"] for e in top][:k] == list(range(1, k + 1))
        assert len(step) in (k, k + 1)  # k + 1 when the prompt's token is not in the top k
        logprobs = [e["logprob"] for e in top]
        assert logprobs == sorted(logprobs, reverse=True)
        assert all(own["logprob"] <= lp for lp in logprobs[:1])
        if k == 0:  # no alternatives computed: the prompt token's rank is unknown
            assert own["rank"] is None


def test_prompt_logprobs_on_completions(url, model):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 3,
            "temperature": 0.0, "n": 2}  # fmt: skip
    r = post(url, "completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2
    for choice in choices:
        assert not choice["text"].startswith(PROMPT)  # no echo asked
        check_vllm_prompt_logprobs(choice["prompt_logprobs"], model, TOKENIZER.encode(PROMPT), 3)


def test_prompt_logprobs_on_chat(url, model):
    messages = [{"role": "user", "content": "Hi there"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2, "prompt_logprobs": 0}
    r = post(url, "chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    text = TOKENIZER.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = TOKENIZER.encode(text, add_special_tokens=False)  # as the server tokenizes it
    assert out["usage"]["prompt_tokens"] == len(ids)
    check_vllm_prompt_logprobs(out["prompt_logprobs"], model, ids, 0)


CHAT = [{"role": "user", "content": "x"}]
BAD_REQUESTS = [
    ("completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("completions", {"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
    ("completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "x", "echo": True, "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": "x", "echo": True, "logprobs": 6}, "logprobs"),
    ("completions", {"prompt": "x", "echo": True, "logprobs": -1}, "logprobs"),
    ("completions", {"prompt": "x", "echo": True, "best_of": 2}, "best_of"),
    ("completions", {"prompt": "x", "echo": "yes"}, "echo"),
    ("chat/completions", {"messages": CHAT, "prompt_logprobs": 21}, "prompt_logprobs"),
    ("chat/completions", {"messages": CHAT, "prompt_logprobs": 1, "stream": True},
     "prompt_logprobs"),
    ("chat/completions", {"messages": CHAT, "echo": True}, "echo"),
    ("chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
]  # fmt: skip


@pytest.mark.parametrize("endpoint,body,param", BAD_REQUESTS)
def test_bad_request_names_the_field_and_the_server_keeps_serving(
    url, client, endpoint, body, param
):
    r = post(url, endpoint, {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"], json.dumps(error)
    ok = client.completions.create(
        model=MODEL, prompt=PROMPT, echo=True, logprobs=0, max_tokens=0, temperature=0.0
    )
    assert ok.choices[0].text == PROMPT
