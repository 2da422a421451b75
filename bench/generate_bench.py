"""Decoding against the hardware and against plain transformers, in one invocation (issue 32).

    python bench/generate_bench.py [--model smollm2-135m] [--parts steps,generate,train] [--rows 16,64]

1. steps: ms per decode step (about 100 cached tokens) at each row count, for the model's own forward on a
   transformers cache (what the engine did before) and for bleuberi's decoder, beside the time the same
   shapes' matmuls take alone (every projection and the head, as plain matmuls): the share of that limit.
2. generate: the 208 demo pool prompts, chat-templated, greedy, 48 new tokens: plain `model.generate` in
   batches of 16 (left-padded) against `generate_records` with its default batches. Model loaded once.
3. train: train-time sampling on the demo policy (LoRA r16 on all linear layers, its B factors random so the
   adapter is not a no-op), 4 prompts x 4 samples, temperature 0.9, 48 tokens, per sampled token: plain
   `model.generate(do_sample=True, num_return_sequences=4)` against the sampler GRPO calls.
Each ratio is a median over repeats measured in the same process; run it alone (noisy machines).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import torch

from stages.core.models import DEFAULT_MODEL
from stages.engines.base import SamplingParams
from stages.engines.generator import Batching, Generator
from stages.generate import generate_records

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


def pool() -> list[dict]:
    return [orjson.loads(line) for line in (DATA / "pool.jsonl").read_bytes().splitlines()]


def timed(run: Callable[[], object], repeats: int) -> float:
    """The median seconds of `repeats` runs after one warm-up."""
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def matmul_seconds(model: torch.nn.Module, rows: int, repeats: int) -> float:
    """Every linear layer's product and the head's for `rows` rows, as plain matmuls: the arithmetic limit."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}

    def run() -> None:
        with torch.inference_mode():
            for weight in weights:
                torch.nn.functional.linear(inputs[weight.shape[1]], weight)

    return timed(run, repeats)


def step_seconds(generator: Generator, rows: int, repeats: int) -> tuple[float, float]:
    """(the model's forward on a transformers cache, the decoder) per decode step with about 100 cached tokens."""
    from transformers import DynamicCache

    from stages.engines.decoder import Decoder, StaticCache, prefilled

    model = generator.model
    ids = torch.randint(100, 20_000, (rows, 100))
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, use_cache=True, past_key_values=cache, logits_to_keep=1)
        keys, values = prefilled(cache)
        decoder = Decoder.of(model, 100 + 4 * repeats + 8)
        assert decoder is not None, "bench/generate_bench.py times a Llama-family model"
        shape = (len(keys), rows, keys[0].shape[1], keys[0].shape[3], 100 + 4 * repeats + 8)
        static = StaticCache(shape, 100, keys[0].dtype, keys[0].device)
        static.place(slice(0, rows), keys, values, torch.ones(rows, 100))
        matmuls, token = decoder.matmuls(), torch.full((rows,), 42)
        position = torch.full((rows,), 100)
        mask = torch.ones(rows, 100, dtype=torch.long)

        def forward_step() -> None:
            nonlocal mask
            mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=-1)
            out = model(
                input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], past_key_values=cache
            )
            out.logits[:, -1].argmax(-1)

        def decoder_step() -> None:
            decoder.head(decoder.step(token, position, static, matmuls)).argmax(-1)

        return timed(forward_step, repeats), timed(decoder_step, repeats)


def steps_part(generator: Generator, rows_list: list[int], repeats: int) -> None:
    print(
        "| rows | matmuls alone, ms | model forward, ms/step (share) | bleuberi decoder, ms/step (share) | speed-up |"
    )
    print("|---|---|---|---|---|")
    for rows in rows_list:
        limit = matmul_seconds(generator.model, rows, repeats)
        forward, decoder = step_seconds(generator, rows, repeats)
        print(
            f"| {rows} | {limit * 1e3:.1f} | {forward * 1e3:.1f} ({limit / forward:.0%}) | "
            f"{decoder * 1e3:.1f} ({limit / decoder:.0%}) | {forward / decoder:.2f}x |"
        )


def plain_generate(generator: Generator, prompts: list[list[int]], new_tokens: int, batch: int) -> int:
    """`model.generate`, greedy, in left-padded batches of `batch`; returns the new tokens made."""
    model, made = generator.model, 0
    stops = sorted(generator.stop_ids)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[generator.pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, eos_token_id=stops,
            pad_token_id=generator.pad_id,
        )  # fmt: skip
        made += int((out[:, width:] != generator.pad_id).sum())
    return made


def generate_part(generator: Generator, repeats: int) -> None:
    records = pool()
    prompts = [generator.encode(r) for r in records]
    params = SamplingParams(48, 0.0)
    plain = timed(lambda: plain_generate(generator, prompts, 48, 16), repeats)
    ours = timed(lambda: list(generate_records([dict(r) for r in records], generator, params, Batching())), repeats)
    print(
        f"generate, {len(records)} pool prompts, greedy, 48 tokens: plain model.generate (batches of 16) "
        f"{plain:.1f} s, bleuberi {ours:.1f} s: {plain / ours:.2f}x faster (target >= 2x)"
    )


def lora_policy(generator: Generator) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    policy = get_peft_model(generator.model, config)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    return policy


def train_part(generator: Generator, repeats: int) -> None:
    from stages.engines.transformers_engine import sample

    policy = lora_policy(generator)
    records = pool()
    groups = [[generator.encode(r) for r in records[i : i + 4]] for i in range(0, 4 * repeats, 4)]
    params = SamplingParams(48, 0.9)
    stops = sorted(generator.stop_ids)
    plain_tokens, ours_tokens = [0], [0]

    def plain(prompts: list[list[int]]) -> None:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[generator.pad_id] * (width - len(p)) + p for p in prompts])
        mask = (ids != generator.pad_id).long()
        out = policy.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.9, top_k=0, top_p=1.0,
            num_return_sequences=4, max_new_tokens=48, eos_token_id=stops, pad_token_id=generator.pad_id,
        )  # fmt: skip
        plain_tokens[0] += int((out[:, width:] != generator.pad_id).sum())

    def ours(prompts: list[list[int]]) -> None:
        seeds = [[7 * i + k for k in range(4)] for i in range(len(prompts))]
        out = sample(policy, prompts, seeds, params, stop_ids=generator.stop_ids, pad_id=generator.pad_id)
        ours_tokens[0] += sum(len(s.token_ids) for p in out for s in p)

    per_token = {}
    for name, run, made in (("plain", plain, plain_tokens), ("bleuberi", ours, ours_tokens)):
        run(groups[0])  # warm-up
        made[0] = 0
        start = time.perf_counter()
        for prompts in groups:
            run(prompts)
        per_token[name] = (time.perf_counter() - start) / made[0]
    print(
        f"train-time sampling, LoRA r16 policy, 4 prompts x 4, temperature 0.9, 48 tokens, {len(groups)} batches: "
        f"plain {per_token['plain'] * 1e3:.1f} ms per sampled token, bleuberi {per_token['bleuberi'] * 1e3:.1f}: "
        f"{per_token['plain'] / per_token['bleuberi']:.2f}x faster (target >= 1.5x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--parts", default="steps,generate,train")
    parser.add_argument("--rows", default="16,64")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    generator = Generator.load(args.model, device="cpu", dtype="float32")
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f in Path("/proc/cpuinfo").read_text()]
    cpu = platform.processor() or platform.machine()
    print(f"{args.model}, float32, {torch.get_num_threads()} threads, {cpu} ({', '.join(flags)})")
    parts = args.parts.split(",")
    if "steps" in parts:
        steps_part(generator, [int(r) for r in args.rows.split(",")], args.repeats)
    if "generate" in parts:
        generate_part(generator, max(1, args.repeats // 3))
    if "train" in parts:
        train_part(generator, args.repeats)


if __name__ == "__main__":
    main()
