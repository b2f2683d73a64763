"""Structured output against real tokenizers and the real grammar library: random walks
over the allowed tokens must always end in text that the spec accepts."""

from __future__ import annotations

import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.sampling_params import StructuredOutput
from tandem.serve.structured_output import (
    GrammarCompiler,
    allocate_bitmask,
    apply_bitmask,
    apply_bitmask_numpy,
)

PAD = 37  # model vocab = tokenizer length + PAD: ids the tokenizer does not have.
HERE = os.path.dirname(__file__)
SOURCES = sorted(glob.glob(os.path.join(HERE, "..", "..", "serve", "*.py")))[:8]


def small_bpe(eos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2/Llama-3 style) of 600 ids trained on this repo's sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(SOURCES, trainer)
    extra = {"eos_token": "<|endoftext|>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", **extra)


def byte_fallback_bpe() -> PreTrainedTokenizerFast:
    """A Llama-2-style sentencepiece BPE: "▁" for spaces, <0x00>..<0xFF> byte tokens for
    what the 300 trained pieces do not cover (byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    base.train(SOURCES, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    state = json.loads(base.to_str())["model"]
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab += [t for t in sorted(state["vocab"], key=state["vocab"].get) if t not in vocab]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    vocab_ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.BPE(vocab_ids, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
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


TOKENIZERS = {
    "byte": byte_tokenizer,
    "bpe": lambda: small_bpe(),
    "byte_fallback": byte_fallback_bpe,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def setup(request):
    tokenizer = TOKENIZERS[request.param]()
    compiler = GrammarCompiler(tokenizer, len(tokenizer) + PAD, max_threads=2)
    return tokenizer, compiler


def allowed_ids(bitmask: np.ndarray, row: int, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(bitmask[row].view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def closing_ids(tokenizer) -> set[int]:
    """Tokens made only of characters that close JSON values: the walk prefers them once it
    has run long, so that unbounded strings and arrays end."""
    return {
        i for i in range(len(tokenizer)) if (s := tokenizer.decode([i])) and set(s) <= set('"]}')
    }


def generate(tokenizer, compiler, spec, seed, *, soft_cap=40, max_steps=400) -> str:
    """Samples uniformly among the allowed ids (EOS once allowed, from step 8 or by a coin
    flip; closing tokens after `soft_cap` steps) until EOS; returns the decoded text.
    Checks on the way that padding and special ids are never allowed and that a refused
    token is refused."""
    rng = np.random.default_rng(seed)
    matcher = compiler.matcher(spec)
    eos, vocab_size = compiler.eos_token_id, compiler.vocab_size
    special = set(tokenizer.all_special_ids) - {eos}
    closers = closing_ids(tokenizer)
    bitmask = allocate_bitmask(1, vocab_size)
    tokens = []
    for step in range(max_steps):
        matcher.fill_bitmask(bitmask, 0)
        ids = allowed_ids(bitmask, 0, vocab_size)
        assert ids.size > 0, f"no token allowed after {tokenizer.decode(tokens)!r}"
        assert ids.max() < len(tokenizer) and not special & set(ids.tolist())
        if eos in ids and (step >= 8 or rng.random() < 0.5 or ids.size == 1):
            token = eos
        elif step >= soft_cap and (close := sorted(closers & set(ids.tolist()))):
            token = int(rng.choice(close))
        else:
            token = int(rng.choice(ids))
        if step % 7 == 0:
            refused = int(rng.integers(vocab_size))
            if refused not in ids:
                assert not matcher.accept_token(refused)
        assert matcher.accept_token(token)
        if token == eos:
            assert matcher.is_terminated
            return tokenizer.decode(tokens)
        tokens.append(token)
    raise AssertionError(f"no EOS after {max_steps} steps: {tokenizer.decode(tokens)!r}")


def obj(props, required=(), **kw):
    return {"type": "object", "properties": props, "required": list(required), **kw}


SCHEMAS = [
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "boolean"},
    {"enum": ["red", "green", "blue", 3, None]},
    {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    {"type": "string", "minLength": 2, "maxLength": 5},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    obj({"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}}, ["name"]),
    obj({"a": {"type": "integer"}, "b": {"type": "boolean"}}, additionalProperties=False),
    obj(
        {
            "user": obj(
                {"id": {"type": "integer", "minimum": 1}, "tags": {"type": "array"}}, ["id"]
            ),
            "ok": {"type": "boolean"},
        },
        ["user", "ok"],
    ),
    obj(
        {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": obj(
                    {
                        "sku": {"type": "string", "pattern": "^[a-z]{3}[0-9]$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    ["sku", "qty"],
                ),
            }
        },
        ["items"],
    ),
    obj(
        {
            "level": {"enum": ["debug", "info", "error"]},
            "latency": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
            "note": {"type": ["string", "null"], "maxLength": 6},
        },
        ["level", "latency"],
    ),
    obj(
        {
            "kind": {"const": "point"},
            "xy": {"type": "array", "prefixItems": [{"type": "integer"}] * 2},
        },
        ["kind"],
    ),
    {"anyOf": [{"type": "integer"}, obj({"s": {"type": "string", "maxLength": 4}}, ["s"])]},
    {"oneOf": [{"type": "null"}, {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}]},
    {
        "$defs": {"leaf": obj({"v": {"type": "integer", "minimum": 0, "maximum": 99}}, ["v"])},
        "type": "object",
        "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
        "required": ["left", "right"],
    },
    obj(
        {
            "matrix": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
                "maxItems": 2,
            }
        },
        ["matrix"],
    ),
    obj(
        {
            "id": {"type": "string", "format": "uuid"},
            "date": {"type": "string", "format": "date"},
        },
        ["id", "date"],
    ),
    obj(
        {
            "n": {"type": "integer", "minimum": 10, "maximum": 12},
            "opt": {"type": "string", "maxLength": 3},
        },
        ["n"],
    ),
]


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_walks_validate(setup, index):
    tokenizer, compiler = setup
    schema = SCHEMAS[index]
    spec = StructuredOutput(json=json.dumps(schema))
    for seed in range(3):
        text = generate(tokenizer, compiler, spec, seed)
        jsonschema.validate(json.loads(text), schema)


REGEXES = [
    r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    r"[a-z]{3,6}@example\.(com|org)",
    r"(yes|no|maybe)!?",
    r"-?\d+(\.\d{1,2})?",
]


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_walks_fullmatch(setup, regex):
    tokenizer, compiler = setup
    for seed in range(4):
        text = generate(tokenizer, compiler, StructuredOutput(regex=regex), seed)
        assert re.fullmatch(regex, text), text


def test_choice_and_json_object(setup):
    tokenizer, compiler = setup
    choice = ("positive", "negative", 'say "hi"', "naïve", "pos")
    for seed in range(6):
        text = generate(tokenizer, compiler, StructuredOutput(choice=choice), seed)
        assert text in choice
        text = generate(tokenizer, compiler, StructuredOutput(json_object=True), seed)
        assert isinstance(json.loads(text), dict)


LARK = r"""
// a list of numbers and short lowercase words
start: "[" [item ("," item)*] "]"
?item: NUMBER | WORD
NUMBER: /-?[0-9]+/
WORD: "a".."z" ~ 1..3
"""
LARK_TEXT = r"\[((-?[0-9]+|[a-z]{1,3})(,(-?[0-9]+|[a-z]{1,3}))*)?\]"
# llguidance's native Lark: common imports, case-insensitive literals and regex flags.
LARK_NATIVE = r"""
%import common.SIGNED_INT
start: "v=" SIGNED_INT " " answer
answer: "yes"i | /no/i
"""
LARK_NATIVE_TEXT = r"v=[+-]?[0-9]+ ([yY][eE][sS]|[nN][oO])"


def test_lark_and_ebnf_grammars(setup):
    tokenizer, compiler = setup
    ebnf = 'root ::= "(" inner ")"\ninner ::= [0-9]+ | "x" inner'
    for seed in range(6):
        text = generate(tokenizer, compiler, StructuredOutput(grammar=LARK), seed)
        assert re.fullmatch(LARK_TEXT, text), text
        text = generate(tokenizer, compiler, StructuredOutput(grammar=LARK_NATIVE), seed)
        assert re.fullmatch(LARK_NATIVE_TEXT, text), text
        text = generate(tokenizer, compiler, StructuredOutput(grammar=ebnf), seed)
        assert re.fullmatch(r"\(x*[0-9]+\)", text), text


def test_special_tokens_named_by_lark_stay_refused(setup):
    # Lark may name a special token; the mask still allows only text and EOS.
    tokenizer, compiler = setup
    special = sorted(set(tokenizer.all_special_ids) - {compiler.eos_token_id})
    grammar = f'start: "a" | <[{special[0]}]>'
    matcher = compiler.matcher(StructuredOutput(grammar=grammar))
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    assert special[0] not in allowed_ids(bitmask, 0, compiler.vocab_size)
    assert not matcher.accept_token(special[0])
    assert matcher.accept_token(tokenizer.convert_tokens_to_ids("a"))


@pytest.mark.parametrize(
    "spec, message",
    [
        (StructuredOutput(json='{"type": "object", '), "not valid JSON"),
        (StructuredOutput(json="[1, 2]"), "must be an object"),
        (StructuredOutput(json='{"type": "objekt"}'), "objekt"),
        (StructuredOutput(json='{"type": "integer", "minimum": 5, "maximum": 1}'), "minimum"),
        (StructuredOutput(json='{"$ref": "#/$defs/missing"}'), "defs"),
        (
            StructuredOutput(json='{"type": "object", "properties": {"a": {"not": {}}}}'),
            'Unimplemented keys: ["not"]',
        ),
        (StructuredOutput(json='{"type": "array", "uniqueItems": true}'), "uniqueItems"),
        (StructuredOutput(json='{"type": "string", "format": "color"}'), "format: color"),
        (StructuredOutput(regex="a(b"), "unclosed group"),
        (StructuredOutput(grammar="start: missing_rule"), "missing_rule"),
        (StructuredOutput(grammar="%import common.FOO\nstart: FOO"), "common.FOO"),
        (StructuredOutput(grammar='rule: "a"'), "no start rule"),
        (StructuredOutput(grammar="root ::= [a-"), "GBNF grammar"),
    ],
)
def test_compile_errors_name_the_problem(setup, spec, message):
    _, compiler = setup
    with pytest.raises(ValueError, match=re.escape(message)):
        compiler.compile(spec)


def test_empty_choice_is_refused():
    with pytest.raises(ValueError, match="choice"):
        StructuredOutput(choice=())
    with pytest.raises(ValueError, match="choice"):
        StructuredOutput(choice=("a", ""))


def test_unlisted_properties_are_not_generated(setup):
    # As vLLM: objects that list properties are closed unless the schema says otherwise;
    # a property named like a keyword ("not", "properties") is a name, not a keyword.
    tokenizer, compiler = setup
    inner = obj({"x": {"type": "integer"}}, ["x"])
    schema = obj({"not": {"type": "integer"}, "properties": inner}, ["not", "properties"])
    for seed in range(4):
        text = generate(tokenizer, compiler, StructuredOutput(json=json.dumps(schema)), seed)
        value = json.loads(text)
        assert set(value) == {"not", "properties"} and set(value["properties"]) == {"x"}
        # Compact: json.dumps's separators and no other whitespace (not even "\n").
        assert ", " in text and not re.search(r"\s", text.replace(", ", "").replace(": ", ""))
    schema["additionalProperties"] = True  # the schema's own choice is kept
    for seed in range(8):
        text = generate(tokenizer, compiler, StructuredOutput(json=json.dumps(schema)), seed)
        if len(json.loads(text)) > 2:
            break
    else:
        raise AssertionError("additionalProperties: true never gave an extra property")


def test_eos_padding_rollback_and_batch_fill(setup):
    tokenizer, compiler = setup
    eos, vocab_size = compiler.eos_token_id, compiler.vocab_size
    matcher = compiler.matcher(StructuredOutput(choice=("ab", "abc")))
    bitmask = allocate_bitmask(3, vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    start = allowed_ids(bitmask, 0, vocab_size)
    assert start.max() < len(tokenizer) and eos not in start
    # Single-character ids, in every test tokenizer (byte fallback also has <0x63> for c):
    # "ab" may stop or go on, "abc" must stop.
    a, b, c = (tokenizer.convert_tokens_to_ids(ch) for ch in "abc")
    assert matcher.accept_tokens([a, b, a]) == 2  # the second "a" is refused
    matcher.fill_bitmask(bitmask, 0)
    after_ab = set(allowed_ids(bitmask, 0, vocab_size).tolist())
    assert {c, eos} <= after_ab and {tokenizer.decode([t]) for t in after_ab - {eos}} == {"c"}
    assert matcher.accept_token(c)
    matcher.fill_bitmask(bitmask, 0)
    assert allowed_ids(bitmask, 0, vocab_size).tolist() == [eos]
    matcher.rollback(3)
    matcher.fill_bitmask(bitmask, 1)
    assert np.array_equal(allowed_ids(bitmask, 1, vocab_size), start)
    assert matcher.accept_tokens([a, b, c, eos]) == 4 and matcher.is_terminated
    assert not matcher.accept_token(a) and not matcher.accept_token(vocab_size + 5)
    # The batched fill on the compiler's threads: terminated -> EOS only, None -> all.
    other = compiler.matcher(StructuredOutput(json_object=True))
    batch = allocate_bitmask(4, vocab_size)
    batch[:] = 0
    compiler.fill_bitmask([other, None, matcher], batch)
    single = allocate_bitmask(1, vocab_size)
    other.fill_bitmask(single, 0)
    assert np.array_equal(batch[0], single[0])
    assert (batch[1] == -1).all() and allowed_ids(batch, 2, vocab_size).tolist() == [eos]
    assert (batch[3] == 0).all()  # rows past the matchers are left alone
    assert compiler.compile(StructuredOutput(json_object=True)) is compiler.compile(
        StructuredOutput(json_object=True)
    )


def test_no_eos_token_is_refused():
    tokenizer = small_bpe(eos=False)
    with pytest.raises(ValueError, match="EOS"):
        GrammarCompiler(tokenizer, len(tokenizer))
    compiler = GrammarCompiler(tokenizer, len(tokenizer), eos_token_id=0)
    assert compiler.eos_token_id == 0


@pytest.mark.parametrize("vocab_size", [1, 31, 32, 100, 259])
def test_apply_bitmask_matches_numpy_twin(vocab_size):
    rng = np.random.default_rng(vocab_size)
    logits = rng.standard_normal((3, vocab_size)).astype(np.float32)
    bitmask = rng.integers(-(2**31), 2**31, size=(3, (vocab_size + 31) // 32), dtype=np.int64)
    bitmask = bitmask.astype(np.int32)
    bitmask[0] = -1  # all allowed, bit 31 included
    bitmask[1, 0] = np.int32(-(2**31))  # only bit 31 of the first word
    got = np.asarray(jax.jit(apply_bitmask)(jnp.asarray(logits), jnp.asarray(bitmask)))
    want = apply_bitmask_numpy(logits, bitmask)
    np.testing.assert_array_equal(got, want)
    # Bit j of word w is token 32 w + j.
    for row in range(3):
        for t in rng.integers(vocab_size, size=8):
            is_set = (int(bitmask[row, t // 32]) >> (t % 32)) & 1
            assert (want[row, t] == logits[row, t]) if is_set else want[row, t] == -np.inf
    np.testing.assert_array_equal(want[0], logits[0])
    with pytest.raises(ValueError, match="bitmask shape"):
        apply_bitmask(jnp.asarray(logits), jnp.asarray(bitmask[:, :0]))
