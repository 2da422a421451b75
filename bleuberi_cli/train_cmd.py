"""`bleuberi train`: LoRA GRPO (or SFT) with reference-metric rewards. Its options are TrainConfig's
fields (stages/train/config.py), declared there once."""

from __future__ import annotations

from typing import Annotated

import typer

from bleuberi_cli.common import QuietOpt, StepProgress, read_all_records, say
from bleuberi_cli.config_options import cli_command
from stages.core.preflight import Output, preflight
from stages.core.records import ReadOptions
from stages.metrics import SPEC_HELP
from stages.train.config import TrainConfig

HELP = f"""Fine-tune a LoRA adapter with GRPO, rewarding each sampled completion by reference metrics.

The BLEUBERI recipe: ... | bleuberi select --mode hard -n 5000 | bleuberi train -o runs/x. Each step
samples --num-generations completions for each of its prompts, rewards them with --reward (reference
metrics, reward models, encoders, your own function; several are combined by --reward-combine), and
takes clipped policy-gradient steps with a KL penalty towards the base model (the same weights with the
adapter switched off). {SPEC_HELP}

Batch sizes count completions, as in TRL: a step samples per-device-train-batch-size x grad-accum
completions per device (that many / num-generations prompts). A step is one such rollout followed by
--num-iterations optimizer updates.

Writes to --output-dir: adapter/ (final LoRA), checkpoints/step-N/ (resumable), metrics.jsonl,
reward.png, config.json. stdout carries the same per-step metric records, so `| jq .reward_mean` works.
Ctrl-C finishes the step in progress, saves a checkpoint and stops (it says so at once); a second
Ctrl-C stops at once, losing only that step. --resume continues exactly where it stopped. Reads all records
into memory. Data parallelism: `torchrun --nproc_per_node N -m bleuberi_cli train ...` (torchrun runs a
module or a script, not the `bleuberi` command).

Rollouts: --backend transformers samples with the policy itself (exact, the default); --backend vllm
(vLLM in this process) or server (a vLLM server at --server-url, started with --enable-lora and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=1) holds the base model once, and after every optimizer step only the
LoRA adapter is saved and loaded into it under a new name. The loss's log-probs always come from the
trainer's own forward pass; metrics.jsonl logs the engine-vs-trainer drift. --async-rollouts samples
step t+1 while step t trains (one step stale, never more).

\b
Examples:
  bleuberi train -i hard.jsonl -o runs/bleu --max-steps 200
  bleuberi train -i hard.jsonl -o runs/mix --reward bleu:1 --reward rouge-l:0.5 --beta 0
  bleuberi train -i hard.jsonl -o runs/rm --reward rm:/models/Skywork-Reward-Llama-3.1-8B-v0.2
  bleuberi train -i hard.jsonl -o runs/bleu-rm --reward bleu --reward rm:/models/rm --reward-combine zscore
  bleuberi train -i hard.jsonl -o runs/think --reasoning                  # <think>/<answer> + format reward
  bleuberi train -i hard.jsonl -o runs/sft --algo sft --learning-rate 1e-4
  bleuberi train -i hard.jsonl -o runs/bleu --resume            # continue from the latest checkpoint
"""

RUN = "Run folder"


ReportToOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--report-to",
        metavar="NAME",
        help="Also send each logged step and the config to: tensorboard (into OUTPUT_DIR/tensorboard), "
        "wandb, mlflow, trackio; repeatable or comma-separated; none (the default). Each needs its package.",
        rich_help_panel=RUN,
    ),
]


@cli_command({"config": TrainConfig, "reading": ReadOptions})
def train(
    output_dir: Annotated[
        str,
        typer.Option("-o", "--output-dir", metavar="DIR", help="Run folder (created if needed).", rich_help_panel=RUN),
    ],
    config: TrainConfig,
    reading: ReadOptions,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output-dir.", rich_help_panel=RUN)
    ] = False,
    resume_from: Annotated[
        str | None,
        typer.Option(
            "--resume-from", metavar="DIR|latest", help="Continue from this checkpoint folder.", rich_help_panel=RUN
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Remove a run already in --output-dir and start over (else it is refused).",
            rich_help_panel=RUN,
        ),
    ] = False,
    report_to: ReportToOpt = None,
    merge_to: Annotated[
        str | None,
        typer.Option(
            "--merge-to",
            metavar="DIR",
            help="Also write a merged full model for plain transformers.",
            rich_help_panel=RUN,
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    resume_folder = resume_from if resume_from not in (None, "latest") else None
    needs = [spec.needs() for spec in config.rewards] if config.algorithm.samples else []
    preflight(
        inputs=[reading.input, resume_folder],
        outputs=[Output(output_dir, folder=True), Output(merge_to, "--merge-to", folder=True)],
        models=[config.model.model],
        needs=needs,
    )
    records = read_all_records(reading, quiet=quiet, purpose="train on", needed=True)
    if records:
        _run(
            records,
            config,
            output_dir,
            resume_from or ("latest" if resume else None),
            overwrite,
            report_to,
            merge_to,
            quiet,
        )


def _run(
    records: list[dict],
    config: TrainConfig,
    output_dir: str,
    resume: str | None,
    overwrite: bool,
    report_to: list[str] | None,
    merge_to: str | None,
    quiet: bool,
) -> None:
    from stages.core.jsonl import JsonlWriter
    from stages.train.loop import TrainingInterrupted
    from stages.train.loop import train as run_training
    from stages.train.telemetry import parse_report_to

    with JsonlWriter(None, flush_each=True, tolerate_closed_stdout=True) as stdout, StepProgress(quiet) as show:

        def on_step(record: dict) -> None:
            stdout.write(record)
            show(record)

        def reader_gone() -> bool:  # `| head` has its lines: stop after this step, as Ctrl-C would
            stdout.check_reader()
            return stdout.closed_stdout

        try:
            result = run_training(
                records,
                config,
                output_dir,
                resume=resume,
                overwrite=overwrite,
                report_to=parse_report_to(report_to or []),
                merge_to=merge_to,
                on_step=on_step,
                on_message=lambda m: say(m, quiet=quiet),
                should_stop=reader_gone,
            )
        except TrainingInterrupted as stopped:
            if not stdout.closed_stdout:
                raise
            say(f"the reader of stdout is gone: stopped {stopped.stopped}", quiet=quiet)
            return
    summary = f"done: {result.steps} step{'s' if result.steps != 1 else ''}; adapter in {result.adapter}"
    if result.metrics and "reward_mean" in result.metrics[-1]:
        first, last = result.metrics[0]["reward_mean"], result.metrics[-1]["reward_mean"]
        summary += f"; reward {first:.4f} (first step) -> {last:.4f} (last)"
    say(summary, quiet=quiet)
