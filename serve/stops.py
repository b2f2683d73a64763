"""Incremental detokenization and stop strings for one sequence.

The text is re-decoded from all generated ids each step (simple and exact for any
tokenizer). While a sequence runs, the tail that could still be the start of a stop
string, and a trailing partial UTF-8 character, are held back, so streamed deltas never
show text that a later stop would retract.
"""

from __future__ import annotations

from tandem.serve.sampling_params import SamplingParams, find_stop_span


class StopChecker:
    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.text = ""
        self.finished = False
        self.num_chars_emitted = 0
        self.num_ids_emitted = 0

    def append(self, output_token_ids: list[int], finished: bool) -> bool:
        """Decodes after a new token; True when a stop string ends the sequence here."""
        if self.tokenizer is None:
            self.finished = finished
            return False
        previous = len(self.text)
        self.text = self.tokenizer.decode(
            output_token_ids, skip_special_tokens=self.params.skip_special_tokens
        )
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

    def flush(self) -> None:
        self.finished = True

    def visible(self) -> str:
        if self.finished:
            return self.text
        n = len(self.text)
        if self.params.stop:
            n -= self.params.max_stop_len - 1
        text = self.text[: max(n, 0)]
        return text[:-1] if text.endswith("\ufffd") else text

    def take(self) -> tuple[str, str]:
        """(all visible text, the part not returned before)."""
        text = self.visible()
        new = text[self.num_chars_emitted :]
        self.num_chars_emitted = max(self.num_chars_emitted, len(text))
        return text, new
