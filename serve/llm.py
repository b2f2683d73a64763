"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` for batches."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from tandem.model.transformer import Transformer
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.output import RequestOutput
from tandem.serve.sampling_params import SamplingParams


def load_for_serving(model: str, *, dtype="float32", seed: int = 0, mesh=None):
    """(model, tokenizer, name) from an HF checkpoint directory or a gin preset (random
    weights and the byte tokenizer: for demos and tests)."""
    if os.path.isdir(model):
        from tandem.model.hf import load_model
        from tandem.model.tokenizer import load_tokenizer

        return (
            load_model(model, dtype=jnp.dtype(dtype), mesh=mesh),
            load_tokenizer(model),
            os.path.basename(os.path.normpath(model)),
        )
    from tandem.configs import model_config_from_gin
    from tandem.model.tokenizer import byte_tokenizer

    cfg = model_config_from_gin(model)
    name = os.path.splitext(os.path.basename(model))[0]
    return Transformer(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed)), byte_tokenizer(), name


class LLM:
    def __init__(
        self,
        model: str | Transformer,
        tokenizer=None,
        *,
        dtype="float32",
        seed: int = 0,
        mesh=None,
        **engine_config,
    ):
        name = "tandem"
        if isinstance(model, str):
            model, tokenizer, name = load_for_serving(model, dtype=dtype, seed=seed, mesh=mesh)
        self.engine = Engine(
            model, tokenizer, EngineConfig(**engine_config), model_name=name, mesh=mesh
        )
        self._next_id = 0

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params):
            tokens = (
                self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            )
            request_id = f"offline-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(request_id, tokens, p)
            ids.append(request_id)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm or (use_tqdm is None and len(prompts) >= 32):
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc="generate", unit="req")
        while len(results) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[i] for i in ids]
