"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` for batches."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from tandem.model.config import ModelConfig
from tandem.model.loading import config_for, load
from tandem.model.sharding import make_mesh, shard_model
from tandem.model.transformer import Transformer
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.output import RequestOutput
from tandem.serve.sampling_params import SamplingParams


def tensor_parallel_mesh(cfg: ModelConfig, size: int, *, flag: str = "tensor_parallel_size"):
    """The mesh (data 1, fsdp 1, tensor `size`) over the first `size` devices that splits
    `cfg`'s heads `size` ways; None for 1. ValueError naming `flag` when `size` is below 1,
    exceeds the device count, or does not divide the q or kv heads (`_fit` would replicate
    them: every device would hold and compute all of them)."""
    if size < 1:
        raise ValueError(f"{flag} must be at least 1, got {size}")
    if size == 1:
        return None
    devices = jax.devices()
    if size > len(devices):
        raise ValueError(
            f"{flag} {size} is larger than the {len(devices)} {devices[0].platform} devices"
        )
    for name, what in (("num_heads", "attention heads"), ("num_kv_heads", "kv heads")):
        if getattr(cfg, name) % size:
            raise ValueError(
                f"{flag} {size} does not divide the model's {getattr(cfg, name)} {what} ({name})"
            )
    return make_mesh(data=1, fsdp=1, tensor=size, devices=devices[:size])


class LLM:
    def __init__(
        self,
        model: str | ModelConfig | Transformer,
        tokenizer=None,
        *,
        dtype="auto",
        seed: int = 0,
        mesh=None,
        tensor_parallel_size: int = 1,
        **engine_config,
    ):
        """`model`: a checkpoint directory, a gin preset (or its ModelConfig: random
        weights) or a Transformer. With `mesh`, or
        `tensor_parallel_size` > 1 (vLLM's argument: a tensor mesh over the first devices),
        the weights are placed on the mesh and the engine runs on it."""
        name = "tandem"
        if tensor_parallel_size != 1:
            if mesh is not None:
                raise ValueError("LLM: give mesh or tensor_parallel_size, not both")
            cfg = model.config if isinstance(model, Transformer) else config_for(model)
            mesh = tensor_parallel_mesh(cfg, tensor_parallel_size)
            if isinstance(model, Transformer):
                model = shard_model(model, mesh)
        if not isinstance(model, Transformer):
            model, tokenizer, name = load(model, dtype=dtype, seed=seed, mesh=mesh)
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
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_id = f"offline-{self._next_id}"
                self._next_id += 1
                self.engine.add_request(request_id, self._prompt_ids(prompt), p, stream=False)
                ids.append(request_id)
        except Exception:
            for request_id in ids:  # nothing of a refused batch stays queued
                self.engine.abort(request_id)
            raise
        bar = None
        if use_tqdm or (use_tqdm is None and len(prompts) >= 32):
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc="generate", unit="req")
        results = self.engine.run_until_done(None if bar is None else lambda _: bar.update(1))
        if bar is not None:
            bar.close()
        return [results[i] for i in ids]

    def _prompt_ids(self, prompt) -> list[int]:
        """Text, token ids, or vLLM's {"prompt_token_ids": [...]} / {"prompt": "..."}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(
                    f"a dict prompt needs 'prompt_token_ids' or 'prompt', got keys {sorted(prompt)}"
                )
        if isinstance(prompt, str):
            return self.engine.tokenizer.encode(prompt)
        if not all(isinstance(t, int | np.integer) for t in prompt):
            raise ValueError(
                f"a prompt is text, a list of token ids or a dict; got {type(prompt).__name__} "
                "with non-integer items"
            )
        return list(prompt)
