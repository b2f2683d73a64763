"""bench/hf_generate.py on CPU with the tiny preset in float32: the peer makes exactly the
requested tokens per sequence and, greedy, the same tokens as tandem's `LLM.generate` on
the weights tandem saved (so it runs the same model), padded batches included."""

import json

import jax.numpy as jnp
import pytest
import torch
from flax import nnx

from tandem.bench.hf_generate import hf_generate, load_hf_model, main, spawn_hf_peer
from tandem.configs import model_config_from_gin
from tandem.model.hf import save_model
from tandem.model.tokenizer import byte_tokenizer
from tandem.model.transformer import Transformer
from tandem.serve.llm import LLM
from tandem.serve.sampling_params import SamplingParams

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
OUTPUT_LENS = [6, 4]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tandem model, its HF-format checkpoint directory), random f32 weights."""
    cfg = model_config_from_gin("models/tiny.gin")
    model = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    path = str(tmp_path_factory.mktemp("tiny"))
    save_model(model, path)
    return model, path


@pytest.fixture(scope="module")
def tandem_tokens(tiny):
    """tandem's greedy `LLM.generate` tokens for PROMPTS."""
    llm = LLM(tiny[0], byte_tokenizer(), max_num_seqs=2, max_model_len=64)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in OUTPUT_LENS]
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("batch_size", [1, 2])  # 2: one left-padded batch
def test_peer_makes_the_requested_tokens_and_matches_tandem_greedy(tiny, tandem_tokens, batch_size):
    hf = load_hf_model(tiny[1], dtype=torch.float32, device="cpu")
    run = hf_generate(hf, PROMPTS, OUTPUT_LENS, batch_size=batch_size)
    assert [len(t) for t in run["tokens"]] == OUTPUT_LENS
    assert run["output_tokens"] == sum(OUTPUT_LENS) and run["seconds"] > 0
    assert run["tokens"] == tandem_tokens


def test_peer_samples_the_requested_tokens_at_a_temperature(tiny):
    hf = load_hf_model(tiny[1], dtype=torch.float32, device="cpu")
    run = hf_generate(hf, PROMPTS, OUTPUT_LENS, batch_size=2, temperature=0.6)
    assert [len(t) for t in run["tokens"]] == OUTPUT_LENS


def test_main_saves_the_weights_then_times_them(tmp_path):
    workload = tmp_path / "workload.json"
    workload.write_text(json.dumps({"prompts": PROMPTS, "output_lens": OUTPUT_LENS}))
    result = tmp_path / "hf.json"
    argv = ["--model", "models/tiny.gin", "--checkpoint", str(tmp_path / "ckpt")]
    argv += ["--workload", str(workload), "--result-json", str(result)]
    assert main(argv + ["--device", "cpu", "--dtype", "float32"]) == 0
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert json.loads(result.read_text())["output_tokens"] == sum(OUTPUT_LENS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without CUDA")
def test_spawned_peer_is_skipped_without_cuda(tmp_path):
    result, note = spawn_hf_peer(
        model="models/tiny.gin",
        seed=0,
        checkpoint=str(tmp_path / "ckpt"),
        prompts=PROMPTS,
        output_lens=OUTPUT_LENS,
        batch_size=None,
        temperature=0.0,
        work_dir=str(tmp_path),
    )
    assert result is None and "CUDA" in note
