"""Incremental detokenization: the text of a growing id list, decoding a few ids per step.

Re-decoding every generated id at every step costs O(n^2) over a generation. As in vLLM's
incremental detokenizer (and `tokenizers`' DecodeStream), only a short window is decoded:
ids from a prefix offset on, where the ids before the read offset have known text. The
new text is what the window decodes to past the text of its first, already read, ids.
Those ids give the decoder its context: SentencePiece decoders drop the leading space of
the first token only, and a byte-level token may finish a character an earlier one began.
The read offset advances once the window's text no longer ends in U+FFFD (a partial
UTF-8 character).

The text always equals `tokenizer.decode(ids, skip_special_tokens=...)`. When a new id
changes the text of ids already read (a byte-fallback run that stops being valid UTF-8
turns wholly into U+FFFD), the window sees it, and the offsets go back to earlier
checkpoints until the read text is unchanged. A step then decodes a few ids on average;
the exception is a byte-fallback run (Llama 2's <0x..> tokens) that holds an invalid
byte, which is decoded whole for as long as it runs. Tokenizers without what the window
needs (a fast, Rust-backed HF tokenizer whose decode does not clean up spaces across
tokens) are decoded in full at every step: exact, but O(n) a step.
"""

from __future__ import annotations

from collections.abc import Sequence

# After this many ids whose text still ends in U+FFFD the ids are invalid bytes, not a
# character in progress (a UTF-8 character is at most 4 bytes): all but the last
# NUM_HELD_IDS are read if their text is final, so garbage does not grow the window.
MAX_PENDING_IDS = 8
NUM_HELD_IDS = 4
# Text that Python's clean_up_tokenization changes however the decoder spaced it.
CLEAN_UP_PROBE = "a . b ' c"


def decodes_in_windows(tokenizer) -> bool:
    """Whether decoding windows of ids reproduces `tokenizer.decode`: a fast (Rust)
    tokenizer whose decode does not clean up spaces in Python ("b ' c" -> "b'c"), which
    joins text across tokens. transformers 5 skips that clean-up for BPE models even
    where configured; a WordPiece decoder's own clean-up works per token and is fine."""
    if not getattr(tokenizer, "is_fast", False):
        return False
    if not hasattr(tokenizer, "added_tokens_decoder"):
        return False
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return True
    probe = tokenizer.encode(CLEAN_UP_PROBE, add_special_tokens=False)
    return tokenizer.decode(probe) == tokenizer.decode(probe, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    """`decode(ids)` where each call's ids extend the previous call's (generated ids)."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.is_windowed = decodes_in_windows(tokenizer)
        # decode(skip_special_tokens=True) drops special ids before the decoder runs, so
        # dropping them here first gives the same text and keeps them out of the window.
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.skipped = frozenset(i for i, t in added.items() if skip_special_tokens and t.special)
        if self.is_windowed:
            # Decoded before a window that does not start the sequence, so that the
            # window's first id decodes as mid-sequence: SentencePiece decoders drop the
            # first token's leading space, which would also hide a change to it.
            self.anchor = tokenizer.encode("a", add_special_tokens=False)
            self.anchor_text = self._decode(self.anchor)
        self.ids: list[int] = []  # ids consumed, skipped special ids left out
        self.num_ids_seen = 0  # ids consumed, skipped ones included
        self.text = ""
        self._read_from_start()

    def _read_from_start(self) -> None:
        self.prefix_offset = 0  # the window is ids[prefix_offset:]
        self.read_offset = 0  # the text of ids[:read_offset] is read_text
        self.read_text = ""
        # (offset, len(read_text) there) of every prefix offset so far, the current one
        # last: where to go back to when a new id changes text already read.
        self.checkpoints = [(0, 0)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, equal to `tokenizer.decode(ids, skip_special_tokens=...)`."""
        if not self.is_windowed:
            self.text = self._decode(ids)
            return self.text
        if len(ids) < self.num_ids_seen:  # not an extension: start over
            self.ids, self.num_ids_seen = [], 0
            self._read_from_start()
        new = [i for i in ids[self.num_ids_seen :] if i not in self.skipped]
        self.num_ids_seen = len(ids)
        if not new:
            return self.text
        self.ids += new
        text, prefix_text = self._window_text()
        tail = text[len(prefix_text) :]
        self.text = self.read_text + tail
        if not tail.endswith("\ufffd"):
            self._advance(len(self.ids), tail)
        elif len(self.ids) - self.read_offset >= MAX_PENDING_IDS:
            self._read_settled(text, prefix_text)
        return self.text

    def _window_text(self) -> tuple[str, str]:
        """(text of the window, text of its read ids). While a new id changed the text of
        read ones (a byte-fallback run that stops being valid UTF-8 turns into U+FFFD
        from its start), goes back to earlier checkpoints, twice as far each time, and
        reads again from there; at the farthest, from the first id."""
        back = 1
        text = self._decode_window(len(self.ids))
        while not text.startswith(prefix_text := self._prefix_text()):
            j = len(self.checkpoints) - 1 - back
            if j < 0:
                self._read_from_start()
            else:
                self.read_offset, num_chars = self.checkpoints[j + 1]
                self.read_text = self.read_text[:num_chars]
                del self.checkpoints[j + 1 :]
                self.prefix_offset = self.checkpoints[j][0]
            back *= 2
            text = self._decode_window(len(self.ids))
        return text, prefix_text

    def _read_settled(self, text: str, prefix_text: str) -> None:
        """Reads all but the last NUM_HELD_IDS ids if the ids after them left their text
        unchanged (it ends in invalid bytes, which later ids cannot complete)."""
        end = len(self.ids) - NUM_HELD_IDS
        settled = self._decode_window(end)
        if text.startswith(settled) and settled.startswith(prefix_text):
            self._advance(end, settled[len(prefix_text) :])

    def _advance(self, end: int, tail: str) -> None:
        """Moves the read offset to `end`; `tail` is the text of the ids newly read. The
        prefix offset moves to the old read offset if the ids from there decode alone
        (after the anchor) to their text in context; else it stays, and the window keeps
        the context they need (a byte-fallback run begun before them)."""
        start, num_chars = self.read_offset, len(self.read_text)
        self.read_offset = end
        self.read_text += tail
        if start > self.prefix_offset:
            alone = self._decode(self.anchor + self.ids[start:end])
            if alone == self.anchor_text + tail:
                self.prefix_offset = start
                self.checkpoints.append((start, num_chars))

    def _prefix_text(self) -> str:
        """The window's read ids decoded (after the anchor unless they start the text)."""
        context = self.anchor_text if self.prefix_offset else ""
        return context + self.read_text[self.checkpoints[-1][1] :]

    def _decode_window(self, end: int) -> str:
        context = self.anchor if self.prefix_offset else []
        return self._decode(context + self.ids[self.prefix_offset : end])

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)
