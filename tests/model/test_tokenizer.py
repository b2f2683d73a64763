"""Tokenizers load from a checkpoint directory through AutoTokenizer, chat template included."""

import pytest

from tandem.model.safetensors_io import CheckpointError
from tandem.model.tokenizer import byte_tokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Hello, wörld! 1+1=2\n\t✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:5] == [72, 101, 108, 108, 111]  # bytes of "Hello"
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 259 and {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {
        256,
        257,
        258,
    }


def test_saved_tokenizer_loads_with_its_chat_template(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    messages = [{"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|>user\n2+2?<|eos|><|bos|>assistant\n"
    assert tok.encode("ok", add_special_tokens=False) == [111, 107]


def test_missing_tokenizer_names_the_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no tokenizer files"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such directory"):
        load_tokenizer(str(tmp_path / "absent"))
