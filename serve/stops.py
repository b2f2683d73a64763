"""Stop strings and streamed text for one sequence.

The text of the generated ids comes from an `IncrementalDetokenizer` (a few ids decoded
per step, always equal to the full decode). While a sequence runs, the tail that could
still be the start of a stop string, and a trailing partial UTF-8 character, are held
back, so streamed deltas never show text that a later stop would retract.
"""

from __future__ import annotations

from tandem.serve.detokenizer import IncrementalDetokenizer
from tandem.serve.sampling_params import SamplingParams, find_stop_span


class StopChecker:
    def __init__(self, tokenizer, params: SamplingParams):
        self.params = params
        self.detokenizer = (
            None
            if tokenizer is None
            else IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        )
        self.text = ""
        self.finished = False
        self.num_chars_emitted = 0
        self.num_ids_emitted = 0

    def append(self, output_token_ids: list[int], finished: bool) -> bool:
        """Decodes after new tokens (`output_token_ids` extends the last call's ids);
        True when a stop string ends the sequence here."""
        if self.detokenizer is None:
            self.finished = finished
            return False
        previous = len(self.text)
        self.text = self.detokenizer.decode(output_token_ids)
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
