"""vLLM's /tokenize, /detokenize and /version over real HTTP.

The app and engine are test_openai_server.py's (a tiny random model, the byte tokenizer:
one token per byte, <|bos|> = 256, <|eos|> = 257, <|pad|> = 258, so 259 token ids). The
invariant that matters to clients: /tokenize counts a prompt as the completion endpoints
do, so its `count` equals their `usage.prompt_tokens`.
"""

from __future__ import annotations

from importlib import metadata
from unittest.mock import ANY

import httpx
import pytest
import test_openai_server as served

from tandem.model.tokenizer import byte_tokenizer

# test_openai_server.py's fixtures: its engine and app, served on a free port.
raw_engine, engine, url, client = served.raw_engine, served.engine, served.url, served.client
MODEL = served.MODEL
TOKENIZER = byte_tokenizer()
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
]


def post(url: str, path: str, body) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


def chat_text(messages: list[dict], add_generation_prompt: bool) -> str:
    return TOKENIZER.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def test_tokenize_a_prompt(url):
    r = post(url, "/tokenize", {"model": MODEL, "prompt": "Hello, tandem!"})
    assert r.status_code == 200, r.text
    # 14 bytes, 14 tokens; the byte tokenizer adds no special tokens.
    assert r.json() == {
        "count": 14,
        "max_model_len": 128,
        "tokens": TOKENIZER.encode("Hello, tandem!"),
        "token_strs": None,
    }
    r = post(url, "/tokenize", {"prompt": "a b", "return_token_strs": True}).json()
    # The vocabulary's entries: byte-level BPE spells the space "Ġ".
    assert r["tokens"] == [97, 32, 98] and r["token_strs"] == ["a", "Ġ", "b"]


def test_tokenize_counts_what_completions_count(url, client):
    prompt = "Count me the way the server does."
    count = post(url, "/tokenize", {"prompt": prompt}).json()["count"]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0.0)
    assert count == r.usage.prompt_tokens == len(prompt)


def test_tokenize_chat_renders_the_template(url, client):
    r = post(url, "/tokenize", {"messages": MESSAGES}).json()
    assert r["tokens"] == TOKENIZER.encode(chat_text(MESSAGES, True), add_special_tokens=False)
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0.0
    )
    assert r["count"] == reply.usage.prompt_tokens
    # Without the generation prompt: "<|bos|>assistant\n" is gone, 1 + 10 tokens.
    bare = post(url, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["count"] == r["count"] - 11
    assert r["tokens"][: bare["count"]] == bare["tokens"]


def test_detokenize_round_trips(url):
    text = "Grüße, tandem"  # multi-byte UTF-8: several tokens make one character
    tokens = post(url, "/tokenize", {"prompt": text}).json()["tokens"]
    assert len(tokens) == len(text.encode())
    r = post(url, "/detokenize", {"model": MODEL, "tokens": tokens})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    # Special tokens are kept, as vLLM does.
    assert post(url, "/detokenize", {"tokens": [104, 257]}).json() == {"prompt": "h<|eos|>"}
    assert post(url, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


def test_version(url):
    r = httpx.get(f"{url}/version")
    assert r.status_code == 200 and r.json() == {"version": metadata.version("tandem")}


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {"prompt": ""}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": ["a"]}, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
        ("/tokenize", {"prompt": "a", "suffix": "b"}, "suffix"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "a"}]}, "messages.0.role"),
        (
            "/tokenize",
            {"messages": MESSAGES, "continue_final_message": True},
            "continue_final_message",
        ),
        ("/tokenize", ["a"], ANY),
        ("/detokenize", {"tokens": [104, 259]}, "tokens"),  # 259: one past <|pad|>
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
        ("/detokenize", {"tokens": [1], "model": "other"}, "model"),
    ],
    ids=[
        "empty prompt",
        "no prompt",
        "prompt not a string",
        "unknown model",
        "unknown field",
        "no messages",
        "bad role",
        "unsupported chat field",
        "not an object",
        "token past the vocabulary",
        "negative token",
        "token not an int",
        "detokenize unknown model",
    ],
)
def test_bad_requests_are_400s_naming_the_field(url, client, path, body, param):
    r = post(url, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not ANY:  # a body of the wrong type has no field to name
        assert error["param"] == param, error
        assert param.split(".")[0] in error["message"]
    # The server keeps serving.
    assert post(url, "/tokenize", {"prompt": "ok"}).json()["count"] == 2
    reply = client.completions.create(model=MODEL, prompt="ok", max_tokens=1, temperature=0.0)
    assert reply.usage.prompt_tokens == 2
