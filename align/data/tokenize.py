"""Tokenisation of SFT, preference and prompt records into fixed-length numpy arrays.

Conventions, shared by every function here:

- Text is encoded with `add_special_tokens=False`; a BOS (`tokenizer.bos_token_id`) is put
  in front only when the tokenizer's own `encode` adds one (as Llama's do; the server
  encodes prompts that way) and the sequence does not already start with it (chat
  templates such as Llama 3's and the byte tokenizer's write it themselves).
- A prompt and its completion are encoded separately and concatenated, so the prompt's
  tokens are exactly those a rollout or `generate` starts from (TRL does the same).
- Chats are tokenised turn by turn: rendering messages[:k] must be a prefix of rendering
  messages[:k+1], and each new piece is encoded on its own. An assistant turn's header
  (the template's generation prompt) is context; its body, up to and including the
  template's end-of-turn text, is the target. So the mask is exact without offsets.
- EOS (`tokenizer.eos_token_id`) is appended after a text completion as a target, so the
  model learns to stop. A chat's last target turn usually already ends with it (the
  template's end-of-turn token is the model's EOS); then nothing is appended.
- loss_mask[t] = 1 when tokens[t] is a target, i.e. the model should predict tokens[t] from
  tokens[:t]. loss_mask[0] is always 0: the first token has nothing to be predicted from.
  With the `text` layout and a BOS, every text token is a target.
- Truncation keeps the start (TRL's default): tokens past `max_length` are cut, so a prompt
  longer than `max_length` leaves no targets and the example carries no loss. Prompts for
  rollouts (`tokenize_prompt`) instead keep their end, where the question usually is.
- Padding is on the right with `pad_token_id` (the EOS id when the tokenizer has no pad);
  padded positions have loss_mask 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tandem.align.data.records import (
    Messages,
    SftExample,
    TextPair,
    preference_example,
    prompt_example,
    sft_example,
    where,
)


def tokenize_sft(record: dict, tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    """SFT record -> {"tokens": i32[T], "loss_mask": f32[T]} with T = max_length."""
    _check_length(max_length, "max_length")
    tokens, mask = _example_tokens(sft_example(record), tokenizer, where(record))
    return _fixed(tokens, mask, tokenizer, max_length)


def tokenize_preference(record: dict, tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    """Preference record -> chosen/rejected tokens and masks, each [T]; the masks cover the
    completion tokens (and EOS), never the shared prompt."""
    _check_length(max_length, "max_length")
    chosen, rejected = preference_example(record)
    out = {}
    for name, example in (("chosen", chosen), ("rejected", rejected)):
        tokens, mask = _example_tokens(example, tokenizer, where(record))
        fixed = _fixed(tokens, mask, tokenizer, max_length)
        out[f"{name}_tokens"], out[f"{name}_mask"] = fixed["tokens"], fixed["loss_mask"]
    return out


def tokenize_prompt(record: dict, tokenizer: Any, max_prompt_length: int) -> dict[str, Any]:
    """Prompt record -> {"prompt_ids": list[int], **extra columns}.

    A chat prompt is rendered with the generation prompt (the assistant header). A prompt
    longer than `max_prompt_length` keeps its last tokens, after the BOS if it had one.
    """
    _check_length(max_prompt_length, "max_prompt_length")
    prompt, extras = prompt_example(record)
    if isinstance(prompt, str):
        ids = _encode(tokenizer, prompt)
    else:
        ids = _encode(tokenizer, _render(tokenizer, prompt, True, where(record)))
    ids = _with_bos(tokenizer, ids)
    if len(ids) > max_prompt_length:
        bos = tokenizer.bos_token_id
        head = [bos] if bos is not None and ids[0] == bos and max_prompt_length > 1 else []
        ids = head + ids[len(ids) - (max_prompt_length - len(head)) :]
    return {"prompt_ids": [int(i) for i in ids], **extras}


def _check_length(value: int, name: str) -> None:
    if not isinstance(value, int) or value < 2:
        raise ValueError(f"{name} must be an int >= 2, got {value!r}")


def _example_tokens(example: SftExample, tokenizer: Any, at: str) -> tuple[list[int], list[float]]:
    """Untruncated, unpadded (tokens, loss_mask) for one example, BOS and EOS included."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; completions need one to stop")
    tokens: list[int] = []
    mask: list[float] = []
    for text, is_target in _pieces(example, tokenizer, at):
        ids = _encode(tokenizer, text)
        tokens += ids
        mask += [float(is_target)] * len(ids)
    start, end = _last_target_run(mask)
    if isinstance(example, TextPair) or eos not in tokens[start:end]:
        tokens.insert(end, eos)  # right after the last target turn, which may not end the chat
        mask.insert(end, 1.0)
    with_bos = _with_bos(tokenizer, tokens)
    mask = [0.0] * (len(with_bos) - len(tokens)) + mask
    mask[0] = 0.0  # nothing predicts the first token
    return with_bos, mask


def _pieces(example: SftExample, tokenizer: Any, at: str) -> list[tuple[str, bool]]:
    """(text, is_target) pieces whose concatenation is the whole example's text."""
    if isinstance(example, TextPair):
        return [(example.prompt, False), (example.completion, True)]
    pieces = []
    done = ""
    messages: Messages = example.messages
    for k, message in enumerate(messages):
        full = _render(tokenizer, messages[: k + 1], False, at)
        if message["role"] == "assistant" and k >= example.num_context:
            if k == 0:
                raise ValueError(f"{at}: the chat opens with an assistant turn; nothing prompts it")
            header = _render(tokenizer, messages[:k], True, at)
            pieces.append((_suffix(done, header, k, at), False))
            pieces.append((_suffix(header, full, k, at), True))
        else:
            pieces.append((_suffix(done, full, k, at), False))
        done = full
    return pieces


def _suffix(prefix: str, text: str, k: int, at: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(
            f"{at}: the chat template is not prefix-stable at message {k} (rendering the "
            f"first {k} messages is not a prefix of rendering {k + 1}), so assistant turns "
            f"cannot be masked turn by turn"
        )
    return text[len(prefix) :]


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool, at: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{at}: a chat record needs a tokenizer with a chat template")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises TemplateError for e.g. non-alternating roles
        raise ValueError(f"{at}: the chat template rejected the messages ({e})") from e


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos) or not adds_bos(tokenizer):
        return ids
    return [bos] + ids


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own `encode` (special tokens on, as the server encodes a
    prompt) starts with BOS. Training follows it, so that a served prompt has the tokens
    the model was trained on."""
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _last_target_run(mask: list[float]) -> tuple[int, int]:
    """[start, end) of the final run of targets (the last assistant turn's body); a text
    example's run ends the sequence."""
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start, end


def _fixed(
    tokens: list[int], mask: list[float], tokenizer: Any, max_length: int
) -> dict[str, np.ndarray]:
    """Right-truncate and right-pad to max_length."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens, mask = tokens[:max_length], mask[:max_length]
    n = len(tokens)
    out_tokens = np.full((max_length,), pad, np.int32)  # [T]
    out_mask = np.zeros((max_length,), np.float32)  # [T]
    out_tokens[:n] = tokens
    out_mask[:n] = mask
    return {"tokens": out_tokens, "loss_mask": out_mask}
