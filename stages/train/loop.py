"""The `train` stage: LoRA GRPO (or SFT) on records with references. It reads top to bottom: set-up
(stages/train/setup.py), then the step loop, then the outputs.

One GRPO step is one page, stages/train/grpo.py (the math is in stages/train/loss.py):
  1. take this step's prompts (a fresh shuffle each epoch; each rank its own share) and sample G
     completions per prompt from the current policy or an engine on its newest adapter;
  2-3. reward each completion with the chosen metrics against the record's references, and turn the
     rewards into group-relative advantages;
  4. micro-batches of the rows that count;
  5. once, before any update: reference log-probs with the adapter scaled to zero (no second model);
  6. `num_iterations` clipped policy-gradient updates; the first one's own forward passes fix the
     trainer's old log-probs (the ratio's old policy) and the importance weights trainer/sampler for all;
  7. publish the adapter to an engine of its own; 8. the step's record.
An SFT step is `sft_update` (stages/train/sft.py). Every `save_steps` the loop writes an atomic, resumable
checkpoint."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.core.errors import Interrupted, add_note
from stages.core.files import remove_leftovers
from stages.core.lock import folder_lock
from stages.metrics.python import RewardFunctionError
from stages.train.checkpoint import save_checkpoint
from stages.train.config import TrainConfig
from stages.train.distributed import require_launcher
from stages.train.grpo import grpo_step
from stages.train.outputs import StepLog, plot_metrics, save_adapter, save_merged, save_merged_from_disk
from stages.train.setup import TrainRun, set_up
from stages.train.sft import sft_update
from stages.train.sharding import gathered_adapter
from stages.train.telemetry import Telemetry, check_installed


class TrainingInterrupted(Interrupted):
    """Ctrl-C during training: a checkpoint was saved and the run can be resumed, or the checkpoint used as
    it is (it is a PEFT adapter folder)."""

    def __init__(self, checkpoint: Path, step: int, total: int) -> None:
        self.stopped = f"at step {step} of {total}; saved {checkpoint}: {checkpoint_use(checkpoint)}"
        super().__init__(f"interrupted {self.stopped}")
        self.checkpoint = checkpoint


def checkpoint_use(checkpoint: Path) -> str:
    """What an unfinished run's newest checkpoint is good for (the run's adapter/ is written only at its end)."""
    return f"continue with --resume, or use it as it is with --adapter {checkpoint}"


def newest_checkpoint_note(output_dir: Path) -> str:
    """What a run stopped at once (a second Ctrl-C) leaves: its newest checkpoint, if it saved one."""
    from stages.train.checkpoint import list_checkpoints

    saved = list_checkpoints(output_dir / "checkpoints")
    if not saved:
        return f"no checkpoint saved yet in {output_dir}: rerun to start over"
    return f"the newest checkpoint is {saved[-1]}: {checkpoint_use(saved[-1])}"


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    adapter: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """The learning rate for a step (0-based): linear warmup, then constant, linear or cosine decay."""
    warmup = math.ceil(config.warmup_ratio * total)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    if config.lr_scheduler_type == "constant_with_warmup":
        return config.learning_rate
    progress = (step - warmup) / max(1, total - warmup)
    if config.lr_scheduler_type == "linear":
        return config.learning_rate * (1.0 - progress)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextlib.contextmanager
def sigint_requests_stop(notice: Callable[[], str] | None = None) -> Iterator[threading.Event]:
    """Ctrl-C sets a flag and at once writes `notice()` to stderr; the loop finishes the step, saves a
    checkpoint and stops. A second Ctrl-C stops at once (KeyboardInterrupt): the step in progress is lost,
    the checkpoints saved before it are kept."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.set()
        if notice:  # now, not when the step ends (a step can take minutes); os.write: no buffered stream reentered
            with contextlib.suppress(OSError):
                os.write(2, f"{notice()}\n".encode())

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def train(
    records: Sequence[dict[str, Any]],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    report_to: Sequence[str] = (),
    merge_to: str | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_message: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on normalised records; returns where the adapter went. `should_stop()`, asked after
    each step, ends the run there as Ctrl-C does (a checkpoint, then TrainingInterrupted): the CLI's stdout
    reader leaving."""
    say = on_message or (lambda message: None)
    for warning in config.warnings():
        say(f"warning: {warning}")
    output_dir = Path(output_dir)
    if config.parallel == "fsdp":
        require_launcher()  # before the folder is made
    # One run per folder; under torchrun only rank 0 locks (every rank shares the folder).
    main_rank = os.environ.get("RANK", "0") == "0"
    with folder_lock(output_dir) if main_rank else contextlib.nullcontext():
        check_installed(report_to)
        run = set_up(records, config, output_dir, resume=resume, say=say, overwrite=overwrite)
        telemetry = Telemetry(report_to if main_rank else (), output_dir, config.to_dict())

        def logged(record: dict[str, Any]) -> None:  # each logged step: the trackers, then the caller
            telemetry.log(record)
            if on_step:
                on_step(record)

        try:
            result = _train(run, merge_to=merge_to, on_step=logged, say=say, should_stop=should_stop)
        except KeyboardInterrupt as stopped:  # a second Ctrl-C: the step in progress is lost, the checkpoints are not
            add_note(stopped, newest_checkpoint_note(output_dir))
            raise
        finally:
            telemetry.close()
            run.rollouts.close()
        if main_rank:  # a finished run removes what killed attempts left behind
            for folder in (output_dir, output_dir / "checkpoints"):
                remove_leftovers(folder)
        return result


def _train(
    run: TrainRun,
    *,
    merge_to: str | None,
    on_step: Callable[[dict[str, Any]], None] | None,
    say: Callable[[str], None],
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """The step loop, then the outputs."""
    config = run.config
    log = StepLog(run.output_dir / "metrics.jsonl", enabled=run.dist.is_main, first_step=run.first_step)
    steps = run.plan.steps
    current = [run.first_step + 1]
    notice = f"bleuberi: Ctrl-C: finishing step {{}} of {steps}, then saving a checkpoint; Ctrl-C again to stop now"
    with sigint_requests_stop((lambda: notice.format(current[0])) if run.dist.is_main else None) as stop_requested:
        for step in range(run.first_step, steps):
            current[0] = step + 1
            try:
                record = train_step(run, step)
            except RewardFunctionError as error:
                raise _reward_failed(run, step, error) from error
            if (step + 1) % config.logging_steps == 0 or step + 1 == steps:
                log.write(record)
                if on_step and run.dist.is_main:
                    on_step(record)
            interrupted = stop_requested.is_set() or bool(should_stop and should_stop())
            if (step + 1) % config.save_steps == 0 or step + 1 == steps or interrupted:
                checkpoint = _save_checkpoint(run, step + 1)
                if interrupted:
                    raise TrainingInterrupted(checkpoint, step + 1, steps)

    adapter = _write_outputs(run, log.path, merge_to, say)
    run.dist.barrier()
    run.dist.close()
    return TrainResult(run.output_dir, steps, adapter, log.records)


def _write_outputs(run: TrainRun, metrics: Path, merge_to: str | None, say: Callable[[str], None]) -> Path:
    """adapter/, reward.png and the merged model, written by rank 0 (a sharded policy's LoRA is first
    gathered by every rank)."""
    adapter = run.output_dir / "adapter"
    model, tokenizer, config = run.policy.model, run.policy.generator.tokenizer, run.config
    weights = gathered_adapter(model)  # None unless sharded
    if not run.dist.is_main:
        return adapter
    save_adapter(model, tokenizer, adapter, model_name=config.model.model, state_dict=weights)
    plot_metrics(metrics, run.output_dir / "reward.png", say)
    if merge_to:
        if weights is None:
            save_merged(model, tokenizer, Path(merge_to))
        else:  # no rank holds the sharded policy whole: merge into the base loaded again
            base, remote = config.model.model, config.model.trust_remote_code
            save_merged_from_disk(model, tokenizer, Path(merge_to), base=base, adapter=adapter, remote=remote)
        say(f"merged model written to {merge_to}")
    return adapter


def train_step(run: TrainRun, step: int) -> dict[str, Any]:
    """One optimizer step (GRPO rollout + update, or an SFT batch); returns its metrics record."""
    t0 = time.perf_counter()
    lr = lr_at(step, run.plan.steps, run.config)
    for group in run.policy.optimizer.param_groups:
        group["lr"] = lr
    if run.config.algo == "sft":
        examples = run.plan.items_at(step)
        metrics = sft_update(run.policy, examples, config=run.config, dist=run.dist)  # type: ignore[arg-type]
    else:
        metrics = grpo_step(run, step)
    return {
        "step": step + 1,
        "total_steps": run.plan.steps,
        "epoch": run.plan.epoch_after(step),
        "lr": lr,
        **metrics,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def _reward_failed(run: TrainRun, step: int, error: RewardFunctionError) -> RewardFunctionError:
    """A `py:` reward failed during `step` (0-based), before the update: the steps finished so far are
    saved, so the run resumes exactly where it stopped once the function is fixed."""
    if step == 0:
        return RewardFunctionError(f"{error}; stopped at step 1, nothing trained yet: fix the function, then rerun")
    checkpoint = _save_checkpoint(run, step)
    return RewardFunctionError(
        f"{error}; stopped at step {step + 1}, "
        + ("the step before it is" if step == 1 else f"the {step} steps before it are")
        + f" saved in {checkpoint}: fix the function, then rerun with --resume"
    )


def _save_checkpoint(run: TrainRun, step: int) -> Path:
    folder = run.output_dir / "checkpoints"
    save_checkpoint(  # every rank: a sharded policy is gathered by all of them; rank 0 writes
        folder,
        step=step,
        model=run.policy.model,
        optimizer=run.policy.optimizer,
        trainable=run.policy.trainable,
        # the run's own record of its settings and data, which --resume checks against
        extra={"total_steps": run.plan.steps, "config": run.config.to_dict(), "input_sha256": run.input_digest},
        keep_last=run.config.save_total_limit,
        write=run.dist.is_main,
    )
    run.dist.barrier()
    return folder / f"step-{step}"
