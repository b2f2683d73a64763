"""vLLM's tokenizer endpoints: /tokenize, /detokenize and /version.

They use the HTTP layer's tokenizer, the one the completion endpoints encode prompts with,
so a client (lm-evaluation-harness's remote tokenizer among them) counts and splits tokens
exactly as the server will. No request reaches the engine.
"""

from __future__ import annotations

from importlib import metadata

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from tandem.serve.chat_template import render_chat
from tandem.serve.openai_errors import APIError
from tandem.serve.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)


def parse_tokenize_request(body: dict) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """A body with `messages` is a chat request, any other a prompt: picked here rather
    than by a pydantic union, whose errors would name the fields of both shapes."""
    cls = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


class TokenizeHandlers:
    """The bodies of /tokenize and /detokenize over one tokenizer."""

    def __init__(self, tokenizer, model_name: str, max_model_len: int):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        # Ids the tokenizer can decode: its vocabulary and the tokens added to it.
        self.vocab_size = len(tokenizer)

    def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        """The prompt's token ids; a prompt longer than the context is still counted (a
        client asks in order to know)."""
        self._check_model(req)
        if isinstance(req, TokenizeChatRequest):
            text = self._render_chat(req)
        else:
            text = req.prompt
        tokens = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        token_strs = None
        if req.return_token_strs:
            token_strs = self.tokenizer.convert_ids_to_tokens(tokens)
        return TokenizeResponse(
            count=len(tokens),
            max_model_len=self.max_model_len,
            tokens=tokens,
            token_strs=token_strs,
        )

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """The text of `tokens`, special tokens included (as vLLM: a round trip)."""
        self._check_model(req)
        bad = [t for t in req.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(
                400,
                f"tokens: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                param="tokens",
            )
        return DetokenizeResponse(
            prompt=self.tokenizer.decode(req.tokens, skip_special_tokens=False)
        )

    def _render_chat(self, req: TokenizeChatRequest) -> str:
        """The messages (and tools) as the chat endpoint renders them."""
        try:
            return render_chat(
                self.tokenizer,
                req.messages,
                req.tools,
                add_generation_prompt=req.add_generation_prompt,
            )
        except Exception as e:  # noqa: BLE001 - no template, or the template refused
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None

    def _check_model(self, req) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(
                400,
                f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )


def version() -> VersionResponse:
    """tandem's version, as installed."""
    try:
        return VersionResponse(version=metadata.version("tandem"))
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return VersionResponse(version="unknown")
