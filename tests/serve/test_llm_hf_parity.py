"""Greedy LLM.generate equals Hugging Face `generate` token for token, for every family,
whatever the batch composition: prefix caching on and off, a page pool so small that
sequences are preempted, and chunked prefill at a small token budget.

Every family runs the default setting; the engine settings, which change how a prompt is
split over steps and pages but not the model, run on the two families whose attention
depends on where a chunk or a page starts (llama3's scaled rope, mistral's sliding
window). The batch-composition test shares the default setting's shapes, and so its
compilations."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from tandem.model.hf import load_model
from tandem.serve.llm import LLM
from tandem.serve.sampling_params import SamplingParams

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)
FAMILIES = {
    "llama3": LlamaConfig(
        **COMMON,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rope_theta=500000.0,
    ),
    "mistral": MistralConfig(**COMMON, sliding_window=16),
    "qwen2": Qwen2Config(**COMMON),
    "qwen3": Qwen3Config(**{**COMMON, "head_dim": 8}, tie_word_embeddings=True),
}
NEW_TOKENS = 32
SETTINGS = {
    "default": dict(page_size=8, max_num_batched_tokens=64, max_num_seqs=8),
    "no_prefix_cache": dict(
        page_size=8, max_num_batched_tokens=64, max_num_seqs=8, enable_prefix_caching=False
    ),
    # 14 pages of 4 = 56 slots for 5 sequences that grow to 37..60 tokens: preemption
    "preemption": dict(
        page_size=4, num_pages=16, max_model_len=64, max_num_batched_tokens=32, max_num_seqs=8
    ),
    "chunked_prefill": dict(page_size=4, max_num_batched_tokens=16, max_num_seqs=4),
}


CASES = [(f, "default") for f in sorted(FAMILIES)] + [
    (f, s) for f in ("llama3", "mistral") for s in sorted(SETTINGS) if s != "default"
]


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(FAMILIES[request.param], attn_implementation="eager")
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    rs = np.random.RandomState(0)
    shared = list(rs.randint(0, 128, 12))
    prompts = [list(rs.randint(0, 128, n)) for n in (1, 5, 17, 28)] + [shared + [3, 4]]
    prompts.append(shared + [7])  # shares a 12-token prefix with the previous prompt
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([p]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                min_new_tokens=NEW_TOKENS,
            )
        expected.append(out[0, len(p) :].tolist())
    return str(path), prompts, expected


@pytest.mark.parametrize("checkpoint,setting", CASES, indirect=["checkpoint"])
def test_greedy_generate_equals_transformers(checkpoint, setting):
    path, prompts, expected = checkpoint
    llm = LLM(load_model(path), None, **SETTINGS[setting])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, want, got in zip(prompts, expected, outputs):
        assert got.outputs[0].token_ids == want, (setting, len(prompt))
    engine = llm.engine
    assert engine.blocks.num_used_blocks == 0  # every page came back
    if setting == "preemption":
        assert engine.scheduler.num_preemptions > 0
    if setting in ("default", "chunked_prefill"):
        # Asked again, the last prompt reuses its cached full pages and gives HF's tokens.
        [again] = llm.generate([prompts[-1]], params)
        assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == expected[-1]
    if setting == "no_prefix_cache":
        assert engine.num_cached_prompt_tokens == 0


@pytest.mark.parametrize("checkpoint", sorted(FAMILIES), indirect=True)
def test_batch_composition_does_not_change_outputs(checkpoint):
    path, prompts, expected = checkpoint
    llm = LLM(load_model(path), None, **SETTINGS["default"])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for subset in ([0], [3, 1], [5, 2, 4, 0]):
        outs = llm.generate([prompts[i] for i in subset], params)
        assert [o.outputs[0].token_ids for o in outs] == [expected[i] for i in subset]
