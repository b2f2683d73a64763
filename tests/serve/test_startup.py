"""Defaults that reach the hardware, checked where a CPU can: the compilation cache folder,
and the prompt forms LLM.generate takes (--dtype auto: tests/model/test_loading.py)."""

import jax
import pytest

from tandem.serve.startup import enable_compilation_cache


def test_compilation_cache_is_off_on_a_cpu_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert enable_compilation_cache() is None
    before = jax.config.jax_compilation_cache_dir
    try:
        assert enable_compilation_cache(str(tmp_path / "c")) == str(tmp_path / "c")
        assert (tmp_path / "c").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_llm_takes_text_ids_and_vllm_prompt_dicts():
    from tandem.serve import LLM

    llm = LLM("models/tiny.gin", max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64)
    ids = llm.engine.tokenizer.encode("hi")
    assert llm._prompt_ids("hi") == ids
    assert llm._prompt_ids(ids) == ids
    assert llm._prompt_ids({"prompt_token_ids": ids}) == ids
    assert llm._prompt_ids({"prompt": "hi"}) == ids
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm._prompt_ids({"text": "hi"})
    with pytest.raises(ValueError, match="non-integer"):
        llm._prompt_ids([1.5, 2])


def test_serving_defaults_fill_only_what_the_flags_left_open():
    from tandem.serve.startup import CPU_BATCH, serving_defaults

    # This suite runs on a CPU: the small batch.
    assert serving_defaults({"max_num_seqs": None, "page_size": 8}) == {
        "max_num_seqs": CPU_BATCH["max_num_seqs"],
        "max_num_batched_tokens": CPU_BATCH["max_num_batched_tokens"],
        "page_size": 8,
    }
    given = {"max_num_seqs": 3, "max_num_batched_tokens": 48}
    assert serving_defaults(given) == given
