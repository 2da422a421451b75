"""The GPU path of bench/engine_bench.py (`--device cuda`): the transformers engine's tokens/s and memory on
a random-weight model built from a config (bf16), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}  # fmt: skip


def random_model_generation(
    device: str, shape: str, prompts: int, samples: int, tokens: int, prompt_length: int, batch_size: int
) -> dict[str, Any]:
    """Tokens/s of the transformers engine on a random-weight model of `shape` (bf16; no download)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from stages.engines.base import SamplingParams
    from stages.engines.transformers_engine import TransformersEngine

    cuda = device.startswith("cuda")
    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=False, max_position_embeddings=32768)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    weights_gb = None
    if cuda:
        torch.cuda.synchronize()
        weights_gb = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    build_seconds = time.perf_counter() - t0
    vocab = config.vocab_size
    stop = vocab - 1  # random weights: an end token is as likely as any other (~1 in 150k per step)
    engine = TransformersEngine(model, stop_ids={stop}, pad_id=0)
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (prompts, prompt_length), generator=rng).tolist()
    produced, seconds = _timed_sampling(engine, ids, samples, SamplingParams(tokens, 0.9), batch_size, cuda)
    out: dict[str, Any] = {
        "shape": shape,
        "device_name": device,
        "weights_gb": None,
        "peak_allocated_gb": None,
        "peak_reserved_gb": None,
        "parameters_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "build_seconds": build_seconds,
        "seconds": seconds,
        "tokens": produced,
        "tokens_per_second": produced / seconds,
    }
    if cuda:
        out.update(
            device_name=torch.cuda.get_device_name(),
            weights_gb=weights_gb,
            peak_allocated_gb=torch.cuda.max_memory_allocated() / 2**30,
            peak_reserved_gb=torch.cuda.max_memory_reserved() / 2**30,
        )
    return out


def _timed_sampling(
    engine: Any, ids: list[list[int]], samples: int, params: Any, batch_size: int, cuda: bool
) -> tuple[int, float]:
    """Tokens produced and seconds taken sampling `ids` in batches, after a warm-up call."""
    import torch

    from stages.engines.base import SamplingParams, derive_seed

    engine.sample(ids[:1], [[1, 2]], SamplingParams(4, 0.9))  # warm-up
    if cuda:
        torch.cuda.synchronize()
    start_time = time.perf_counter()
    produced = 0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        seeds = [[derive_seed(42, start + i, k) for k in range(samples)] for i in range(len(chunk))]
        produced += sum(len(s.token_ids) for group in engine.sample(chunk, seeds, params) for s in group)
    if cuda:
        torch.cuda.synchronize()
    return produced, time.perf_counter() - start_time


def cuda_main(args: argparse.Namespace, prompts: int, samples: int, tokens: int) -> None:
    """Measure on the GPU with engine_bench's sizes (`prompts`, `samples`, `tokens`) and print one table."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda needs a CUDA GPU, and torch {torch.__version__} sees none here "
            f"(built for CUDA: {torch.version.cuda or 'no, a CPU build'}). Run it on a GPU machine with a CUDA "
            "build of torch; without --device the CPU engine comparison runs."
        )
    random_model_report(args, "cuda", prompts, samples, tokens)


def random_model_report(args: argparse.Namespace, device: str, prompts: int, samples: int, tokens: int) -> None:
    say(f"start {time.strftime('%Y-%m-%d %H:%M:%S')}")
    r = random_model_generation(device, args.shape, prompts, samples, tokens, args.prompt_length, args.tf_batch_size)
    say(
        f"transformers engine, random {args.shape} ({r['parameters_b']:.2f} B parameters, bf16) on "
        f"{r['device_name']}: {prompts} prompts of {args.prompt_length} random tokens x {samples} samples x "
        f"<= {tokens} new tokens, temperature 0.9, {args.tf_batch_size} prompts a batch"
    )
    say("| model | batch (rows) | sampling s | tokens | tokens/s | weights GB | peak allocated GB | peak reserved GB |")
    say("|---|---|---|---|---|---|---|---|")
    gb = [f"{r[k]:.1f}" if r[k] is not None else "-" for k in ("weights_gb", "peak_allocated_gb", "peak_reserved_gb")]
    say(
        f"| {args.shape} random | {args.tf_batch_size} ({args.tf_batch_size * samples}) | {r['seconds']:.1f} | "
        f"{r['tokens']:,} | {r['tokens_per_second']:.1f} | {' | '.join(gb)} |"
    )
    say(f"end {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


def say(message: str) -> None:
    print(message, flush=True)
