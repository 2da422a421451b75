"""GRPO step time and peak memory: bleuberi against TRL's GRPOTrainer, in one invocation.

    pip install -e ".[bench]"
    python bench/train_bench.py [--steps 5] [--demo-steps 30]

Same model (the embedded smollm2-135m), LoRA r16 / alpha 32 on all linear layers, the same demo
prompts, G=4 completions for each of B=2 prompts per step, 64 completion tokens, beta 0.04,
temperature 0.9, learning rate 1e-5, sacrebleu BLEU as the reward, CPU float32. Each trainer runs in
its own child process (so each peak RSS is its own): 1 warm-up step, then --steps timed steps; the
median step time is reported. TRL runs twice: with its defaults (gradient checkpointing on) and with
checkpointing off, which is bleuberi's CPU default. Targets: bleuberi <= 0.7x TRL's step time, peak
memory not above TRL's.

Then --demo-steps of bleuberi on the demo pool at a demo learning rate, printing the mean reward of
the first and last five steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
PROMPTS_PER_STEP, G, COMPLETION_TOKENS = 2, 4, 64


def load_records(count: int) -> list[dict]:
    rows = [orjson.loads(line) for line in (DATA / "pool.jsonl").read_bytes().splitlines()]
    return rows[:count]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_config(steps: int, *, g: int = G, completion_tokens: int = COMPLETION_TOKENS, **settings: Any) -> Any:
    """The benchmarks' GRPO step (also bench/engine_bench.py's): PROMPTS_PER_STEP prompts x G samples, lr
    1e-5, beta 0.04, temperature 0.9, on the CPU, no checkpoints; 1 warm-up step, then `steps` timed."""
    from stages.train.config import TrainConfig

    return TrainConfig.of(
        num_generations=g,
        per_device_train_batch_size=PROMPTS_PER_STEP * g,
        max_completion_length=completion_tokens,
        max_steps=steps + 1,
        learning_rate=1e-5,
        beta=0.04,
        temperature=0.9,
        save_steps=10_000,
        device="cpu",
        **settings,
    )


def run_bleuberi(steps: int, gradient_checkpointing: bool) -> dict:
    from stages.train.loop import train

    config = bench_config(steps, gradient_checkpointing=gradient_checkpointing)
    with tempfile.TemporaryDirectory() as out:
        result = train(load_records(2 * (steps + 1)), config, out)
    times = [m["seconds"] for m in result.metrics[1:]]
    return {"step_seconds": times, "peak_rss_mb": peak_rss_mb()}


def run_trl(steps: int, gradient_checkpointing: bool) -> dict:
    import sacrebleu
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from stages.core.models import DEFAULT_MODEL, resolve_model

    records = load_records(2 * (steps + 1))
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "references": r["references"]} for r in records]
    )

    def bleu_reward(completions, references, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [sacrebleu.sentence_bleu(t, refs).score / 100 for t, refs in zip(texts, references)]

    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=PROMPTS_PER_STEP * G,
            num_generations=G,
            max_completion_length=COMPLETION_TOKENS,
            beta=0.04,
            temperature=0.9,
            learning_rate=1e-5,
            max_steps=steps + 1,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=gradient_checkpointing,
            seed=42,
            dataloader_num_workers=0,
            shuffle_dataset=False,
        )
        trainer = GRPOTrainer(
            model=resolve_model(DEFAULT_MODEL).path,
            reward_funcs=bleu_reward,
            args=config,
            train_dataset=dataset,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
            callbacks=[StepTimer()],
        )
        trainer.train()
    times = [b - a for a, b in itertools.pairwise(stamps)][1:]
    return {"step_seconds": times, "peak_rss_mb": peak_rss_mb()}


def run_demo(steps: int) -> dict:
    from stages.train.config import TrainConfig
    from stages.train.loop import train

    config = TrainConfig.of(
        num_generations=4,
        per_device_train_batch_size=16,
        max_completion_length=48,
        max_steps=steps,
        learning_rate=3e-4,
        beta=0.04,
        save_steps=10_000,
        device="cpu",
    )
    with tempfile.TemporaryDirectory() as out:
        result = train(load_records(208), config, out)
    rewards = [m["reward_mean"] for m in result.metrics]
    return {"first5": statistics.mean(rewards[:5]), "last5": statistics.mean(rewards[-5:]), "rewards": rewards}


CHILDREN = {
    "bleuberi": lambda steps: run_bleuberi(steps, False),
    "bleuberi-gc": lambda steps: run_bleuberi(steps, True),
    "trl-default": lambda steps: run_trl(steps, True),
    "trl-no-gc": lambda steps: run_trl(steps, False),
    "demo": run_demo,
}


def child(name: str, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", name, "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--demo-steps", type=int, default=30)
    parser.add_argument("--child", choices=sorted(CHILDREN))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.steps)))
        return

    results = {name: child(name, args.steps) for name in ("bleuberi", "bleuberi-gc", "trl-default", "trl-no-gc")}
    print(
        f"GRPO, smollm2-135m, LoRA r16 all-linear, {PROMPTS_PER_STEP} prompts x G={G}, {COMPLETION_TOKENS} "
        f"completion tokens, beta 0.04, CPU fp32; median of {args.steps} steps after 1 warm-up"
    )
    for name, r in results.items():
        print(f"  {name:12s} {statistics.median(r['step_seconds']):6.2f} s/step   peak RSS {r['peak_rss_mb']:7.0f} MB")
    ours = statistics.median(results["bleuberi"]["step_seconds"])
    for trl in ("trl-default", "trl-no-gc"):
        theirs = statistics.median(results[trl]["step_seconds"])
        memory = results["bleuberi"]["peak_rss_mb"] / results[trl]["peak_rss_mb"]
        print(f"  bleuberi / {trl}: time {ours / theirs:.2f}x, peak memory {memory:.2f}x  (targets <= 0.7x, <= 1.0x)")
    gc_ours = statistics.median(results["bleuberi-gc"]["step_seconds"])
    gc_theirs = statistics.median(results["trl-default"]["step_seconds"])
    print(f"  with checkpointing on both sides: time {gc_ours / gc_theirs:.2f}x")
    if args.demo_steps:
        demo = child("demo", args.demo_steps)
        print(
            f"demo pool, {args.demo_steps} steps (4 prompts x G=4, 48 tokens, lr 3e-4): mean reward "
            f"{demo['first5']:.4f} over the first 5 steps -> {demo['last5']:.4f} over the last 5"
        )


if __name__ == "__main__":
    main()
