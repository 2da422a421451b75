"""bf16 against fp32 for a GRPO step on the CPU, in one invocation: step time, sampler-vs-trainer drift, KL noise.

    python bench/precision_bench.py [--steps 4] [--variants fp32,bf16,bf16-logits]

The demo's training settings on the embedded smollm2-135m (4 prompts x G=4 per step, 48 completion tokens,
prompts up to 256 tokens, LoRA r16 all-linear, beta 0.04), each variant in its own child process: 1 warm-up
step, then --steps timed steps (the median step time is reported, and its ratio to fp32's). The learning
rate is 1e-6 (--lr), so that one update moves the policy by a KL of ~1e-11: the KL measured after it is
the precision's noise, not learning. First it times one matmul (2048x576 @ 576x1536) in each dtype, and
says whether the CPU has native bf16 (AVX-512 BF16 or AMX): without it bf16 runs in software.

- fp32: the reference (sampler and trainer agree to ~1e-5 nats per token).
- bf16: base weights in bfloat16 with bleuberi's precision policy (stages/core/precision.py): logits taken
  in float32 by both the sampler and the trainer; LoRA, optimizer state, log-probs and loss in float32.
- bf16-logits: the same, but with the logits rounded to bf16 as the model's own head computes them (the
  policy switched off): shows how much of the drift and the KL noise the float32 head removes.

Reported per variant: median step seconds (and vs fp32), mean and max |sampler - trainer| log-prob over the
sampled tokens (`logprob_drift_mean/_max`, averaged over the timed steps) and the sampler-vs-trainer KL
(`mismatch_kl`), the KL to the base model at step 1 (LoRA B is zero: the policy is the reference, so
anything but 0 is a code path that differs) and at step 2 (after one tiny update: fp32 gives ~1e-11, so
anything above that is bf16 rounding the update). The first line names the CPU and its bf16 instructions
(AVX-512 BF16, AMX): the ratios mean little without them. Goals (issue 26): on a CPU with AMX, bf16 at
most 0.6x of fp32's step time; KL at step 1 at most 1e-5. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
PROMPTS_PER_STEP, G, COMPLETION_TOKENS = 4, 4, 48
VARIANTS = {"fp32": "float32", "bf16": "bfloat16", "bf16-logits": "bfloat16"}


def child(variant: str, steps: int, lr: float) -> dict:
    """One variant's run, in this (child) process."""
    from stages.train.config import TrainConfig
    from stages.train.loop import train

    if variant == "bf16-logits":  # the model's own bf16 head, in the sampler and in the trainer
        import stages.core.precision as precision

        precision.float32_logits = lambda model: contextlib.nullcontext()
        precision.float32_weight = lambda weight: weight
    config = TrainConfig.of(
        dtype=VARIANTS[variant],
        device="cpu",
        num_generations=G,
        per_device_train_batch_size=PROMPTS_PER_STEP * G,
        max_prompt_length=256,
        max_completion_length=COMPLETION_TOKENS,
        max_steps=steps + 1,
        learning_rate=lr,
        save_steps=10_000,
    )
    records = [orjson.loads(line) for line in (DATA / "pool.jsonl").read_bytes().splitlines()]
    with tempfile.TemporaryDirectory() as out:
        result = train(records[: PROMPTS_PER_STEP * (steps + 1)], config, out)
    timed = result.metrics[1:]
    return {
        "seconds": statistics.median(m["seconds"] for m in timed),
        "sample_seconds": statistics.median(m["sample_seconds"] for m in timed),
        "update_seconds": statistics.median(m["update_seconds"] for m in timed),
        "drift_mean": statistics.fmean(m["logprob_drift_mean"] for m in result.metrics),
        "drift_max": max(m["logprob_drift_max"] for m in result.metrics),
        "mismatch_kl": statistics.fmean(m["mismatch_kl"] for m in result.metrics),
        "kl_step1": result.metrics[0]["kl"],
        "kl_step2": result.metrics[1]["kl"],
    }


def run_variant(variant: str, steps: int, lr: float) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import precision_bench as b; "
    code += f"print(json.dumps(b.child({variant!r}, {steps}, {lr!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_line() -> str:
    """One decode-and-train-shaped matmul per dtype, median of 10, and the CPU's bf16 support."""
    import time

    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    native = [flag for flag in ("avx512_bf16", "amx_bf16", "amx_tile") if flag in flags]
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        runs = []
        for _ in range(11):
            start = time.perf_counter()
            a @ b
            runs.append(time.perf_counter() - start)
        times[dtype] = statistics.median(runs[1:]) * 1000
    return (
        f"matmul 2048x576 @ 576x1536: float32 {times[torch.float32]:.1f} ms, bfloat16 {times[torch.bfloat16]:.1f} ms "
        f"({times[torch.bfloat16] / times[torch.float32]:.2f}x); CPU {model}, {torch.get_num_threads()} threads; "
        f"bf16 instructions: {', '.join(native) or 'none'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--variants", default="fp32,bf16,bf16-logits")
    parser.add_argument("--lr", type=float, default=1e-6, help="learning rate (tiny: the KL after a step is noise)")
    args = parser.parse_args()
    print(matmul_line())
    results = {variant: run_variant(variant, args.steps, args.lr) for variant in args.variants.split(",")}
    base = results.get("fp32", {}).get("seconds")
    print(f"{'variant':<12} {'s/step':>7} {'vs fp32':>8} {'sample s':>9} {'update s':>9} {'drift mean':>11} "
          f"{'drift max':>10} {'mismatch KL':>12} {'KL step 1':>10} {'KL step 2':>10}")  # fmt: skip
    for variant, r in results.items():
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        print(f"{variant:<12} {r['seconds']:>7.2f} {ratio:>8} {r['sample_seconds']:>9.2f} {r['update_seconds']:>9.2f} "
              f"{r['drift_mean']:>11.4f} {r['drift_max']:>10.3f} {r['mismatch_kl']:>12.2e} {r['kl_step1']:>10.2e} "
              f"{r['kl_step2']:>10.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
