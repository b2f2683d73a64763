"""The `tandem` console command, run as a user runs it (a real subprocess); checks that need
no fresh process call `main` in this one."""

import contextlib
import os
import shutil
import socket
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
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if num_devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}


BAD_INPUT = {
    "unknown binding": (["--gin_param", "ModelConfig.not_a_field=1"], "not_a_field"),
    "absent gin file": (
        ["--gin_file", "models/absent.gin"],
        "no packaged gin file 'models/absent.gin'",
    ),
    "absent checkpoint": (
        ["--model", "/nonexistent/ckpt"],
        "/nonexistent/ckpt: no such checkpoint directory",
    ),
}


def output_line(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith("output: ")]
    return line


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    cfg = ModelConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        eos_token_id=257,
    )
    path = tmp_path_factory.mktemp("ckpt")
    save_model(Transformer(cfg, rngs=nnx.Rngs(3)), str(path))
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def generate_runs(start_in_background, checkpoint_dir):
    """The `tandem generate` runs of the tests below, all started when the first is asked
    for: each spends most of its seconds importing and compiling on one core, and CI has 2."""
    runs = {
        "tiny preset": ["--prompt", "Hi", "--max_new_tokens", "5"],
        "checkpoint": ["--model", str(checkpoint_dir), "--prompt", "abc", "--max_new_tokens", "4"],
        **{case: args for case, (args, _) in BAD_INPUT.items()},
    }
    return {
        case: start_in_background(tandem_cmd() + ["generate", *args], env=device_env())
        for case, args in runs.items()
    }


def test_generate_on_the_embedded_tiny_preset(generate_runs):
    run = generate_runs["tiny preset"].wait(timeout=300)
    assert run.returncode == 0, run.stderr
    assert "models/tiny.gin (random weights, seed 0)" in run.stdout
    assert "5 tokens in" in run.stdout


def test_generate_from_a_checkpoint_directory(generate_runs, checkpoint_dir):
    run = generate_runs["checkpoint"].wait(timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"model: {checkpoint_dir}: llama, 1 layers" in run.stdout
    assert np.any([line.startswith("output: ") for line in run.stdout.splitlines()])


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_a_clear_error(generate_runs, case):
    run = generate_runs[case].wait(timeout=300)
    assert run.returncode == 2
    assert BAD_INPUT[case][1] in run.stderr
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


def test_train_takes_repeated_gin_files_and_bindings_in_order():
    from tandem.cli.main import build_parser

    argv = ["train", "dpo", "--gin_file", "a.gin", "--gin_param", "X.y=1", "--gin_file", "b.gin"]
    args = build_parser().parse_args(argv + ["--gin_param", "X.y=2"])
    assert (args.algorithm, args.gin_file, args.gin_param) == (
        "dpo",
        ["a.gin", "b.gin"],
        ["X.y=1", "X.y=2"],
    )
    with pytest.raises(SystemExit):  # an algorithm tandem does not train, or no gin file
        build_parser().parse_args(["train", "sgd", "--gin_file", "a.gin"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "sft"])


def test_serve_api_keys_come_from_flags_and_the_environment():
    """`--api_key KEY[=OWNER]` (repeatable) and $TANDEM_API_KEYS, comma-separated; a key
    without an owner is the default VTC client's."""
    from tandem.cli.serve import api_keys

    keys = api_keys(["k1", "k2=alice"], "k3=bob,k4,")
    assert keys == {"k1": "default", "k2": "alice", "k3": "bob", "k4": "default"}


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


def start_server(start_in_background, *args, num_devices=1) -> types.SimpleNamespace:
    """`tandem serve ARGS` on a free port, started now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = tandem_cmd() + ["serve", *args, "--port", str(port)]
    return types.SimpleNamespace(
        port=port, run=start_in_background(cmd, env=device_env(num_devices))
    )


@pytest.fixture(scope="module")
def servers(start_in_background):
    """The servers of the tests below, started together when the first is asked for."""
    return {
        "quickstart": start_server(start_in_background, "--model", "models/tiny.gin"),
        "tensor parallel": start_server(
            start_in_background, "models/tiny.gin", "--tensor-parallel-size", "2", num_devices=8
        ),
    }


@contextlib.contextmanager
def serving(server):
    """Yields a namespace once `server` answers: its openai `client`, and its `output`
    (stdout and stderr), filled in when it has stopped."""
    import openai

    proc = server.run.proc
    out = types.SimpleNamespace(client=None, output="")
    try:
        out.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1",
            api_key="none",
            max_retries=0,
            timeout=60,
        )
        deadline = time.time() + 120
        while True:
            try:
                out.client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, server.run.wait().stderr
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.5)
        yield out
    finally:
        proc.terminate()
        done = server.run.wait(timeout=30)
        out.output = done.stdout + done.stderr
    assert f"http://127.0.0.1:{server.port}/v1" in out.output


def test_serve_quickstart_answers_a_chat_request(servers):
    """The README's quickstart: `tandem serve` on the tiny preset answers the openai client."""
    with serving(servers["quickstart"]) as server:
        assert [m.id for m in server.client.models.list().data] == ["tiny"]
        reply = server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"


def test_serve_tensor_parallel_answers_a_request(servers):
    """vLLM's spelling of the flag; the tiny preset's heads split over 2 of 8 devices."""
    with serving(servers["tensor parallel"]) as server:
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
