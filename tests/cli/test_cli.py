"""The `tandem` console command, run as a user runs it (a real subprocess)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tandem.model import ModelConfig, Transformer
from tandem.model.hf import save_model
from tandem.model.tokenizer import byte_tokenizer


def tandem(*args, timeout=300):
    exe = shutil.which("tandem")
    cmd = [exe] if exe else [sys.executable, "-m", "tandem.cli.main"]
    env = {**os.environ, "XLA_FLAGS": ""}  # one device is enough here
    return subprocess.run(
        cmd + list(args), capture_output=True, text=True, timeout=timeout, env=env
    )


def test_generate_on_the_embedded_tiny_preset():
    run = tandem("generate", "--prompt", "Hi", "--max_new_tokens", "5")
    assert run.returncode == 0, run.stderr
    assert "models/tiny.gin (random weights, seed 0)" in run.stdout
    assert "5 tokens in" in run.stdout


def test_generate_from_a_checkpoint_directory(tmp_path):
    cfg = ModelConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        eos_token_id=257,
    )
    save_model(Transformer(cfg, rngs=nnx.Rngs(3)), str(tmp_path))
    byte_tokenizer().save_pretrained(tmp_path)
    run = tandem("generate", "--model", str(tmp_path), "--prompt", "abc", "--max_new_tokens", "4")
    assert run.returncode == 0, run.stderr
    assert f"model: {tmp_path}: llama, 1 layers" in run.stdout
    assert np.any([line.startswith("output: ") for line in run.stdout.splitlines()])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gin_param", "ModelConfig.not_a_field=1"], "not_a_field"),
        (["--gin_file", "models/absent.gin"], "no packaged gin file 'models/absent.gin'"),
        (["--model", "/nonexistent/ckpt"], "/nonexistent/ckpt: no such checkpoint directory"),
    ],
)
def test_bad_input_is_a_clear_error(args, message):
    run = tandem("generate", *args)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_serve_quickstart_answers_a_chat_request():
    """The README's quickstart: `tandem serve` on the tiny preset answers the openai client."""
    import socket
    import time

    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("tandem")
    cmd = [exe] if exe else [sys.executable, "-m", "tandem.cli.main"]
    proc = subprocess.Popen(
        cmd + ["serve", "--model", "models/tiny.gin", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60
        )
        deadline = time.time() + 120
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.5)
        assert [m.id for m in models.data] == ["tiny"]
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/v1" in out


def test_quickstart_trains_saves_and_serves(tmp_path):
    """The README's main command (shortened by --fast): SFT, GRPO with the reward printed
    before and after, an HF checkpoint on disk, and one request answered over HTTP."""
    exe = shutil.which("tandem")
    cmd = [exe] if exe else [sys.executable, "-m", "tandem.cli.main"]
    out = subprocess.run(
        cmd + ["quickstart", "--fast", "--run_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for stage in ("[1/4] task:", "[2/4] SFT", "[3/4] GRPO", "[4/4] served"):
        assert any(line.startswith(stage) for line in lines), out.stdout
    assert "mean reward" in out.stdout and "(was " in out.stdout
    hf = tmp_path / "grpo" / "hf"
    assert (hf / "config.json").exists() and (hf / "model.safetensors").exists()
    assert (tmp_path / "grpo" / "metrics.jsonl").exists()
