"""`bleuberi train`: LoRA GRPO (or SFT) with reference-metric rewards."""

from __future__ import annotations

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
from bleuberi_cli.model_options import (
    ApiKeyEnvOpt,
    BackendOpt,
    ConcurrencyOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    ServerModelOpt,
    ServerUrlOpt,
    SystemPromptOpt,
    TrustRemoteCodeOpt,
)
from stages.metrics import METRICS, SPEC_HELP
from stages.train.config import TRAIN_HELP, TrainConfig

# One source for every option's default and help: TrainConfig and TRAIN_HELP (also behind run --print-config).
DEFAULTS = TrainConfig()

HELP = f"""Fine-tune a LoRA adapter with GRPO, rewarding each sampled completion by reference metrics.

The BLEUBERI recipe: ... | bleuberi select --mode hard -n 5000 | bleuberi train -o runs/x. Each step
samples --num-generations completions for each of its prompts, rewards them with --reward
(NAME[:ARG][:WEIGHT] specs: reference metrics, reward models, encoders; several are combined by
--reward-combine), and takes clipped policy-gradient steps with a KL penalty towards the base model
(the same weights with the adapter switched off). {SPEC_HELP}

Batch sizes count completions, as in TRL: a step samples per-device-train-batch-size x grad-accum
completions per device (that many / num-generations prompts). A step is one such rollout followed by
--num-iterations optimizer updates.

Writes to --output-dir: adapter/ (final LoRA), checkpoints/step-N/ (resumable), metrics.jsonl,
reward.png, config.json. stdout carries the same per-step metric records, so `| jq .reward_mean` works.
Ctrl-C saves a checkpoint and stops; --resume continues exactly where it stopped. Reads all records
into memory. Launch with `torchrun --nproc_per_node N bleuberi train ...` for data parallelism.

Rollouts: --backend transformers samples with the policy itself (exact, the default); --backend vllm
(vLLM in this process) or server (a vLLM server at --server-url, started with --enable-lora and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=1) holds the base model once, and after every optimizer step only the
LoRA adapter is saved and loaded into it under a new name. The loss's log-probs always come from the
trainer's own forward pass; metrics.jsonl logs the engine-vs-trainer drift. --async-rollouts samples
step t+1 while step t trains (one step stale, never more).

Rewards: {", ".join(METRICS)}.

\b
Examples:
  bleuberi train -i hard.jsonl -o runs/bleu --max-steps 200
  bleuberi train -i hard.jsonl -o runs/mix --reward bleu:1 --reward rouge-l:0.5 --beta 0
  bleuberi train -i hard.jsonl -o runs/rm --reward rm:/models/Skywork-Reward-Llama-3.1-8B-v0.2
  bleuberi train -i hard.jsonl -o runs/bleu-rm --reward bleu --reward rm:/models/rm --reward-combine zscore
  bleuberi train -i hard.jsonl -o runs/think --reasoning                  # <think>/<answer> + format reward
  bleuberi train -i hard.jsonl -o runs/sft --algo sft --learning-rate 1e-4
  bleuberi train -i hard.jsonl -o runs/bleu --resume            # continue from the latest checkpoint
  bleuberi train -i hard.jsonl -o runs/srv --backend server --server-url http://127.0.0.1:8000/v1 --async-rollouts
"""


def _opt(*names: str, help: str, metavar: str | None = None) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help, metavar=metavar)


# The signature is the command's option list (typer reads it); the body only builds the config and runs.
def train(
    output_dir: Annotated[str, _opt("-o", "--output-dir", metavar="DIR", help="Run folder (created if needed).")],
    input: InputOpt = None,
    model: ModelOpt = DEFAULTS.model,
    algo: Annotated[Literal["grpo", "sft"], _opt("--algo", help=TRAIN_HELP["algo"])] = "grpo",
    reward: Annotated[
        list[str] | None, _opt("--reward", metavar="NAME[:ARG][:WEIGHT]", help=TRAIN_HELP["reward"])
    ] = None,
    reward_combine: Annotated[
        Literal["sum", "zscore"], _opt("--reward-combine", help=TRAIN_HELP["reward_combine"])
    ] = DEFAULTS.reward_combine,
    reasoning: Annotated[bool, _opt("--reasoning", help=TRAIN_HELP["reasoning"])] = DEFAULTS.reasoning,
    num_generations: Annotated[
        int, _opt("--num-generations", metavar="G", help=TRAIN_HELP["num_generations"])
    ] = DEFAULTS.num_generations,
    per_device_train_batch_size: Annotated[
        int,
        _opt("--per-device-train-batch-size", metavar="N", help=TRAIN_HELP["per_device_train_batch_size"]),
    ] = DEFAULTS.per_device_train_batch_size,
    grad_accum: Annotated[int, _opt("--grad-accum", metavar="K", help=TRAIN_HELP["grad_accum"])] = DEFAULTS.grad_accum,
    micro_batch: Annotated[
        int | None, _opt("--micro-batch", metavar="N", help=TRAIN_HELP["micro_batch"])
    ] = DEFAULTS.micro_batch,
    max_prompt_length: Annotated[
        int, _opt("--max-prompt-length", metavar="N", help=TRAIN_HELP["max_prompt_length"])
    ] = DEFAULTS.max_prompt_length,
    max_completion_length: Annotated[
        int, _opt("--max-completion-length", metavar="N", help=TRAIN_HELP["max_completion_length"])
    ] = DEFAULTS.max_completion_length,
    drop_long: Annotated[bool, _opt("--drop-long", help=TRAIN_HELP["drop_long"])] = DEFAULTS.drop_long,
    max_steps: Annotated[
        int | None, _opt("--max-steps", metavar="N", help=TRAIN_HELP["max_steps"])
    ] = DEFAULTS.max_steps,
    num_train_epochs: Annotated[
        float, _opt("--num-train-epochs", metavar="E", help=TRAIN_HELP["num_train_epochs"])
    ] = DEFAULTS.num_train_epochs,
    learning_rate: Annotated[
        float, _opt("--learning-rate", "--lr", metavar="LR", help=TRAIN_HELP["learning_rate"])
    ] = DEFAULTS.learning_rate,
    lr_scheduler_type: Annotated[
        Literal["constant_with_warmup", "linear", "cosine"],
        _opt("--lr-scheduler-type", help=TRAIN_HELP["lr_scheduler_type"]),
    ] = DEFAULTS.lr_scheduler_type,
    warmup_ratio: Annotated[
        float, _opt("--warmup-ratio", metavar="R", help=TRAIN_HELP["warmup_ratio"])
    ] = DEFAULTS.warmup_ratio,
    weight_decay: Annotated[
        float, _opt("--weight-decay", metavar="W", help=TRAIN_HELP["weight_decay"])
    ] = DEFAULTS.weight_decay,
    max_grad_norm: Annotated[
        float, _opt("--max-grad-norm", metavar="N", help=TRAIN_HELP["max_grad_norm"])
    ] = DEFAULTS.max_grad_norm,
    beta: Annotated[float, _opt("--beta", metavar="B", help=TRAIN_HELP["beta"])] = DEFAULTS.beta,
    epsilon: Annotated[float, _opt("--epsilon", metavar="E", help=TRAIN_HELP["epsilon"])] = DEFAULTS.epsilon,
    epsilon_high: Annotated[
        float | None, _opt("--epsilon-high", metavar="E", help=TRAIN_HELP["epsilon_high"])
    ] = DEFAULTS.epsilon_high,
    loss_type: Annotated[
        Literal["grpo", "bnpo", "dapo", "dr_grpo", "cispo"], _opt("--loss-type", help=TRAIN_HELP["loss_type"])
    ] = DEFAULTS.loss_type,
    scale_rewards: Annotated[
        Literal["group", "batch", "none"], _opt("--scale-rewards", help=TRAIN_HELP["scale_rewards"])
    ] = DEFAULTS.scale_rewards,
    importance_sampling_level: Annotated[
        Literal["token", "sequence"], _opt("--importance-sampling-level", help=TRAIN_HELP["importance_sampling_level"])
    ] = DEFAULTS.importance_sampling_level,
    use_bias_correction_kl: Annotated[
        bool,
        _opt("--use-bias-correction-kl/--no-use-bias-correction-kl", help=TRAIN_HELP["use_bias_correction_kl"]),
    ] = DEFAULTS.use_bias_correction_kl,
    delta: Annotated[float | None, _opt("--delta", metavar="D", help=TRAIN_HELP["delta"])] = DEFAULTS.delta,
    top_entropy_quantile: Annotated[
        float, _opt("--top-entropy-quantile", metavar="Q", help=TRAIN_HELP["top_entropy_quantile"])
    ] = DEFAULTS.top_entropy_quantile,
    num_iterations: Annotated[
        int, _opt("--num-iterations", metavar="MU", help=TRAIN_HELP["num_iterations"])
    ] = DEFAULTS.num_iterations,
    mask_truncated: Annotated[
        bool, _opt("--mask-truncated", help=TRAIN_HELP["mask_truncated"])
    ] = DEFAULTS.mask_truncated,
    skip_zero_std: Annotated[bool, _opt("--skip-zero-std", help=TRAIN_HELP["skip_zero_std"])] = DEFAULTS.skip_zero_std,
    temperature: Annotated[
        float, _opt("--temperature", metavar="T", help=TRAIN_HELP["temperature"])
    ] = DEFAULTS.temperature,
    top_p: Annotated[float, _opt("--top-p", metavar="P", help=TRAIN_HELP["top_p"])] = DEFAULTS.top_p,
    lora_r: Annotated[int, _opt("--lora-r", metavar="R", help=TRAIN_HELP["lora_r"])] = DEFAULTS.lora_r,
    lora_alpha: Annotated[int, _opt("--lora-alpha", metavar="A", help=TRAIN_HELP["lora_alpha"])] = DEFAULTS.lora_alpha,
    lora_dropout: Annotated[
        float, _opt("--lora-dropout", metavar="P", help=TRAIN_HELP["lora_dropout"])
    ] = DEFAULTS.lora_dropout,
    target_modules: Annotated[
        list[str] | None, _opt("--target-modules", metavar="NAME", help=TRAIN_HELP["target_modules"])
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        _opt("--gradient-checkpointing/--no-gradient-checkpointing", help=TRAIN_HELP["gradient_checkpointing"]),
    ] = DEFAULTS.gradient_checkpointing,
    device: DeviceOpt = DEFAULTS.device,
    dtype: DtypeOpt = DEFAULTS.dtype,
    system_prompt: SystemPromptOpt = DEFAULTS.system_prompt,
    trust_remote_code: TrustRemoteCodeOpt = DEFAULTS.trust_remote_code,
    backend: BackendOpt = DEFAULTS.backend,
    server_url: ServerUrlOpt = DEFAULTS.server_url,
    server_model: ServerModelOpt = DEFAULTS.server_model,
    api_key_env: ApiKeyEnvOpt = DEFAULTS.api_key_env,
    concurrency: ConcurrencyOpt = DEFAULTS.concurrency,
    async_rollouts: Annotated[
        bool, _opt("--async-rollouts", help=TRAIN_HELP["async_rollouts"])
    ] = DEFAULTS.async_rollouts,
    vllm_importance_sampling_correction: Annotated[
        bool,
        _opt(
            "--vllm-importance-sampling-correction/--no-vllm-importance-sampling-correction",
            help=TRAIN_HELP["vllm_importance_sampling_correction"],
        ),
    ] = DEFAULTS.vllm_importance_sampling_correction,
    vllm_importance_sampling_mode: Annotated[
        Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"],
        _opt("--vllm-importance-sampling-mode", help=TRAIN_HELP["vllm_importance_sampling_mode"]),
    ] = DEFAULTS.vllm_importance_sampling_mode,
    vllm_importance_sampling_clip_max: Annotated[
        float,
        _opt("--vllm-importance-sampling-clip-max", metavar="C", help=TRAIN_HELP["vllm_importance_sampling_clip_max"]),
    ] = DEFAULTS.vllm_importance_sampling_clip_max,
    seed: SeedOpt = DEFAULTS.seed,
    save_steps: Annotated[int, _opt("--save-steps", metavar="N", help=TRAIN_HELP["save_steps"])] = DEFAULTS.save_steps,
    save_total_limit: Annotated[
        int | None, _opt("--save-total-limit", metavar="N", help=TRAIN_HELP["save_total_limit"])
    ] = DEFAULTS.save_total_limit,
    logging_steps: Annotated[
        int, _opt("--logging-steps", metavar="N", help=TRAIN_HELP["logging_steps"])
    ] = DEFAULTS.logging_steps,
    resume: Annotated[bool, _opt("--resume", help="Continue from the newest checkpoint in --output-dir.")] = False,
    resume_from: Annotated[
        str | None, _opt("--resume-from", metavar="DIR|latest", help="Continue from this checkpoint folder.")
    ] = None,
    overwrite: Annotated[
        bool, _opt("--overwrite", help="Remove a run already in --output-dir and start over (else it is refused).")
    ] = False,
    report_to: Annotated[
        list[str] | None,
        _opt(
            "--report-to",
            metavar="NAME",
            help="Also send each logged step and the config to: tensorboard (into OUTPUT_DIR/tensorboard), "
            "wandb, mlflow, trackio; repeatable or comma-separated; none (the default). Each needs its package.",
        ),
    ] = None,
    merge_to: Annotated[
        str | None, _opt("--merge-to", metavar="DIR", help="Also write a merged full model for plain transformers.")
    ] = None,
    skip_invalid: SkipInvalidOpt = False,
    quiet: QuietOpt = False,
) -> None:
    with boundary():
        config = TrainConfig(
            model=model,
            algo=algo,
            reward=reward or DEFAULTS.reward,
            reward_combine=reward_combine,
            reasoning=reasoning,
            system_prompt=system_prompt,
            trust_remote_code=trust_remote_code,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules or DEFAULTS.target_modules,
            num_generations=num_generations,
            temperature=temperature,
            top_p=top_p,
            max_prompt_length=max_prompt_length,
            max_completion_length=max_completion_length,
            drop_long=drop_long,
            per_device_train_batch_size=per_device_train_batch_size,
            grad_accum=grad_accum,
            micro_batch=micro_batch,
            max_steps=max_steps,
            num_train_epochs=num_train_epochs,
            learning_rate=learning_rate,
            lr_scheduler_type=lr_scheduler_type,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            beta=beta,
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            loss_type=loss_type,
            scale_rewards=scale_rewards,
            importance_sampling_level=importance_sampling_level,
            use_bias_correction_kl=use_bias_correction_kl,
            delta=delta,
            top_entropy_quantile=top_entropy_quantile,
            num_iterations=num_iterations,
            mask_truncated=mask_truncated,
            skip_zero_std=skip_zero_std,
            device=device,
            dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
            backend=backend,
            server_url=server_url,
            server_model=server_model,
            api_key_env=api_key_env,
            concurrency=concurrency,
            async_rollouts=async_rollouts,
            vllm_importance_sampling_correction=vllm_importance_sampling_correction,
            vllm_importance_sampling_mode=vllm_importance_sampling_mode,
            vllm_importance_sampling_clip_max=vllm_importance_sampling_clip_max,
            seed=seed,
            save_steps=save_steps,
            save_total_limit=save_total_limit,
            logging_steps=logging_steps,
        )
        records = read_all_records(input, skip_invalid=skip_invalid, quiet=quiet, purpose="train on")
        if records:
            _run(
                records,
                config,
                output_dir,
                resume=resume_from or ("latest" if resume else None),
                overwrite=overwrite,
                report_to=report_to or [],
                merge_to=merge_to,
                quiet=quiet,
            )


def _run(
    records: list[dict],
    config: TrainConfig,
    output_dir: str,
    *,
    resume: str | None,
    overwrite: bool,
    report_to: list[str],
    merge_to: str | None,
    quiet: bool,
) -> None:
    from stages.core.jsonl import JsonlWriter
    from stages.train.loop import train as run_training
    from stages.train.telemetry import parse_report_to

    with JsonlWriter(None, flush_each=True, tolerate_closed_stdout=True) as stdout, StepProgress(quiet) as show:

        def on_step(record: dict) -> None:
            stdout.write(record)
            show(record)

        result = run_training(
            records,
            config,
            output_dir,
            resume=resume,
            overwrite=overwrite,
            report_to=parse_report_to(report_to),
            merge_to=merge_to,
            on_step=on_step,
            on_message=lambda m: say(m, quiet=quiet),
        )
    summary = f"done: {result.steps} steps; adapter in {result.adapter}"
    if result.metrics and "reward_mean" in result.metrics[-1]:
        first, last = result.metrics[0]["reward_mean"], result.metrics[-1]["reward_mean"]
        summary += f"; reward {first:.4f} (first step) -> {last:.4f} (last)"
    say(summary, quiet=quiet)
