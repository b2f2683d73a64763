"""Records: reading local JSONL / JSON / Parquet files and recognising their layout.

A record is one row as a dict. `read_records` returns `Row`s: plain dicts that also carry
`where` ("data.jsonl line 7"), so an error raised while a row is normalised or tokenised,
possibly much later inside a grain worker thread, names the file and the row.

Layouts (the column names TRL and the common Hub datasets use):

SFT         `messages` (a chat; targets are the assistant turns)
            `prompt` + `completion` (strings, or message lists: TRL's conversational form)
            `text` (the whole text is the target)
preference  `prompt` + `chosen` + `rejected` (strings, or a prompt chat with assistant turns)
            `chosen` + `rejected` only: full texts or chats whose shared prefix is the
            implicit prompt (TRL's `extract_prompt`)
prompt      `prompt` (string or chat) plus any extra columns, which pass through to the reward
            function; or `question` + `answer` (the GSM8K layout)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]
LAYOUTS = ("sft", "preference", "prompt")


class Row(dict):
    """A record that remembers where it came from (`where`), for error messages."""

    where: str = "record"


@dataclass(frozen=True)
class TextPair:
    """A plain-text example: `prompt` tokens are context, `completion` tokens are targets."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Chat:
    """A chat example: assistant turns at index >= `num_context` are targets."""

    messages: Messages
    num_context: int


SftExample = TextPair | Chat


def where(record: dict) -> str:
    return getattr(record, "where", "record")


def read_records(path: str | os.PathLike, layout: str | None = None) -> list[dict]:
    """Rows of a `.jsonl` / `.json` (JSON lines or one JSON list) or `.parquet` file.

    With `layout` ("sft", "preference" or "prompt") every row is checked up front, so a
    bad row fails at start-up instead of hours into a run.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith((".jsonl", ".json")):
        records = _read_json(path)
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
        records = [_row(r, f"{path} row {i + 1}") for i, r in enumerate(table.to_pylist())]
    else:
        raise ValueError(f"{path}: unknown data format (expected .jsonl, .json or .parquet)")
    if not records:
        raise ValueError(f"{path}: no records")
    if layout is not None:
        check_layout(records, layout)
    return records


def _read_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno}: bad JSON ({e.msg})") from e
        return [_row(r, f"{path} row {i + 1}") for i, r in enumerate(rows)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: bad JSON ({e.msg})") from e
        records.append(_row(value, f"{path} line {number}"))
    return records


def _row(value: Any, at: str) -> Row:
    if not isinstance(value, dict):
        raise ValueError(f"{at}: a record must be a JSON object, got {type(value).__name__}")
    row = Row(value)
    row.where = at
    return row


def check_layout(records: list[dict], layout: str) -> None:
    """Normalises every record for `layout`; raises the first row's ValueError."""
    check = {"sft": sft_example, "preference": preference_example, "prompt": prompt_example}
    if layout not in check:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for record in records:
        check[layout](record)


def sft_example(record: dict) -> SftExample:
    """`messages` | `prompt` + `completion` | `text`  ->  TextPair or Chat."""
    if "messages" in record:
        messages = _messages(record, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(
                f"{where(record)}: column 'messages' has no assistant turn to train on"
            )
        return Chat(messages, num_context=0)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return TextPair(prompt, completion)
        if isinstance(prompt, str):
            raise ValueError(
                f"{where(record)}: column 'prompt' is a string but 'completion' is a "
                f"{type(completion).__name__}; use strings for both, or a message list prompt"
            )
        context = _messages(record, "prompt")
        return Chat(context + _completion_turns(record, "completion"), len(context))
    if "text" in record:
        return TextPair("", _string(record, "text"))
    raise ValueError(
        f"{where(record)}: no SFT columns (need 'messages', 'prompt' + 'completion', or "
        f"'text'; found {sorted(record)})"
    )


def preference_example(record: dict) -> tuple[SftExample, SftExample]:
    """A (chosen, rejected) pair of SFT examples sharing one prompt."""
    for column in ("chosen", "rejected"):
        if column not in record:
            raise ValueError(
                f"{where(record)}: missing column '{column}' (preference data needs "
                f"'prompt' + 'chosen' + 'rejected', or 'chosen' + 'rejected'; found "
                f"{sorted(record)})"
            )
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            chosen, rejected = _string(record, "chosen"), _string(record, "rejected")
            pair = TextPair(prompt, chosen), TextPair(prompt, rejected)
        else:
            context = _messages(record, "prompt")
            pair = tuple(
                Chat(context + _completion_turns(record, c), len(context))
                for c in ("chosen", "rejected")
            )
    elif isinstance(record["chosen"], str):
        pair = _split_text_prefix(record)
    else:
        pair = _split_chat_prefix(record)
    if pair[0] == pair[1]:
        raise ValueError(f"{where(record)}: 'chosen' and 'rejected' are identical")
    return pair


def prompt_example(record: dict) -> tuple[str | Messages, dict]:
    """(prompt, extras): extras are the other columns, for the reward function."""
    if "prompt" in record:
        column = "prompt"
    elif "question" in record and "answer" in record:
        column = "question"
    else:
        raise ValueError(
            f"{where(record)}: no prompt column (need 'prompt', or 'question' + 'answer'; "
            f"found {sorted(record)})"
        )
    value = record[column]
    prompt = value if isinstance(value, str) else _messages(record, column)
    if isinstance(prompt, str) and not prompt:
        raise ValueError(f"{where(record)}: column '{column}' is empty")
    if "prompt_ids" in record:
        raise ValueError(f"{where(record)}: column 'prompt_ids' is reserved for the tokens")
    return prompt, {k: v for k, v in record.items() if k != column}


def _string(record: dict, column: str) -> str:
    value = record[column]
    if not isinstance(value, str):
        raise ValueError(
            f"{where(record)}: column '{column}' must be a string, got {type(value).__name__}"
        )
    return value


def _messages(record: dict, column: str) -> Messages:
    value = record[column]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(
            f"{where(record)}: column '{column}' must be a string or a non-empty list of "
            f"{{role, content}} messages, got {type(value).__name__}"
        )
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"{where(record)}: column '{column}' message {i} has no 'role'")
        if not isinstance(m.get("content"), str):
            raise ValueError(
                f"{where(record)}: column '{column}' message {i} needs a string 'content'"
            )
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _completion_turns(record: dict, column: str) -> Messages:
    """A completion after a chat prompt: assistant turns (a bare string is one turn)."""
    if isinstance(record[column], str):
        return [{"role": "assistant", "content": record[column]}]
    turns = _messages(record, column)
    if not any(m["role"] == "assistant" for m in turns):
        raise ValueError(f"{where(record)}: column '{column}' has no assistant turn")
    return turns


def _split_text_prefix(record: dict) -> tuple[TextPair, TextPair]:
    """Implicit prompt of two strings: their common prefix, cut before a trailing space
    so the completions keep their leading space (as TRL's `extract_prompt`)."""
    chosen, rejected = _string(record, "chosen"), _string(record, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n > 0 and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        raise ValueError(
            f"{where(record)}: 'chosen' and 'rejected' share no prefix; add a 'prompt' column"
        )
    return TextPair(chosen[:n], chosen[n:]), TextPair(chosen[:n], rejected[n:])


def _split_chat_prefix(record: dict) -> tuple[Chat, Chat]:
    """Implicit prompt of two chats: the leading messages they share."""
    chosen, rejected = _messages(record, "chosen"), _messages(record, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError(
            f"{where(record)}: 'chosen' and 'rejected' chats share no leading message; "
            f"add a 'prompt' column"
        )
    for column, chat in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in chat[n:]):
            raise ValueError(
                f"{where(record)}: column '{column}' has no assistant turn after the shared prompt"
            )
    return Chat(chosen, n), Chat(rejected, n)
