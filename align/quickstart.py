"""`tandem quickstart`: the whole loop on a CPU in a few minutes.

1. writes a synthetic arithmetic task ("3+4=" -> "7") to JSONL;
2. SFTs a tiny random model (byte-level, i.e. character, tokenizer) on it;
3. improves it with GRPO, rollouts from the serving engine, reward = exact answer match;
4. prints the reward before and after on held-out prompts;
5. the GRPO run saved the model in Hugging Face format: serves it over HTTP and answers one
   request with a real client.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import numpy as np

from tandem.align.algo_configs import GRPOConfig, SFTConfig
from tandem.align.data import synthetic_arithmetic
from tandem.align.train_config import TrainConfig

MODEL_BINDINGS = (
    "ModelConfig.num_layers = 2",
    "ModelConfig.hidden_size = 64",
    "ModelConfig.intermediate_size = 256",
    "ModelConfig.max_position_embeddings = 64",
)


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def evaluate(model_dir: str, records: list[dict], *, num_samples: int = 4, seed: int = 0):
    """(greedy accuracy, mean exact-match reward of sampled completions at T=1)."""
    from tandem.align.rl.common import make_engine
    from tandem.align.rl.rewards import exact_match
    from tandem.align.rl.rollout import generate
    from tandem.model.hf import load_model
    from tandem.model.tokenizer import load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    engine = make_engine(model, tokenizer, num_seqs=len(records) * num_samples, max_len=32)
    # Encoded as the server encodes a prompt (and as training did: see data/tokenize.py).
    prompts = [tokenizer.encode(r["prompt"]) for r in records]
    out = {}
    for name, temperature, n in (("greedy", 0.0, 1), ("sampled", 1.0, num_samples)):
        rollouts = generate(
            engine, prompts, group_size=n, max_tokens=4, temperature=temperature, seed=seed
        )
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rollouts.completion_ids]
        answers = [records[g]["answer"] for g in rollouts.group]
        out[name] = float(np.mean(exact_match(texts, texts, answer=answers)))
    return out["greedy"], out["sampled"]


def serve_one_request(model_dir: str, prompt: str) -> str:
    """Serves `model_dir` with the OpenAI-compatible server on a free local port, sends one
    completion request with httpx, shuts down; returns the completion text."""
    import httpx
    import uvicorn

    from tandem.model.loading import load
    from tandem.serve.async_engine import AsyncEngine
    from tandem.serve.engine import Engine, EngineConfig
    from tandem.serve.openai_server import build_app

    model, tokenizer, name = load(model_dir)
    engine = Engine(model, tokenizer, EngineConfig(num_pages=64, max_num_seqs=8), model_name=name)
    async_engine = AsyncEngine(engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(build_app(async_engine), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            if time.time() > deadline:
                raise RuntimeError("the server did not start within 60 s")
            time.sleep(0.05)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": name, "prompt": prompt, "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        reply.raise_for_status()
        return reply.json()["choices"][0]["text"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        async_engine.shutdown()


def run_quickstart(run_dir: str = "runs/quickstart", *, fast: bool = False) -> int:
    from tandem.align.rl.grpo import train_grpo
    from tandem.align.sft import train_sft
    from tandem.configs import parse

    start = time.perf_counter()
    os.makedirs(run_dir, exist_ok=True)
    data = synthetic_arithmetic(2000, seed=0)
    held_out = synthetic_arithmetic(64, seed=1)
    train_file = write_jsonl(os.path.join(run_dir, "arithmetic.jsonl"), data)
    parse(["models/tiny.gin"], MODEL_BINDINGS)
    print(f"[1/4] task: {len(data)} problems like {data[0]['prompt']!r} -> {data[0]['answer']!r}")

    sft_dir = os.path.join(run_dir, "sft")
    sft_steps = 100 if fast else 150
    train_sft(
        TrainConfig(
            run_dir=sft_dir,
            train_file=train_file,
            num_steps=sft_steps,
            batch_size=32,
            max_length=16,
            learning_rate=3e-3,
            warmup_steps=10,
            save_every=sft_steps,
            progress=not fast,
        ),
        SFTConfig(),
    )
    greedy0, reward0 = evaluate(os.path.join(sft_dir, "hf"), held_out)
    print(f"[2/4] SFT, {sft_steps} steps: greedy accuracy {greedy0:.2f}, mean reward {reward0:.3f}")

    grpo_dir = os.path.join(run_dir, "grpo")
    grpo_steps = 30 if fast else 60
    train_grpo(
        TrainConfig(
            run_dir=grpo_dir,
            model=os.path.join(sft_dir, "hf"),
            train_file=train_file,
            num_steps=grpo_steps,
            batch_size=128,
            max_length=16,
            learning_rate=1e-3,
            save_every=grpo_steps,
            progress=not fast,
        ),
        GRPOConfig(
            group_size=8,
            max_prompt_length=8,
            max_completion_length=4,
            reward_funcs=("exact_match",),
        ),
    )
    hf_dir = os.path.join(grpo_dir, "hf")
    greedy1, reward1 = evaluate(hf_dir, held_out)
    print(
        f"[3/4] GRPO, {grpo_steps} steps: greedy accuracy {greedy1:.2f}, mean reward "
        f"{reward1:.3f} (was {reward0:.3f})"
    )
    prompt = held_out[0]["prompt"]
    text = serve_one_request(hf_dir, prompt)
    print(f"[4/4] served {hf_dir} over HTTP: {prompt!r} -> {text!r}")
    print(f"done in {time.perf_counter() - start:.0f} s; curves: tandem plot {grpo_dir}")
    return 0
