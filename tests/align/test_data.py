"""Data: record files and layouts, tokenisation masks, packing, grain pipelines and resume."""

import copy
import functools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tandem.align.data import (
    make_dataset,
    pack_examples,
    read_records,
    synthetic_arithmetic,
    synthetic_preferences,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)
from tandem.model.tokenizer import byte_tokenizer

# Byte tokenizer ids: bytes are themselves; <|bos|> 256, <|eos|> 257, <|pad|> 258.
BOS, EOS, PAD = 256, 257, 258
# ChatML-like: the end-of-turn token is the EOS and a newline follows it (as Qwen's).
CHATML = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    """The byte tokenizer with a BOS-adding post-processor, like Llama's: training adds a
    BOS exactly when the tokenizer's own encode does."""
    from tokenizers.processors import TemplateProcessing

    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)]
    )
    assert tok.encode("a")[0] == tok.bos_token_id
    return tok


def test_no_bos_when_the_tokenizer_adds_none():
    """The plain byte tokenizer's encode adds no BOS, and neither does training, so a prompt
    the server encodes is the prompt the model was trained on."""
    plain = byte_tokenizer()
    out = tokenize_sft({"prompt": "1+2=", "completion": "3"}, plain, 8)
    assert list(out["tokens"][:6]) == plain.encode("1+2=3") + [plain.eos_token_id]


def targets(tok, out, tokens="tokens", mask="loss_mask"):
    return tok.decode([t for t, m in zip(out[tokens], out[mask]) if m])


def test_read_records_jsonl_json_and_parquet(tmp_path):
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        assert read_records(tmp_path / name, layout="sft") == rows


def test_read_records_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=f"{bad} line 2: bad JSON"):
        read_records(bad)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'none.jsonl'}: no such file"):
        read_records(tmp_path / "none.jsonl")
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="list.jsonl line 2: a record must be a JSON object"):
        read_records(tmp_path / "list.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="x.csv: unknown data format"):
        read_records(tmp_path / "x.csv")


def test_layout_errors_name_file_row_and_column(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl line 2: no SFT columns .*'answer', 'prompt'"):
        read_records(path, layout="sft")
    # Without `layout` the error surfaces when the row is tokenised, still naming it.
    records = read_records(path)
    with pytest.raises(ValueError, match="d.jsonl line 2: no SFT columns"):
        tokenize_sft(records[1], tok, 16)
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": 3}\n')
    with pytest.raises(ValueError, match="line 1: column 'rejected' must be a string, got int"):
        read_records(path, layout="preference")
    path.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match="line 1: missing column 'rejected'"):
        read_records(path, layout="preference")
    path.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match="line 1: column 'messages' message 0 needs a string"):
        read_records(path, layout="sft")
    path.write_text('{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(ValueError, match="line 1: column 'prompt' is a string but 'completion'"):
        read_records(path, layout="sft")
    path.write_text('{"answer": "4"}\n')
    with pytest.raises(ValueError, match="line 1: no prompt column"):
        read_records(path, layout="prompt")


def test_sft_messages_targets_only_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    out = tokenize_sft({"messages": messages}, tok, 96)
    assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == np.float32
    # Each assistant body plus the template's end-of-turn (= EOS, so none is appended).
    assert targets(tok, out) == "yo<|eos|>4<|eos|>"
    n = int((out["tokens"] != PAD).sum())
    full = tok.apply_chat_template(messages, tokenize=False)
    # Turn-by-turn encoding gives exactly the full rendering's tokens here.
    assert list(out["tokens"][:n]) == tok.encode(full, add_special_tokens=False)
    assert out["tokens"][0] == BOS and out["loss_mask"][0] == 0


def test_sft_chat_appends_eos_only_when_the_template_did_not(tok):
    chatml = copy.deepcopy(tok)
    chatml.chat_template = CHATML
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    # The newline after the end-of-turn token is part of the turn, so it is a target.
    assert targets(tok, tokenize_sft({"messages": messages}, chatml, 64)) == "yo<|eos|>\n"
    other = copy.deepcopy(tok)
    other.chat_template = CHATML.replace("<|eos|>", "<end>")
    trailing_user = messages + [{"role": "user", "content": "bye"}]
    out = tokenize_sft({"messages": trailing_user}, other, 64)
    # EOS goes right after the last assistant turn, not after the trailing user turn.
    assert targets(tok, out) == "yo<end>\n<|eos|>"
    text = tok.decode(out["tokens"][out["tokens"] != PAD])
    assert text.endswith("<|eos|><|bos|>user\nbye<end>\n")


def test_sft_prompt_completion_and_text_layouts(tok):
    out = tokenize_sft({"prompt": "1+2=", "completion": "3"}, tok, 10)
    # [BOS 1 + 2 =] context, [3 EOS] targets, then padding.
    assert list(out["tokens"]) == [BOS, 49, 43, 50, 61, 51, EOS, PAD, PAD, PAD]
    assert list(out["loss_mask"]) == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    chat = {"prompt": [{"role": "user", "content": "1+2="}], "completion": "3"}
    assert targets(tok, tokenize_sft(chat, tok, 64)) == "3<|eos|>"
    turns = {**chat, "completion": [{"role": "assistant", "content": "3"}]}
    assert targets(tok, tokenize_sft(turns, tok, 64)) == "3<|eos|>"
    text = tokenize_sft({"text": "abc"}, tok, 6)
    assert list(text["loss_mask"]) == [0, 1, 1, 1, 1, 0]  # BOS predicts a; all text targets
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    text = tokenize_sft({"text": "abc"}, no_bos, 6)
    assert list(text["tokens"][:4]) == [97, 98, 99, EOS]
    assert list(text["loss_mask"][:4]) == [0, 1, 1, 1]  # nothing predicts the first token


def test_sft_truncates_the_end(tok):
    out = tokenize_sft({"prompt": "ab", "completion": "cdef"}, tok, 5)
    assert list(out["tokens"]) == [BOS, 97, 98, 99, 100]
    assert list(out["loss_mask"]) == [0, 0, 0, 1, 1]
    long_prompt = tokenize_sft({"prompt": "x" * 10, "completion": "y"}, tok, 5)
    assert long_prompt["loss_mask"].sum() == 0  # nothing left to learn; packing drops it


def test_preference_explicit_and_implicit_prompts(tok):
    out = tokenize_preference({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, tok, 12)
    assert targets(tok, out, "chosen_tokens", "chosen_mask") == " yes<|eos|>"
    assert targets(tok, out, "rejected_tokens", "rejected_mask") == " no<|eos|>"
    assert list(out["chosen_tokens"][:3]) == list(out["rejected_tokens"][:3]) == [BOS, 81, 58]
    # Implicit prompt: the common prefix, with the space left on the completions (TRL).
    out = tokenize_preference({"chosen": "The sky is blue", "rejected": "The sky is red"}, tok, 24)
    assert targets(tok, out, "chosen_tokens", "chosen_mask") == " blue<|eos|>"
    assert targets(tok, out, "rejected_tokens", "rejected_mask") == " red<|eos|>"
    user = {"role": "user", "content": "color?"}
    chats = {
        "chosen": [user, {"role": "assistant", "content": "blue"}],
        "rejected": [user, {"role": "assistant", "content": "red"}],
    }
    out = tokenize_preference(chats, tok, 48)
    assert targets(tok, out, "chosen_tokens", "chosen_mask") == "blue<|eos|>"
    assert targets(tok, out, "rejected_tokens", "rejected_mask") == "red<|eos|>"
    conversational = {"prompt": [user], "chosen": chats["chosen"][1:], "rejected": "red"}
    assert tokenize_preference(conversational, tok, 48).keys() == out.keys()
    with pytest.raises(ValueError, match="'chosen' and 'rejected' are identical"):
        tokenize_preference({"prompt": "a", "chosen": "b", "rejected": "b"}, tok, 8)


def test_prompt_tokens_keep_the_end_and_pass_extras_through(tok):
    out = tokenize_prompt({"question": "what is 2+2?", "answer": "4"}, tok, 6)
    assert out == {"prompt_ids": [BOS, *b" 2+2?"], "answer": "4"}  # BOS kept, tail kept
    chat = {"prompt": [{"role": "user", "content": "hi"}], "solution": "x", "id": 3}
    out = tokenize_prompt(chat, tok, 64)
    assert tok.decode(out["prompt_ids"]).endswith("<|bos|>assistant\n")
    assert out["solution"] == "x" and out["id"] == 3 and "prompt" not in out
    with pytest.raises(ValueError, match="column 'prompt' is empty"):
        tokenize_prompt({"prompt": ""}, tok, 8)


def test_pack_examples_first_fit_segments_and_positions():
    def example(n):  # n tokens: one prompt token, then targets
        return {"tokens": np.arange(1, n + 1), "loss_mask": np.r_[0.0, np.ones(n - 1)]}

    # Lengths 5, 3, 4, 2 into rows of 8: first fit puts 5+3 in row 0 and 4+2 in row 1.
    out = pack_examples([example(5), example(3), example(4), example(2)], 8)
    assert out["tokens"].shape == (2, 8)
    assert out["segment_ids"].tolist() == [[1] * 5 + [2] * 3, [1] * 4 + [2] * 2 + [0] * 2]
    assert out["positions"].tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3, 0, 1, 0, 0],
    ]
    assert out["tokens"][0].tolist() == [1, 2, 3, 4, 5, 1, 2, 3]
    # No target at any segment start: the loss never crosses from one example to the next.
    starts = out["positions"] == 0
    assert (out["loss_mask"][starts] == 0).all()
    assert out["loss_mask"].sum() == 4 + 2 + 3 + 1
    # Trailing padding is trimmed, too-long examples are cut, target-free ones dropped.
    padded = {"tokens": np.r_[7, 8, 9, 0, 0], "loss_mask": np.r_[0.0, 1, 1, 0, 0]}
    no_target = {"tokens": np.r_[1, 2], "loss_mask": np.zeros(2)}
    out = pack_examples([padded, example(12), no_target], 8)
    assert out["segment_ids"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]
    with pytest.raises(ValueError, match=r"example 0: loss_mask\[0\] is 1.0"):
        pack_examples([{"tokens": np.r_[1, 2], "loss_mask": np.r_[1.0, 1]}], 8)


def _arith(tok, n=7, **kwargs):
    records = synthetic_arithmetic(n, seed=0)
    fn = functools.partial(tokenize_sft, tokenizer=tok, max_length=12)
    return records, make_dataset(records, fn, batch_size=2, seed=1, **kwargs)


def test_dataset_batches_reshuffle_every_epoch(tok):
    records = [{"text": chr(ord("a") + i)} for i in range(6)]
    fn = functools.partial(tokenize_sft, tokenizer=tok, max_length=4)
    ds = make_dataset(records, fn, batch_size=3, seed=0, num_epochs=3)
    batches = list(iter(ds))
    assert len(batches) == 6 and batches[0]["tokens"].shape == (3, 4)
    letters = [chr(t) for b in batches for t in b["tokens"][:, 1]]
    epochs = [letters[i : i + 6] for i in range(0, 18, 6)]
    assert all(sorted(e) == list("abcdef") for e in epochs)  # each epoch is a permutation
    assert len({"".join(e) for e in epochs}) == 3  # and a different one each time
    again = [chr(t) for b in iter(ds) for t in b["tokens"][:, 1]]
    assert again == letters  # the seed fixes the order
    ordered = make_dataset(records, fn, batch_size=3, seed=0, shuffle=False, num_epochs=1)
    assert [chr(t) for b in iter(ordered) for t in b["tokens"][:, 1]] == list("abcdef")


@pytest.mark.parametrize("pack_length", [None, 24])
def test_iterator_state_resumes_across_an_epoch_boundary(tok, pack_length):
    _, ds = _arith(tok, pack_length=pack_length)
    it = iter(ds)
    for _ in range(3):  # 7 records, batch 2: the next batches cross into epoch 2
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpointer stores
    expected = [next(it) for _ in range(6)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    if pack_length:
        assert expected[0]["segment_ids"].shape == (2, pack_length)


def test_prompt_batches_are_lists_and_resume(tok):
    records = synthetic_arithmetic(5, seed=3)
    fn = functools.partial(tokenize_prompt, tokenizer=tok, max_prompt_length=16)
    ds = make_dataset(records, fn, batch_size=2, seed=0)
    it = iter(ds)
    first = next(it)
    assert isinstance(first, list) and len(first) == 2
    assert set(first[0]) == {"prompt_ids", "answer", "completion"}
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = iter(ds)
    resumed.set_state(state)
    assert [next(resumed) for _ in range(4)] == expected


def test_make_dataset_rejects_bad_arguments(tok):
    fn = functools.partial(tokenize_sft, tokenizer=tok, max_length=8)
    with pytest.raises(ValueError, match="records is empty"):
        make_dataset([], fn, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        make_dataset([{"text": "a"}], fn, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="less than one batch"):
        make_dataset([{"text": "a"}], fn, batch_size=2, seed=0, num_epochs=1)


def test_synthetic_sets_are_deterministic_and_follow_their_rule():
    records = synthetic_arithmetic(50, seed=4, ops="+-*")
    assert records == synthetic_arithmetic(50, seed=4, ops="+-*")
    assert records != synthetic_arithmetic(50, seed=5, ops="+-*")
    for r in records:
        assert r["prompt"].endswith("=") and r["answer"] == r["completion"]
        assert str(eval(r["prompt"][:-1])) == r["answer"] and int(r["answer"]) >= 0
    with pytest.raises(ValueError, match="ops must be"):
        synthetic_arithmetic(3, seed=0, ops="/")
    prefs = synthetic_preferences(40, seed=0)
    assert prefs == synthetic_preferences(40, seed=0)
    for r in prefs:
        letter = r["prompt"][0]
        assert r["chosen"] == letter * 3 and set(r["rejected"]) != {letter}
    assert len({r["rejected"][0] for r in prefs}) > 3
