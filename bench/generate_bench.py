"""Generation throughput: one `model.generate` call per prompt and sample, against the generate stage.

    python bench/generate_bench.py [--prompts 32] [--samples 4] [--max-new-tokens 64] [--model smollm2-135m]

Both sides use the same loaded model, chat-templated prompts from the demo held-out + pool sets,
temperature 1.0, and stop at the end-of-turn token. Prints prompts/s and new tokens/s for each and
the ratios (target: >= 3x on a 2-core CPU). `--device cuda` times the GPU path (bf16).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import orjson
import torch

from stages.core.models import DEFAULT_MODEL
from stages.generate import Batching, Generator, SamplingParams, generate_records

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


def load_prompts(count: int) -> list[dict]:
    rows = []
    for name in ("heldout", "pool"):
        rows += [orjson.loads(line) for line in (DATA / f"{name}.jsonl").read_bytes().splitlines()]
    return rows[:count]


def naive(generator: Generator, records: list[dict], n: int, max_new_tokens: int) -> tuple[float, int]:
    """What a research script often does: one generate() per prompt and per sample."""
    model, tokens = generator.model, 0
    eos = sorted(generator.stop_ids)
    start = time.perf_counter()
    for i, record in enumerate(records):
        ids = torch.tensor([generator.encode(record)], device=model.device)
        for k in range(n):
            torch.manual_seed(i * 1000 + k)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=generator.pad_id,
            )
            tokens += out.shape[1] - ids.shape[1]
    return time.perf_counter() - start, tokens


def stage(generator: Generator, records: list[dict], n: int, max_new_tokens: int, batch_size: int) -> tuple[float, int]:
    start = time.perf_counter()
    out = list(
        generate_records(
            [dict(r) for r in records],
            generator,
            SamplingParams(max_new_tokens, 1.0),
            Batching(n, batch_size=batch_size),
        )
    )
    seconds = time.perf_counter() - start
    return seconds, sum(sum(r["generation"]["completion_tokens"]) for r in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    start = time.perf_counter()
    generator = Generator.load(args.model, device=args.device, dtype=args.dtype)
    load_seconds = time.perf_counter() - start
    records = load_prompts(args.prompts)
    stage(generator, records[:2], args.samples, 8, args.batch_size)  # warm-up (allocator, kernels)

    t_naive, tok_naive = naive(generator, records, args.samples, args.max_new_tokens)
    t_stage, tok_stage = stage(generator, records, args.samples, args.max_new_tokens, args.batch_size)
    device = next(generator.model.parameters()).device
    dtype = next(generator.model.parameters()).dtype
    print(
        f"{args.model} on {device} ({dtype}); {len(records)} prompts x {args.samples} samples, "
        f"<= {args.max_new_tokens} new tokens; model load {load_seconds:.1f}s"
    )
    for name, seconds, tokens in (
        ("naive generate() loop", t_naive, tok_naive),
        ("bleuberi generate", t_stage, tok_stage),
    ):
        print(f"{name:22s}: {seconds:7.1f}s  {len(records) / seconds:6.2f} prompts/s  {tokens / seconds:7.0f} tokens/s")
    print(
        f"ratio: {t_naive / t_stage:.1f}x prompts/s, {(tok_stage / t_stage) / (tok_naive / t_naive):.1f}x tokens/s "
        "(target >= 3x on CPU)"
    )


if __name__ == "__main__":
    main()
