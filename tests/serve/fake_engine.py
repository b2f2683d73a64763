"""A fake `Engine` with the real one's contract and hand-computable outputs.

Completion `i` of a request continues its prompt with the bytes of "abcdefghij..." from
offset `i` (plus the seed, when one is given), one token per step, so a test knows every
text in advance. Prompts share a prefix cache of 4-token blocks. `fail_at_step` makes
`step()` raise, as a crashed device step would; `step_delay` slows it down.
"""

from __future__ import annotations

import dataclasses
import math
import time

from tandem.serve.engine import QueueFullError
from tandem.serve.output import CompletionOutput, RequestOutput, TokenLogprob
from tandem.serve.sampling_params import SamplingParams, find_stop_span

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
BLOCK = 4


@dataclasses.dataclass
class _Completion:
    index: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already returned
    sent_tokens: int = 0
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    client: str
    completions: list[_Completion]
    num_cached_tokens: int


class FakeEngine:
    def __init__(self, tokenizer, *, max_model_len=256, max_waiting=64, max_running=8):
        self.tokenizer = tokenizer
        self.model_name = "fake"
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self.max_running = max_running
        self.fail_at_step: int | None = None
        self.step_delay = 0.0  # seconds each step sleeps, as a model would compute
        self.num_steps = 0
        self.requests: dict[str, _Request] = {}
        self.order: list[str] = []
        self.cached_blocks: set[tuple[int, ...]] = set()
        self.service: dict[str, dict[str, int]] = {}
        self.num_prompt_tokens = 0
        self.num_hit_tokens = 0

    def add_request(self, request_id, prompt_token_ids, params, *, client="default", priority=0):
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < len(self.tokenizer) for t in prompt_token_ids):
            raise ValueError("prompt token ids out of the vocabulary")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds the model's context length ({self.max_model_len})"
            )
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if len(self.requests) - self.max_running >= self.max_waiting:
            raise QueueFullError("too many requests waiting")
        num_cached = 0
        for end in range(BLOCK, len(prompt_token_ids), BLOCK):
            if tuple(prompt_token_ids[:end]) not in self.cached_blocks:
                break
            num_cached = end
        for end in range(BLOCK, len(prompt_token_ids) + 1, BLOCK):
            self.cached_blocks.add(tuple(prompt_token_ids[:end]))
        self.num_prompt_tokens += len(prompt_token_ids)
        self.num_hit_tokens += num_cached
        stats = self.service.setdefault(client, {"prompt_tokens": 0, "generated_tokens": 0})
        stats["prompt_tokens"] += len(prompt_token_ids)
        completions = [_Completion(i) for i in range(params.n)]
        self.requests[request_id] = _Request(
            request_id, list(prompt_token_ids), params, client, completions, num_cached
        )
        self.order.append(request_id)

    def abort(self, request_id):
        if request_id in self.requests:
            del self.requests[request_id]
            self.order.remove(request_id)

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        self.num_steps += 1
        time.sleep(self.step_delay)
        if self.fail_at_step is not None and self.num_steps >= self.fail_at_step:
            raise RuntimeError("injected step failure")
        outputs = []
        for request_id in list(self.order[: self.max_running]):
            req = self.requests[request_id]
            for c in req.completions:
                if c.finish_reason is None:
                    self._grow(req, c)
            finished = all(c.finish_reason for c in req.completions)
            outputs.append(
                RequestOutput(
                    request_id,
                    req.prompt,
                    [self._output(req, c, finished) for c in req.completions],
                    finished,
                    req.num_cached_tokens,
                    None,
                )
            )
            if finished:
                self.abort(request_id)
        return outputs

    def _grow(self, req: _Request, c: _Completion) -> None:
        p = req.params
        offset = c.index + (p.seed or 0)
        token = ord(ALPHABET[(offset + len(c.token_ids)) % len(ALPHABET)])
        c.token_ids.append(token)
        self.service[req.client]["generated_tokens"] += 1
        if p.logprobs is not None:
            # The chosen token has probability 1/2; the alternatives follow it down.
            top = [(token + j, math.log(0.5 / 2**j)) for j in range(p.logprobs)]
            c.logprobs.append(TokenLogprob(token, math.log(0.5), top))
        start = len(c.text)
        c.text += chr(token)
        span = find_stop_span(c.text, p.stop, start)
        if span is not None:
            c.text = c.text[: span[1] if p.include_stop_str_in_output else span[0]]
            c.finish_reason = "stop"
        elif len(c.token_ids) >= p.max_tokens:
            c.finish_reason = "length"

    def _output(self, req: _Request, c: _Completion, finished: bool) -> CompletionOutput:
        hold = 0 if c.finish_reason else max(req.params.max_stop_len - 1, 0)
        visible = c.text[: max(len(c.text) - hold, c.sent)]
        out = CompletionOutput(
            index=c.index,
            text=visible,
            token_ids=list(c.token_ids),
            new_text=visible[c.sent :],
            new_token_ids=c.token_ids[c.sent_tokens :],
            logprobs=list(c.logprobs) if req.params.logprobs is not None else None,
            finish_reason=c.finish_reason,
        )
        c.sent, c.sent_tokens = len(visible), len(c.token_ids)
        return out

    def stats(self):
        running = min(len(self.order), self.max_running)
        return {
            "num_running": running,
            "num_waiting": len(self.order) - running,
            "kv_usage": running / max(self.max_running, 1),
            "prefix_hit_rate": self.num_hit_tokens / max(self.num_prompt_tokens, 1),
            "clients": {k: dict(v) for k, v in self.service.items()},
        }
