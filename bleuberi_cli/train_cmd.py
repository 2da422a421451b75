"""`bleuberi train`: LoRA GRPO (or SFT) with reference-metric rewards."""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Annotated, Literal

import typer

from bleuberi_cli.common import (
    InputOpt,
    QuietOpt,
    SeedOpt,
    SkipInvalidOpt,
    StepProgress,
    boundary,
    read_all_records,
    say,
)
from bleuberi_cli.model_options import DeviceOpt, DtypeOpt, ModelOpt, SystemPromptOpt, TrustRemoteCodeOpt
from stages.core.models import DEFAULT_MODEL
from stages.metrics import METRICS

HELP = f"""Fine-tune a LoRA adapter with GRPO, rewarding each sampled completion by reference metrics.

The BLEUBERI recipe: ... | bleuberi select --mode hard -n 5000 | bleuberi train -o runs/x. Each step
samples --num-generations completions for each of its prompts, rewards them with --reward (sum of
NAME[:WEIGHT] metrics against the record's references), and takes clipped policy-gradient steps with a
KL penalty towards the base model (the same weights with the adapter switched off).

Batch sizes count completions, as in TRL: a step samples per-device-train-batch-size x grad-accum
completions per device (that many / num-generations prompts). A step is one such rollout followed by
--num-iterations optimizer updates.

Writes to --output-dir: adapter/ (final LoRA), checkpoints/step-N/ (resumable), metrics.jsonl,
reward.png, config.json. stdout carries the same per-step metric records, so `| jq .reward_mean` works.
Ctrl-C saves a checkpoint and stops; --resume continues exactly where it stopped. Reads all records
into memory. Launch with `torchrun --nproc_per_node N bleuberi train ...` for data parallelism.

Rewards: {", ".join(METRICS)}.

\b
Examples:
  bleuberi train -i hard.jsonl -o runs/bleu --max-steps 200
  bleuberi train -i hard.jsonl -o runs/mix --reward bleu:1 --reward rouge-l:0.5 --beta 0
  bleuberi train -i hard.jsonl -o runs/sft --algo sft --learning-rate 1e-4
  bleuberi train -i hard.jsonl -o runs/bleu --resume            # continue from the latest checkpoint
"""


def _opt(*names: str, help: str, metavar: str | None = None) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help, metavar=metavar)


def train(
    output_dir: Annotated[str, _opt("-o", "--output-dir", metavar="DIR", help="Run folder (created if needed).")],
    input: InputOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    algo: Annotated[Literal["grpo", "sft"], _opt("--algo", help="grpo, or sft: the paper's baseline.")] = "grpo",
    reward: Annotated[
        list[str] | None, _opt("--reward", metavar="NAME[:WEIGHT]", help="Reward metric; repeat to sum several.")
    ] = None,
    num_generations: Annotated[int, _opt("--num-generations", metavar="G", help="Samples per prompt.")] = 8,
    per_device_train_batch_size: Annotated[
        int,
        _opt("--per-device-train-batch-size", metavar="N", help="Completions per sampling batch (multiple of G)."),
    ] = 8,
    grad_accum: Annotated[int, _opt("--grad-accum", metavar="K", help="Sampling batches per optimizer step.")] = 1,
    micro_batch: Annotated[
        int | None, _opt("--micro-batch", metavar="N", help="Completions per forward/backward (memory).")
    ] = None,
    max_prompt_length: Annotated[int, _opt("--max-prompt-length", metavar="N", help="Longer prompts are cut.")] = 512,
    max_completion_length: Annotated[int, _opt("--max-completion-length", metavar="N", help="New tokens.")] = 512,
    drop_long: Annotated[bool, _opt("--drop-long", help="Drop over-long prompts instead of cutting them.")] = False,
    max_steps: Annotated[int | None, _opt("--max-steps", metavar="N", help="Steps (default: from epochs).")] = None,
    num_train_epochs: Annotated[float, _opt("--num-train-epochs", metavar="E", help="Passes over the data.")] = 1.0,
    learning_rate: Annotated[
        float, _opt("--learning-rate", "--lr", metavar="LR", help="Peak LR; 10x the paper's full-FT 1e-6 for LoRA.")
    ] = 1e-5,
    lr_scheduler_type: Annotated[
        Literal["constant_with_warmup", "linear", "cosine"], _opt("--lr-scheduler-type", help="After warmup.")
    ] = "constant_with_warmup",
    warmup_ratio: Annotated[float, _opt("--warmup-ratio", metavar="R", help="Share of steps warming up.")] = 0.05,
    weight_decay: Annotated[float, _opt("--weight-decay", metavar="W", help="AdamW weight decay.")] = 0.0,
    max_grad_norm: Annotated[float, _opt("--max-grad-norm", metavar="N", help="Gradient clipping.")] = 0.2,
    beta: Annotated[float, _opt("--beta", metavar="B", help="KL weight; 0 skips the reference pass.")] = 0.04,
    epsilon: Annotated[float, _opt("--epsilon", metavar="E", help="Lower clip range of the ratio.")] = 0.2,
    epsilon_high: Annotated[
        float | None, _opt("--epsilon-high", metavar="E", help="Upper clip range (default: epsilon).")
    ] = None,
    loss_type: Annotated[
        Literal["grpo", "bnpo", "dapo", "dr_grpo"], _opt("--loss-type", help="Token loss aggregation.")
    ] = "dapo",
    scale_rewards: Annotated[
        Literal["group", "batch", "none"], _opt("--scale-rewards", help="Divide advantages by this std.")
    ] = "group",
    importance_sampling_level: Annotated[
        Literal["token", "sequence"], _opt("--importance-sampling-level", help="sequence = GSPO.")
    ] = "token",
    num_iterations: Annotated[int, _opt("--num-iterations", metavar="MU", help="Updates per rollout.")] = 1,
    mask_truncated: Annotated[
        bool, _opt("--mask-truncated", help="Leave completions cut at the length limit out of the loss.")
    ] = False,
    skip_zero_std: Annotated[
        bool, _opt("--skip-zero-std", help="Leave groups with equal rewards out of the loss pass (and its KL).")
    ] = False,
    temperature: Annotated[float, _opt("--temperature", metavar="T", help="Sampling temperature.")] = 0.9,
    top_p: Annotated[float, _opt("--top-p", metavar="P", help="Nucleus sampling mass.")] = 1.0,
    lora_r: Annotated[int, _opt("--lora-r", metavar="R", help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, _opt("--lora-alpha", metavar="A", help="LoRA scale numerator.")] = 32,
    lora_dropout: Annotated[float, _opt("--lora-dropout", metavar="P", help="LoRA dropout.")] = 0.0,
    target_modules: Annotated[
        list[str] | None, _opt("--target-modules", metavar="NAME", help="LoRA targets (default all-linear).")
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        _opt("--gradient-checkpointing/--no-gradient-checkpointing", help="Default: on for CUDA, off on CPU."),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    system_prompt: SystemPromptOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    seed: SeedOpt = 42,
    save_steps: Annotated[int, _opt("--save-steps", metavar="N", help="Checkpoint every N steps.")] = 50,
    save_total_limit: Annotated[
        int | None, _opt("--save-total-limit", metavar="N", help="Keep the newest N checkpoints.")
    ] = 3,
    logging_steps: Annotated[int, _opt("--logging-steps", metavar="N", help="Metrics every N steps.")] = 1,
    resume: Annotated[bool, _opt("--resume", help="Continue from the newest checkpoint in --output-dir.")] = False,
    resume_from: Annotated[
        str | None, _opt("--resume-from", metavar="DIR|latest", help="Continue from this checkpoint folder.")
    ] = None,
    merge_to: Annotated[
        str | None, _opt("--merge-to", metavar="DIR", help="Also write a merged full model for plain transformers.")
    ] = None,
    skip_invalid: SkipInvalidOpt = False,
    quiet: QuietOpt = False,
) -> None:
    with boundary():
        from stages.core.jsonl import JsonlWriter
        from stages.train.config import TrainConfig
        from stages.train.loop import TrainingInterrupted
        from stages.train.loop import train as run_training

        values = dict(locals())
        names = {f.name for f in fields(TrainConfig)}
        overrides = {k: v for k, v in values.items() if k in names and v is not None}
        if reward:
            overrides["reward"] = reward
        if target_modules:
            overrides["target_modules"] = target_modules
        config = TrainConfig(**overrides)
        records = read_all_records(input, skip_invalid=skip_invalid, quiet=quiet, purpose="train on")
        if not records:
            return
        with JsonlWriter(None, flush_each=True, tolerate_closed_stdout=True) as stdout, StepProgress(quiet) as show:

            def on_metrics(record: dict) -> None:
                stdout.write(record)
                show(record)

            try:
                result = run_training(
                    records,
                    config,
                    output_dir,
                    resume=resume_from or ("latest" if resume else None),
                    merge_to=merge_to,
                    on_metrics=on_metrics,
                    on_message=lambda m: say(m, quiet=quiet),
                )
            except TrainingInterrupted as stopped:
                sys.stderr.write(f"bleuberi: {stopped}\n")
                raise typer.Exit(130) from None
        last = result.metrics[-1] if result.metrics else {}
        summary = f"done: {result.steps} steps; adapter in {result.adapter}"
        if "reward_mean" in last and result.metrics:
            summary += (
                f"; reward {result.metrics[0]['reward_mean']:.4f} (first step) -> {last['reward_mean']:.4f} (last)"
            )
        say(summary, quiet=quiet)
