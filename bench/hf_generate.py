"""`python -m tandem.bench.hf_generate`: the Hugging Face transformers peer of `bench
engine_e2e`, `generate` on tandem's own random weights and workload, timed in the same run.

The peer is what a user without a serving engine runs: torch, bf16 on CUDA, SDPA
attention, the default dynamic KV cache, static batches. Greedy (or plain temperature
sampling), with `min_new_tokens == max_new_tokens`: every sequence makes exactly its
requested tokens, as `ignore_eos` does for tandem (HF masks EOS where tandem passes over
it; the cost is the same). Prompts of one length run as one batch; prompts of several run
in chunks of `batch_size`, left-padded with an attention mask, each chunk to its longest
requested output, and only the requested tokens count.

Why a child process: JAX takes 75% of the GPU when its backend starts, and torch and JAX
each bring CUDA libraries that need not agree. So `engine_e2e` runs this module first, in
its own process, before its JAX touches the GPU: the child builds tandem's random weights
with JAX on the CPU, saves them with `tandem.model.hf.save_model`, times HF on them, and
exits, which hands every byte it held back to the driver. The parent then loads that
checkpoint, so both run bit-identical bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# `main`'s exit status when torch has no CUDA device: the parent skips the peer.
NO_CUDA_EXIT = 3
# The warm-up (CUDA context, cuBLAS handles, kernel loading): prompts and tokens.
NUM_WARMUP_PROMPTS = 2
NUM_WARMUP_TOKENS = 8


def load_hf_model(model_dir: str, *, dtype, device: str):
    """An `AutoModelForCausalLM` of a tandem-saved checkpoint, SDPA attention, in eval mode."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa"
    )
    # `.to(dtype)` as well: a transformers release that does not know `dtype=` ignores it
    # and loads float32, which would time another model than the engine's.
    return model.to(device=device, dtype=dtype).eval()


def hf_generate(
    model,
    prompts: list[list[int]],
    output_lens: list[int],
    *,
    batch_size: int,
    temperature: float = 0.0,
    pad_token_id: int = 0,
) -> dict:
    """Runs `prompts` in static batches of `batch_size`; `{"seconds", "output_tokens",
    "tokens"}` where `tokens[i]` is sequence i's first `output_lens[i]` generated tokens
    (its batch may run longer: each batch runs to its longest requested output)."""
    import torch

    if len(prompts) != len(output_lens):
        raise ValueError(f"{len(output_lens)} output lengths for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = model.device
    sampling = dict(do_sample=False)
    if temperature > 0:
        # Plain temperature sampling, as tandem's: no top-k (HF's default is 50) or top-p.
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    tokens: list[list[int]] = []
    start = time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        batch, lens = prompts[lo : lo + batch_size], output_lens[lo : lo + batch_size]
        width = max(len(p) for p in batch)
        # Left padding: every prompt ends at column `width`, where generation appends.
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        num_new = max(lens)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=num_new,
                min_new_tokens=num_new,
                pad_token_id=pad_token_id,
                **sampling,
            )  # [B, T + num_new]
        new = out[:, width:].tolist()  # copies to the host, so the batch has finished
        tokens.extend(row[:n] for row, n in zip(new, lens))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": sum(len(t) for t in tokens), "tokens": tokens}


def save_random_checkpoint(model: str, checkpoint: str, *, seed: int, dtype: str) -> None:
    """tandem's random-weight Transformer of gin preset `model`, in HF format at `checkpoint`."""
    from tandem.model.hf import save_model
    from tandem.model.loading import load

    save_model(load(model, dtype=dtype, seed=seed)[0], checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tandem.bench.hf_generate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="models/tiny.gin", help="a gin preset")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="HF-format directory: read if it holds config.json, else written first",
    )
    parser.add_argument(
        "--workload", required=True, help='JSON: {"prompts": [[ids]], "output_lens": [ints]}'
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: all prompts")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--result-json", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if on_cuda:
        import jax

        # Before JAX's backend starts: the weights are built on the CPU, the GPU is torch's.
        jax.config.update("jax_platforms", "cpu")
    try:
        import torch
    except ImportError:
        print("HF peer: torch is not installed", file=sys.stderr)
        return NO_CUDA_EXIT
    if on_cuda and not torch.cuda.is_available():
        print(f"HF peer: torch {torch.__version__} has no CUDA device", file=sys.stderr)
        return NO_CUDA_EXIT
    with open(args.workload) as f:
        workload = json.load(f)
    prompts, output_lens = workload["prompts"], workload["output_lens"]
    start = time.perf_counter()
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        save_random_checkpoint(args.model, args.checkpoint, seed=args.seed, dtype=args.dtype)
    model = load_hf_model(args.checkpoint, dtype=getattr(torch, args.dtype), device=args.device)
    setup = time.perf_counter() - start
    batch_size = args.batch_size or len(prompts)
    pad = model.generation_config.pad_token_id or model.config.eos_token_id or 0
    pad = pad[0] if isinstance(pad, list) else pad
    hf_generate(
        model,
        prompts[:NUM_WARMUP_PROMPTS],
        [NUM_WARMUP_TOKENS] * min(NUM_WARMUP_PROMPTS, len(prompts)),
        batch_size=batch_size,
        temperature=args.temperature,
        pad_token_id=pad,
    )
    run = hf_generate(
        model,
        prompts,
        output_lens,
        batch_size=batch_size,
        temperature=args.temperature,
        pad_token_id=pad,
    )
    device_name = torch.cuda.get_device_name(model.device) if on_cuda else args.device
    model_dtype, attn = model.dtype, model.config._attn_implementation
    del model
    if on_cuda:
        torch.cuda.empty_cache()
    import transformers

    result = {
        "seconds": run["seconds"],
        "output_tokens": run["output_tokens"],
        "out_tok_per_s": run["output_tokens"] / run["seconds"],
        "batch_size": batch_size,
        "setup_s": setup,
        "device": device_name,
        "dtype": str(model_dtype),
        "attn_implementation": attn,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    with open(args.result_json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def spawn_hf_peer(
    *,
    model: str,
    seed: int,
    checkpoint: str,
    prompts: list[list[int]],
    output_lens: list[int],
    batch_size: int | None,
    temperature: float,
    work_dir: str,
) -> tuple[dict | None, str]:
    """Runs `main` in a child process (its JAX on the CPU); (result, "") or (None, why not).
    Call it before this process's JAX starts its GPU backend."""
    workload, result = os.path.join(work_dir, "workload.json"), os.path.join(work_dir, "hf.json")
    with open(workload, "w") as f:
        json.dump({"prompts": prompts, "output_lens": output_lens}, f)
    cmd = [sys.executable, "-m", "tandem.bench.hf_generate", "--model", model]
    cmd += ["--seed", str(seed), "--checkpoint", checkpoint, "--workload", workload]
    cmd += ["--temperature", str(temperature), "--result-json", result]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    code = subprocess.run(cmd, env=env).returncode
    if code == NO_CUDA_EXIT:
        return None, "skipped: no torch with CUDA"
    if code != 0:
        return None, f"failed: exit status {code} (its error is above)"
    with open(result) as f:
        return json.load(f), ""


if __name__ == "__main__":
    sys.exit(main())
