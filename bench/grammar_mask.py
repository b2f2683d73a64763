"""`tandem bench grammar_mask`: the grammar engines for structured output, measured on one
128k vocabulary: llguidance, xgrammar and outlines-core (whichever are installed), and
tandem's own serve/structured_output.py (column "tandem", llguidance underneath).

Choice (2026-12): llguidance. Its serial mask step is 3-9x xgrammar's on this shared
2-core machine (128 rows x 128k vocab: 17-44 ms vs 4-5 ms under load, 11.8 vs 3.9 ms on a
quieter run; threaded 9.1 vs 3.4 ms), but xgrammar hard-requires torch and triton and
imports torch at import time (8 s): on a GPU node `tandem[cuda]` would pull CUDA torch
(gigabytes, with NVIDIA libraries that may clash with JAX's CUDA 13 ones) just for
grammars. llguidance has no dependencies and native Lark, JSON schema and regex; it also
compiles schemas 10x faster than xgrammar. For a JAX stack the install footprint outweighs
the serial mask time, and a batch's rows are filled on llguidance's thread pool
(`fill_next_token_bitmask_par`, the "mask step threads" row), which a 16-core GPU host
spreads over its cores; 2 shared cores cannot show that scaling.
outlines-core compiles a token-level automaton per grammar (seconds to a minute).

Vocabulary: no model hub is reachable, so a Llama-3-shaped tokenizer is built offline: a
byte-level BPE trained with `tokenizers` (Llama 3's split regex, then ByteLevel without its
own regex) to 128,000 tokens on the first 64 MB of Python sources under site-packages,
plus 256 special tokens (`<|begin_of_text|>`, `<|end_of_text|>` = EOS, reserved ones):
128,256 ids. Training takes about a minute on 2 cores; the result is cached under the
system temp dir (`--cache-dir`).

Grammars (GRAMMARS below): five JSON schemas (nested objects, arrays with min/maxItems,
enums, bounded numbers, required and optional fields, string patterns), a regex, a choice
and json_object. JSON has no whitespace but json.dumps's separators (llguidance, xgrammar)
or none at all (outlines-core's whitespace_pattern="", it has no separator option).

Measured per library:
  setup      building its tokenizer index from the HF tokenizer (once per engine);
  compile    spec -> compiled grammar -> matcher -> first mask filled, per grammar, with no
             compile cache: what a new request waits before its first token;
  mask step  a batch of 128 matchers (the grammars cycled over the rows), each on its own
             seeded random walk (uniform over the allowed ids, EOS taken once allowed; a
             terminated or 200-token walk restarts): time to fill the [128, V/32] bitmask
             for all rows, serially and with the library's thread pool where it has one,
             then time to advance every row by its sampled token. Median and p90 over
             `--steps` steps after `--warmup` steps, so rows sit at varied points of
             generation.
Ratios are each library's time over the fastest one's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
import tempfile
import time

import numpy as np

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BPE = 128000
NUM_SPECIAL = 256
CORPUS_BYTES = 64_000_000
MAX_WALK = 200
# outlines-core builds a full token-level automaton per grammar: for {"type": "object"} that
# took 48 s on this vocabulary (2 cores, 2026-12), so it runs only with --slow.
SLOW = {("outlines-core", "json_object")}
STEP_EXCLUDED = {"json_object"}

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "express": {"type": "boolean"},
    },
    "required": ["items"],
    "additionalProperties": False,
}
REVIEW = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["sentiment", "stars"],
    "additionalProperties": False,
}
EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[a-f0-9]{8}$"},
        "level": {"type": "string", "enum": ["debug", "info", "warn", "error"]},
        "latency_ms": {"type": "number", "minimum": 0},
        "retries": {"type": "integer", "minimum": 0, "maximum": 10},
        "ok": {"type": "boolean"},
        "note": {"type": ["string", "null"]},
    },
    "required": ["id", "level", "ok"],
    "additionalProperties": False,
}
MATRIX = {
    "type": "object",
    "properties": {
        "rows": {
            "type": "array",
            "minItems": 2,
            "maxItems": 3,
            "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
        },
        "label": {"type": "string"},
    },
    "required": ["rows", "label"],
    "additionalProperties": False,
}
# (name, kind, value): kind as StructuredOutput.kind.
GRAMMARS = (
    ("json:person", "json", json.dumps(PERSON)),
    ("json:order", "json", json.dumps(ORDER)),
    ("json:review", "json", json.dumps(REVIEW)),
    ("json:event", "json", json.dumps(EVENT)),
    ("json:matrix", "json", json.dumps(MATRIX)),
    ("regex:ipv4", "regex", r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)"),
    ("choice", "choice", ("positive", "negative", "neutral", "mixed")),
    ("json_object", "json_object", True),
)


def llama3_like_tokenizer(cache_dir: str):
    """The 128,256-id tokenizer described in the module docstring, trained once and cached."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(cache_dir, "tokenizer.json")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        root = sysconfig.get_paths()["purelib"]
        files = sorted(glob.glob(os.path.join(root, "*", "**", "*.py"), recursive=True))

        def corpus():
            num_bytes = 0
            for f in files:
                try:
                    with open(f, encoding="utf-8") as fh:
                        text = fh.read()
                except (OSError, UnicodeDecodeError):
                    continue
                num_bytes += len(text)
                yield text
                if num_bytes > CORPUS_BYTES:
                    return

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=NUM_BPE,
            min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus(), trainer)
        special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        special += [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL - len(special))]
        tok.add_special_tokens(special)
        tok.save(path + ".tmp")
        os.replace(path + ".tmp", path)
    return PreTrainedTokenizerFast(
        tokenizer_file=path, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size):
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self.ll, self.np = llguidance, llguidance.numpy
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.executor = llguidance.LLExecutor()

    def compile(self, kind, value):
        m = self.ll.LLMatcher
        opts = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        if kind == "json":
            return m.grammar_from_json_schema(value, defaults=opts)
        if kind == "json_object":
            return m.grammar_from_json_schema({"type": "object"}, defaults=opts)
        if kind == "regex":
            return m.grammar_from_regex(value)
        alts = " | ".join(json.dumps(c) for c in value)
        return m.grammar_from_lark(f"start: {alts}")

    def matcher(self, grammar):
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, matchers, bitmask):
        for i, m in enumerate(matchers):
            self.np.fill_next_token_bitmask(m, bitmask, i)

    def fill_par(self, matchers, bitmask):
        pairs = list(zip(matchers, range(len(matchers))))
        self.np.fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    def accept(self, m, token):
        return m.consume_token(token)

    def is_terminated(self, m):
        return m.is_stopped()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, kind, value):
        c = self.compiler
        seps = (", ", ": ")
        if kind == "json":
            return c.compile_json_schema(value, any_whitespace=False, separators=seps)
        if kind == "json_object":
            return c.compile_json_schema(
                '{"type": "object"}', any_whitespace=False, separators=seps
            )
        if kind == "regex":
            return c.compile_regex(value)
        return c.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in value))

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, matchers, bitmask):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def fill_par(self, matchers, bitmask):
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, m, token):
        return m.accept_token(token)

    def is_terminated(self, m):
        return m.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size):
        import outlines_core

        self.oc = outlines_core
        self.eos = tokenizer.eos_token_id
        byte_of = {ch: b for b, ch in enumerate(_byte_level_chars())}
        special = set(tokenizer.all_special_ids)
        by_bytes: dict[bytes, list[int]] = {}
        for piece, i in tokenizer.get_vocab().items():
            if i not in special and i != self.eos:
                by_bytes.setdefault(bytes(byte_of[c] for c in piece), []).append(i)
        self.vocab = outlines_core.Vocabulary(self.eos, by_bytes)

    def compile(self, kind, value):
        build = self.oc.json_schema.build_regex_from_schema
        if kind == "json":
            regex = build(value, whitespace_pattern="")
        elif kind == "json_object":
            regex = build('{"type": "object"}', whitespace_pattern="")
        elif kind == "regex":
            regex = value
        else:
            regex = "|".join(_re_escape(c) for c in value)
        return self.oc.Index(regex, self.vocab)

    def matcher(self, index):
        return self.oc.Guide(index)

    def fill(self, matchers, bitmask):
        words = bitmask.shape[1]
        for i, g in enumerate(matchers):
            g.write_mask_into(bitmask[i].ctypes.data, words, 4)

    fill_par = None

    def accept(self, g, token):
        if not g.accepts_tokens([token]):
            return False
        g.advance(token, return_tokens=False)
        return True

    def is_terminated(self, g):
        return g.is_finished()


class Tandem:
    """serve/structured_output.py as the engine uses it: `GrammarMatcher.fill_bitmask` per
    row (serial) and `GrammarCompiler.fill_bitmask` (llguidance's thread pool, 8 threads)."""

    name = "tandem"

    def __init__(self, tokenizer, vocab_size):
        from tandem.serve import structured_output

        self.compiler = structured_output.GrammarCompiler(tokenizer, vocab_size)

    def compile(self, kind, value):
        from tandem.serve.sampling_params import StructuredOutput

        return StructuredOutput(**{kind: value})

    def matcher(self, spec):
        return self.compiler.matcher(spec)

    def fill(self, matchers, bitmask):
        for i, m in enumerate(matchers):
            m.fill_bitmask(bitmask, i)

    def fill_par(self, matchers, bitmask):
        self.compiler.fill_bitmask(matchers, bitmask)

    def accept(self, m, token):
        return m.accept_token(token)

    def is_terminated(self, m):
        return m.is_terminated


LIBRARIES = {
    "llguidance": Llguidance,
    "xgrammar": Xgrammar,
    "outlines-core": OutlinesCore,
    "tandem": Tandem,
}


def _byte_level_chars() -> list[str]:
    from tandem.model.tokenizer import _bytes_to_unicode

    return [chr(c) for c in _bytes_to_unicode()]


def _re_escape(s: str) -> str:
    return "".join("\\" + c if c in r".^$*+?{}[]\|()" else c for c in s)


def allowed_ids(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids whose bit is set in one bitmask row (bit j of word w is id 32 * w + j)."""
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def measure(lib, args, eos: int) -> dict:
    out = {"library": lib.name, "compile_ms": {}}
    compiled = {}
    for name, kind, value in GRAMMARS:
        if (lib.name, name) in SLOW and not args.slow:
            continue
        bitmask = np.zeros((1, (args.vocab_size + 31) // 32), np.int32)
        start = time.perf_counter()
        g = lib.compile(kind, value)
        lib.fill([lib.matcher(g)], bitmask)
        out["compile_ms"][name] = 1e3 * (time.perf_counter() - start)
        compiled[name] = g
    # The same grammars in every library's batch: those all of them compile quickly.
    rows = [compiled[n] for n, _, _ in GRAMMARS if n not in STEP_EXCLUDED]
    for fill in (lib.fill, lib.fill_par):
        if fill is not None:
            fill_ms, advance_ms = walk(lib, fill, rows, args, eos)
            key = "fill" if fill == lib.fill else "fill_par"
            out[f"{key}_ms"], out[f"{key}_p90_ms"] = fill_ms
            out["advance_ms"], out["advance_p90_ms"] = advance_ms
    return out


def walk(lib, fill, grammars, args, eos: int):
    """(median, p90) ms of filling the batch's bitmask, and of advancing every row, per step
    of seeded random walks (module docstring). Separate walks for the serial and threaded
    fill: a matcher may cache its last mask, so filling twice per step would time the cache."""
    rng = np.random.default_rng(args.seed)
    rows = [grammars[i % len(grammars)] for i in range(args.batch)]
    matchers = [lib.matcher(g) for g in rows]
    lengths = [0] * args.batch
    bitmask = np.zeros((args.batch, (args.vocab_size + 31) // 32), np.int32)
    fill_s, advance_s = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        fill(matchers, bitmask)
        fill_s.append(time.perf_counter() - start)
        tokens = []
        for i in range(args.batch):
            ids = allowed_ids(bitmask[i], args.vocab_size)
            tokens.append(eos if eos in ids else int(rng.choice(ids)))
        start = time.perf_counter()
        for m, t in zip(matchers, tokens):
            if not lib.accept(m, t):
                raise AssertionError(f"{lib.name} refused token {t}, which its mask allowed")
        advance_s.append(time.perf_counter() - start)
        for i, t in enumerate(tokens):
            lengths[i] += 1
            if t == eos or lib.is_terminated(matchers[i]) or lengths[i] >= MAX_WALK:
                matchers[i], lengths[i] = lib.matcher(rows[i]), 0

    def stats(xs):
        xs = 1e3 * np.array(xs[args.warmup :])
        return float(np.median(xs)), float(np.percentile(xs, 90))

    return stats(fill_s), stats(advance_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tandem bench grammar_mask", description=__doc__)
    p.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=NUM_BPE + NUM_SPECIAL)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-dir", default=os.path.join(tempfile.gettempdir(), "tandem_bench_bpe128k")
    )
    p.add_argument("--slow", action="store_true", help="also the compiles listed in SLOW")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = p.parse_args(argv)

    start = time.perf_counter()
    tokenizer = llama3_like_tokenizer(args.cache_dir)
    print(f"tokenizer: {len(tokenizer)} ids ({time.perf_counter() - start:.1f} s to load/train)")
    results = []
    for name in args.libraries.split(","):
        try:
            start = time.perf_counter()
            lib = LIBRARIES[name](tokenizer, args.vocab_size)
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        setup = 1e3 * (time.perf_counter() - start)
        r = measure(lib, args, tokenizer.eos_token_id)
        r["setup_ms"] = setup
        results.append(r)
        print(f"{name}: done")

    if args.json:
        print(json.dumps(results))
    print(f"\nbatch {args.batch}, vocab {args.vocab_size}, {os.cpu_count()} CPUs; ms")
    print(f"{'':22}" + "".join(f"{r['library']:>15}" for r in results))
    rows = [("setup", "setup_ms")]
    rows += [(f"compile {n}", n) for n, _, _ in GRAMMARS]
    rows += [
        ("mask step serial", "fill_ms"),
        ("  p90", "fill_p90_ms"),
        ("mask step threads", "fill_par_ms"),
        ("  p90", "fill_par_p90_ms"),
        ("advance step", "advance_ms"),
    ]
    for label, key in rows:
        vals = [r["compile_ms"].get(key, r.get(key)) for r in results]
        print(
            f"{label:22}" + "".join(f"{v:15.2f}" if v is not None else f"{'-':>15}" for v in vals)
        )
    ratios = (("mask step serial", "fill_ms"), ("mask step threads", "fill_par_ms"))
    for label, key in ratios + (("compile total", None),):
        vals = [sum(r["compile_ms"].values()) if key is None else r.get(key) for r in results]
        if all(v is None for v in vals):
            continue
        best = min(v for v in vals if v is not None)
        ratio = "".join(f"{v / best:14.1f}x" if v is not None else f"{'-':>15}" for v in vals)
        print(f"{label + ' / best':22}" + ratio)
    return 0
