"""Incremental detokenization: after every step the text equals the full decode, stop
handling matches the old full-decode StopChecker, and the ids decoded per step do not grow
with the generation.

The tokenizers are built here from a few sentences (no downloads): byte-level BPE (Llama 3,
Qwen), SentencePiece BPE with byte fallback (Llama 2, Mistral's tokenizer.json), Metaspace
BPE, and tandem's byte tokenizer. Random id sequences hit what text rarely does: partial
and invalid UTF-8, byte-fallback runs that turn invalid, special tokens anywhere.
"""

import functools
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.detokenizer import IncrementalDetokenizer, decodes_in_windows
from tandem.serve.sampling_params import SamplingParams, find_stop_span
from tandem.serve.stops import StopChecker

CORPUS = [
    "héllo 世界 🙂 wörld",
    "the cat sat on the mat.",
    "Ünïcödé ünd 日本語のテキスト",
    "stop here, then go on!",
    "naïve café — résumé 🙂🙃",
] * 3


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=340,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_end|>"],
    )
    fast.add_tokens(["<tool>"])  # an added token that is not special: never skipped
    return fast


def _sentencepiece_byte_fallback() -> PreTrainedTokenizerFast:
    """Llama 2's layout: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then merges;
    the decoder turns ▁ into spaces, joins byte runs into UTF-8 and strips one leading
    space."""
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    trained = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = base.normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _metaspace_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _word_level(clean_up: bool) -> PreTrainedTokenizerFast:
    """A WordPiece decoder (BERT's), optionally with Python's clean-up across tokens."""
    words = ["[UNK]", "a", "b", "c", ".", "'", "s", "?", "n't", "it"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", clean_up_tokenization_spaces=clean_up
    )


BUILDERS = {
    "byte_level_bpe": _byte_level_bpe,
    "sentencepiece": _sentencepiece_byte_fallback,
    "metaspace": _metaspace_bpe,
    "tandem_bytes": byte_tokenizer,
}


@functools.cache
def _tokenizer(name: str):
    return BUILDERS[name]()


def _random_ids(tok, rng: np.random.RandomState, n: int) -> list[int]:
    """Uniform ids, a slice of encoded text, or text with random ids mixed in."""
    text = tok.encode(" ".join(CORPUS), add_special_tokens=False) * 3
    mode = rng.randint(3)
    if mode == 0:
        return rng.randint(0, len(tok), n).tolist()
    if mode == 1:
        start = rng.randint(len(text) - n)
        return text[start : start + n]
    return [int(rng.randint(len(tok)) if rng.rand() < 0.3 else rng.choice(text)) for _ in range(n)]


class CountingTokenizer:
    """Wraps a tokenizer and counts how many ids `decode` is given in all."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.num_decoded_ids = 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids, **kwargs):
        self.num_decoded_ids += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


class FullDecodeStopChecker:
    """The StopChecker before incremental detokenization: decodes every id at every step."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer, self.params = tokenizer, params
        self.text, self.finished, self.num_chars_emitted = "", False, 0

    def append(self, ids: list[int], finished: bool) -> bool:
        previous = len(self.text)
        self.text = self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)
        self.finished = finished
        if not self.params.stop:
            return False
        start = max(0, previous - self.params.max_stop_len)
        span = find_stop_span(self.text, self.params.stop, start)
        if span is None:
            return False
        begin, end = span
        self.text = self.text[: end if self.params.include_stop_str_in_output else begin]
        self.finished = True
        return True

    def take(self) -> tuple[str, str]:
        text = self.text
        if not self.finished:
            n = len(text) - (self.params.max_stop_len - 1 if self.params.stop else 0)
            text = text[: max(n, 0)]
            text = text[:-1] if text.endswith("\ufffd") else text
        new = text[self.num_chars_emitted :]
        self.num_chars_emitted = max(self.num_chars_emitted, len(text))
        return text, new


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_text_equals_full_decode_after_every_step(name, skip_special_tokens):
    tok = _tokenizer(name)
    rng = np.random.RandomState(0)
    for _ in range(300):
        ids = _random_ids(tok, rng, rng.randint(1, 80))
        detokenizer = IncrementalDetokenizer(tok, skip_special_tokens)
        assert detokenizer.is_windowed
        for k in range(1, len(ids) + 1):
            want = tok.decode(ids[:k], skip_special_tokens=skip_special_tokens)
            assert detokenizer.decode(ids[:k]) == want, (ids[:k], k)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_stop_checker_matches_full_decode_reference(name):
    tok = _tokenizer(name)
    rng = np.random.RandomState(1)
    num_stopped = 0
    for _ in range(80):
        ids = _random_ids(tok, rng, rng.randint(1, 50))
        full = tok.decode(ids, skip_special_tokens=True)
        # Stop strings cut from the text itself, so that most of them match somewhere.
        starts = rng.randint(0, max(len(full), 1), rng.randint(1, 3))
        stop = [full[s : s + rng.randint(1, 5)] for s in starts if full[s : s + 1]] or ["zz"]
        params = SamplingParams(
            stop=stop,
            include_stop_str_in_output=bool(rng.randint(2)),
            skip_special_tokens=bool(rng.randint(2)),
        )
        new, old = StopChecker(tok, params), FullDecodeStopChecker(tok, params)
        for k in range(1, len(ids) + 1):
            finished = k == len(ids) and bool(rng.randint(2))  # EOS, else a length finish
            stopped = new.append(ids[:k], finished)
            assert stopped == old.append(ids[:k], finished)
            assert new.text == old.text
            assert new.take() == old.take()
            if stopped or finished:
                break
        if not new.finished:
            new.flush()
            old.finished = True
            assert new.take() == old.take()
        num_stopped += stopped
    assert num_stopped > 20  # the stop strings were exercised, not just the text


def test_streams_whole_characters_and_holds_back_a_stop_prefix():
    # Bytes: C3 A9 ("é") | 21 ("!") | F0 9F 99 82 ("🙂") | 78 ("x"). max_stop_len 2 holds
    # back 1 character, and a trailing partial character is never streamed.
    tok = byte_tokenizer()
    ids = tok.encode("é!🙂x", add_special_tokens=False)
    checker = StopChecker(tok, SamplingParams(stop=["🙂x"]))
    deltas = []
    for k in range(1, len(ids) + 1):
        stopped = checker.append(ids[:k], finished=False)
        deltas.append(checker.take()[1])
        if stopped:
            break
    # k=1 "\ufffd", k=2 "é" (held), k=3 "é!" -> "é", k=4 "é!\ufffd" -> "!", k=5..7 hold
    # the emoji and the 1-character stop prefix, k=8 finds "🙂x" and drops it.
    assert deltas == ["", "", "é", "!", "", "", "", ""]
    assert stopped and checker.text == "é!"


@pytest.mark.parametrize("random_fraction", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_decoded_ids_grow_linearly_with_the_generation(name, random_fraction):
    tok = _tokenizer(name)
    rng = np.random.RandomState(2)
    text = tok.encode(" ".join(CORPUS), add_special_tokens=False)
    n = 2000
    # Text with random ids mixed in: partial characters, stray bytes and special tokens.
    ids = [
        int(rng.randint(len(tok))) if rng.rand() < random_fraction else text[i % len(text)]
        for i in range(n)
    ]
    counting = CountingTokenizer(tok)
    detokenizer = IncrementalDetokenizer(counting, skip_special_tokens=True)
    for k in range(1, n + 1):
        detokenizer.decode(ids[:k])
    assert detokenizer.text == tok.decode(ids, skip_special_tokens=True)
    # Re-decoding everything would be n (n + 1) / 2 = 2,001,000 ids. A step decodes the
    # window (the anchor, the last read ids, the new ones) and, when it reads, the newly
    # read ids once more: under 11 ids a step on average here.
    assert counting.num_decoded_ids < 16 * n


@pytest.mark.parametrize("byte", [0x80, 0xE4])
def test_invalid_bytes_do_not_grow_the_window(byte):
    # Text that keeps ending in U+FFFD is read once 8 ids pile up, all but the last 4.
    tok = byte_tokenizer()
    ids = [byte] * 2000  # the byte tokenizer's id of a byte is the byte
    counting = CountingTokenizer(tok)
    detokenizer = IncrementalDetokenizer(counting, skip_special_tokens=True)
    for k in range(1, len(ids) + 1):
        detokenizer.decode(ids[:k])
    assert detokenizer.text == "\ufffd" * 2000
    assert counting.num_decoded_ids < 20 * len(ids)


class SlowTokenizer:
    """A tokenizer without the fast path's needs (not Rust-backed)."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids, **kwargs):
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize(
    "tok, is_windowed",
    [
        (SlowTokenizer(byte_tokenizer()), False),
        (_word_level(clean_up=True), False),  # Python's clean-up joins across tokens
        (_word_level(clean_up=False), True),  # the WordPiece decoder cleans up per token
    ],
    ids=["slow", "clean_up", "wordpiece"],
)
def test_falls_back_to_the_full_decode_where_windows_differ(tok, is_windowed):
    assert decodes_in_windows(tok) == is_windowed
    rng = np.random.RandomState(3)
    for _ in range(50):
        ids = rng.randint(0, 10, 30).tolist()  # the word-level vocabulary; bytes 0..9 else
        detokenizer = IncrementalDetokenizer(tok, skip_special_tokens=True)
        for k in range(1, len(ids) + 1):
            assert detokenizer.decode(ids[:k]) == tok.decode(ids[:k], skip_special_tokens=True)


def test_ids_that_do_not_extend_the_last_call_start_over():
    tok = _tokenizer("byte_level_bpe")
    detokenizer = IncrementalDetokenizer(tok, skip_special_tokens=True)
    first = tok.encode("the cat sat on the mat.", add_special_tokens=False)
    second = tok.encode("héllo", add_special_tokens=False)
    detokenizer.decode(first)
    assert detokenizer.decode(second) == "héllo"
