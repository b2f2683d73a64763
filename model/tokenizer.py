"""Tokenizers: Hugging Face's from a checkpoint directory, or a byte-level one for tiny models.

`trust_remote_code` stays off and nothing is fetched from a hub: a directory without
tokenizer files is an error that names it.
"""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tandem.model.safetensors_io import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# A minimal chat template so the byte tokenizer can serve /v1/chat/completions too.
BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: no such directory")
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{model_dir}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})"
        )
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (ids 0..255) then <|bos|> = 256, <|eos|> = 257, <|pad|> = 258 (the
    order transformers adds special tokens in): any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_to_char = [chr(c) for c in _bytes_to_unicode()]
    vocab = {ch: i for i, ch in enumerate(byte_to_char)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    fast.add_special_tokens({"additional_special_tokens": []})
    fast.chat_template = BYTE_CHAT_TEMPLATE
    return fast


def _bytes_to_unicode() -> list[int]:
    """GPT-2's byte -> printable code point map (what ByteLevel pre-tokenization emits)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = iter(range(256, 512))
    return [b if b in printable else next(extra) for b in range(256)]
