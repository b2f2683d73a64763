"""lm-evaluation-harness against the OpenAI server, offline.

Two tasks defined over local files (tests/data/lm_eval: a multiple-choice task, scored by
loglikelihood, and a generation task) run through lm-eval's Python API against the real
app and engine (a tiny random model, the byte tokenizer) served by uvicorn on a free port,
as test_openai_server.py does:

- `local-completions` scores each choice with /v1/completions (echo, logprobs, one token:
  lm-eval sums the echoed logprobs of the continuation). Its loglikelihoods must equal the
  engine's own prompt logprobs (`LLM` over the same model) and its accuracy follow from them.
- `local-completions` and `local-chat-completions` generate; what lm-eval reports must be
  what the server answers to the very request lm-eval sent (recorded, then sent again).

lm-eval's completions model needs a tokenizer of its own to find where the continuation
starts: a Hugging Face one loaded from the directory this test saves the byte tokenizer to
(`tokenizer_backend=huggingface`), so nothing is fetched, and it splits exactly as the server
does. The chat model sends messages and needs none. `lm_eval.evaluate` is called rather than
`simple_evaluate`, which also gathers torch's environment report (16 s of subprocesses here).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import lm_eval
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from test_openai_server import running

from tandem.model import ModelConfig, Transformer
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.async_engine import AsyncEngine
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.llm import LLM
from tandem.serve.openai_server import build_app
from tandem.serve.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]
TASKS = "tests/data/lm_eval"  # the tasks' data_files are relative to the repository root
MODEL = "tiny"
MAX_MODEL_LEN = 128
ENGINE_CONFIG = dict(page_size=16, max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                     max_num_batched_tokens=128)  # fmt: skip
TOKENIZER = byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    return Transformer(cfg, rngs=nnx.Rngs(0))


class _Recorder:
    """ASGI wrapper that keeps the JSON body of every /v1 request: what lm-eval sent."""

    def __init__(self, app):
        self.app = app
        self.requests: list[tuple[str, dict]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.requests.append((scope["path"], json.loads(b"".join(chunks))))
            return message

        await self.app(scope, recording_receive, send)


@pytest.fixture(scope="module")
def server(model):
    engine = AsyncEngine(Engine(model, TOKENIZER, EngineConfig(**ENGINE_CONFIG), model_name=MODEL))
    recorder = _Recorder(build_app(engine))
    with running(recorder) as base:
        yield base, recorder
    engine.shutdown()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("byte-tokenizer")
    TOKENIZER.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def evaluate(server, monkeypatch):
    """evaluate(model_name, model_args, task, **kwargs) -> lm-eval's results, after
    clearing the recorded requests; run from the repository root."""
    base, recorder = server
    monkeypatch.chdir(REPO)
    tasks = TaskManager(include_path=TASKS, include_defaults=False)

    def run(model_name: str, model_args: dict, task: str, **kwargs) -> dict:
        recorder.requests.clear()
        lm = get_model(model_name)(model=MODEL, max_length=MAX_MODEL_LEN, **model_args)
        return lm_eval.evaluate(
            lm=lm, task_dict=tasks.load([task]), bootstrap_iters=0, log_samples=True, **kwargs
        )

    return run


def replay(base: str, path: str, body: dict) -> dict:
    r = httpx.post(f"{base}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_loglikelihoods_equal_the_engines(server, evaluate, model, tokenizer_dir):
    base, recorder = server
    results = evaluate(
        "local-completions",
        dict(
            base_url=f"{base}/v1/completions",
            tokenizer_backend="huggingface",
            tokenizer=tokenizer_dir,
        ),
        "tandem_mc",
    )
    samples = results["samples"]["tandem_mc"]
    pairs = [tuple(arg) for s in samples for arg in s["arguments"]]  # (context, continuation)
    got = np.array([resp[0] for s in samples for resp in s["filtered_resps"]])
    got_greedy = [resp[1] for s in samples for resp in s["filtered_resps"]]
    assert len(pairs) == 12  # 4 questions x 3 choices

    # What lm-eval sent: one scoring request per choice, the context's and continuation's
    # tokens as ids, echo with logprobs and a one-token completion that it drops.
    sent = [body for path, body in recorder.requests if path == "/v1/completions"]
    assert len(sent) == len(pairs)
    assert all(b["echo"] and b["logprobs"] == 1 and b["max_tokens"] == 1 for b in sent)
    prompts = [TOKENIZER.encode(ctx) + TOKENIZER.encode(cont) for ctx, cont in pairs]
    assert sorted(b["prompt"][0] for b in sent) == sorted(prompts)

    # The engine's own: prompt logprobs of the same tokens, computed offline.
    llm = LLM(model, TOKENIZER, **ENGINE_CONFIG)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))
    want, want_greedy = [], []
    for (ctx, _), out in zip(pairs, outs):
        continuation = out.prompt_logprobs[len(TOKENIZER.encode(ctx)) :]
        want.append(sum(e.logprob for e in continuation))
        want_greedy.append(all(e.token_id == e.top[0][0] for e in continuation))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert got_greedy == want_greedy

    # The accuracy follows: a question is right when its gold choice scores highest.
    labels = [s["target"] for s in samples]
    correct = np.argmax(np.reshape(want, (4, 3)), axis=1) == labels
    assert results["results"]["tandem_mc"]["acc,none"] == pytest.approx(correct.mean())
    print(f"lm-eval loglikelihoods {np.round(got, 4).tolist()}")
    print(f"engine  loglikelihoods {np.round(want, 4).tolist()}; acc {correct.mean()}")


@pytest.mark.parametrize(
    "model_name, path",
    [
        ("local-completions", "/v1/completions"),
        ("local-chat-completions", "/v1/chat/completions"),
    ],
)
def test_generate_until_returns_the_servers_answers(
    server, evaluate, tokenizer_dir, model_name, path
):
    base, recorder = server
    if model_name == "local-completions":
        # Prompts go as token ids from lm-eval's tokenizer.
        model_args = dict(tokenizer_backend="huggingface", tokenizer=tokenizer_dir)
        kwargs = {}
    else:
        # Messages, rendered by the server's chat template.
        model_args = {}
        kwargs = dict(apply_chat_template=True)
    results = evaluate(
        model_name, dict(base_url=f"{base}{path}", **model_args), "tandem_gen", **kwargs
    )
    samples = results["samples"]["tandem_gen"]
    sent = [body for p, body in recorder.requests if p == path]
    assert len(sent) == len(samples) == 3
    # The task's generation_kwargs reach the server: greedy, 8 tokens, cut at a newline.
    assert all(b["max_tokens"] == 8 and b["temperature"] == 0 and "\n" in b["stop"] for b in sent)

    answers = {}
    for body in sent:
        reply = replay(base, path, body)["choices"][0]
        if path == "/v1/completions":
            [prompt] = body["prompt"]
            answers[TOKENIZER.decode(prompt)] = reply["text"]
        else:
            [message] = body["messages"]
            answers[message["content"]] = reply["message"]["content"]
    for s in samples:
        context = s["arguments"][0][0]
        if model_name == "local-chat-completions":
            [message] = json.loads(context[0])
            context = message["content"]
        assert s["resps"][0][0] == answers[context]
    print(f"{model_name}: {[s['resps'][0][0] for s in samples]}")
