"""The `tandem` console command, run as a user runs it (a real subprocess); checks that need
no fresh process call `main` in this one."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from flax import nnx

from tandem.model import ModelConfig, Transformer
from tandem.model.hf import save_model
from tandem.model.tokenizer import byte_tokenizer


def tandem_cmd() -> list[str]:
    exe = shutil.which("tandem")
    return [exe] if exe else [sys.executable, "-m", "tandem.cli.main"]


def device_env(num_devices: int = 1) -> dict:
    """One CPU device unless a test needs a mesh (tensor parallel)."""
    flags = f"--xla_force_host_platform_device_count={num_devices}" if num_devices > 1 else ""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def tandem(*args, timeout=300):
    return subprocess.run(
        tandem_cmd() + list(args), capture_output=True, text=True, timeout=timeout, env=device_env()
    )


def output_line(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith("output: ")]
    return line


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


def test_generate_tensor_parallel_gives_the_same_text(capsys):
    """In process (this one has 8 devices): the tiny preset's 4 q / 2 kv heads split over
    2 of them; f32 greedy text is the one-device text."""
    from tandem.cli.main import main

    args = ["generate", "--prompt", "Hello", "--max_new_tokens", "8"]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main(args + ["--tensor_parallel_size", "2"]) == 0
    split = capsys.readouterr().out
    assert "tensor parallel over 2 devices" in split and "tensor parallel" not in one
    assert output_line(split) == output_line(one)


@pytest.mark.parametrize("command", [["generate"], ["serve", "models/tiny.gin"]])
def test_tensor_parallel_flag_takes_vllm_spelling_too(command):
    from tandem.cli.main import build_parser

    for flag in ("--tensor_parallel_size", "--tensor-parallel-size"):
        args = build_parser().parse_args(command + [flag, "2"])
        assert args.tensor_parallel_size == 2


@pytest.mark.parametrize(
    "size,message",
    [
        ("16", "--tensor_parallel_size 16 is larger than the 8 cpu devices"),
        ("3", "--tensor_parallel_size 3 does not divide the model's 4 attention heads (num_heads)"),
        ("4", "--tensor_parallel_size 4 does not divide the model's 2 kv heads (num_kv_heads)"),
        ("0", "--tensor_parallel_size must be at least 1, got 0"),
    ],
)
@pytest.mark.parametrize("command", [["generate"], ["serve", "models/tiny.gin"]])
def test_bad_tensor_parallel_size_is_a_clear_error(capsys, command, size, message):
    """In process (this one has 8 devices): the check runs before any weights exist."""
    from tandem.cli.main import main

    assert main(command + ["--tensor_parallel_size", size]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@contextlib.contextmanager
def serving(*args, num_devices=1):
    """`tandem serve ARGS` on a free port. Yields a namespace once the server answers: its
    openai `client`, and its `output` (stdout and stderr), filled in when it has stopped."""
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        tandem_cmd() + ["serve", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=device_env(num_devices),
    )
    server = types.SimpleNamespace(client=None, output="")
    try:
        server.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60
        )
        deadline = time.time() + 120
        while True:
            try:
                server.client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        server.output, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/v1" in server.output


def test_serve_quickstart_answers_a_chat_request():
    """The README's quickstart: `tandem serve` on the tiny preset answers the openai client."""
    with serving("--model", "models/tiny.gin") as server:
        assert [m.id for m in server.client.models.list().data] == ["tiny"]
        reply = server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"


def test_serve_tensor_parallel_answers_a_request():
    """vLLM's spelling of the flag; the tiny preset's heads split over 2 of 8 devices."""
    with serving("models/tiny.gin", "--tensor-parallel-size", "2", num_devices=8) as server:
        reply = server.client.completions.create(
            model="tiny", prompt="Hello", max_tokens=8, temperature=0.0
        )
        assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"
    assert "(tensor parallel over 2 devices)" in server.output


def test_quickstart_trains_saves_and_serves(quickstart_run):
    """The README's main command (shortened by --fast): SFT, GRPO with the reward printed
    before and after, an HF checkpoint on disk, and one request answered over HTTP. The run
    is the session's (tests/conftest.py); test_learning.py checks that its GRPO learned."""
    run_dir, stdout = quickstart_run
    lines = stdout.splitlines()
    for stage in ("[1/4] task:", "[2/4] SFT", "[3/4] GRPO", "[4/4] served"):
        assert any(line.startswith(stage) for line in lines), stdout
    assert "mean reward" in stdout and "(was " in stdout
    hf = run_dir / "grpo" / "hf"
    assert (hf / "config.json").exists() and (hf / "model.safetensors").exists()
    assert (run_dir / "grpo" / "metrics.jsonl").exists()
