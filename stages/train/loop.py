"""The `train` stage: LoRA GRPO (or SFT) on records with references.

The loop, per step (see stages/grpo.py for the math):
  1. take this step's prompts (a fresh shuffle each epoch; each rank its own share);
  2. sample G completions per prompt from the current policy (stages/sampling.py);
  3. reward each completion with the chosen metrics against the record's references;
  4. turn rewards into group-relative advantages;
  5. reference log-probs with the adapter switched off (no second model), then `num_iterations`
     clipped policy-gradient updates (stages/policy_update.py);
  6. log metrics; every `save_steps` write an atomic, resumable checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import orjson
import torch

from stages.core.errors import UsageError
from stages.engines.base import SamplingParams
from stages.engines.generator import Generator
from stages.score import Scorer
from stages.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from stages.train.config import TrainConfig
from stages.train.distributed import Distributed
from stages.train.loss import LossConfig
from stages.train.outputs import MetricsLog, plot_metrics, save_adapter, save_merged, write_json
from stages.train.rollout import prepare_prompts, step_items, total_steps
from stages.train.sft import sft_examples, sft_update
from stages.train.step import grpo_step

# Options that may differ between a run and its resumption; anything else must match.
RESUMABLE_CHANGES = {"max_steps", "save_steps", "save_total_limit", "logging_steps", "device"}


class TrainingInterrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved and the run can be resumed."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(f"interrupted; saved {checkpoint} (continue with --resume)")
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    adapter: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)


def records_digest(records: Sequence[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
        digest.update(b"\n")
    return digest.hexdigest()


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


def package_versions() -> dict[str, str]:
    found = {}
    for name in ("bleuberi", "torch", "transformers", "peft", "sacrebleu", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


@contextlib.contextmanager
def _sigint_requests_stop() -> Iterator[threading.Event]:
    """Ctrl-C sets a flag; the loop finishes the step, saves a checkpoint and stops."""
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

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _load_policy(config: TrainConfig, device: torch.device) -> tuple[Any, Generator]:
    from peft import LoraConfig, get_peft_model

    from stages.core.models import load_model, load_tokenizer, resolve_dtype, resolve_model

    resolved = resolve_model(config.model)
    tokenizer = load_tokenizer(resolved, trust_remote_code=config.trust_remote_code)
    base = load_model(
        resolved, device=device, dtype=resolve_dtype(config.dtype, device), trust_remote_code=config.trust_remote_code
    )
    targets: str | list[str] = "all-linear" if config.target_modules == ["all-linear"] else config.target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    gradient_checkpointing = (
        device.type == "cuda" if config.gradient_checkpointing is None else config.gradient_checkpointing
    )
    if gradient_checkpointing:
        base_model = model.get_base_model()
        if hasattr(base_model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    generator = Generator.for_model(model, tokenizer, model_name=config.model, system_prompt=config.system_prompt)
    return model, generator


def _check_resume_config(output_dir: Path, config: TrainConfig, digest: str) -> None:
    saved_path = output_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    before, now = saved.get("config", {}), config.to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k, now[k]) != now[k])
    if changed:
        raise UsageError(f"cannot resume with different settings: {', '.join(changed)} (see {saved_path})")
    if saved.get("input", {}).get("sha256") not in (None, digest):
        raise UsageError("cannot resume on different training data (input hash differs from config.json)")


def train(
    records: Sequence[dict[str, Any]],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    resume: str | None = None,
    merge_to: str | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on normalised records; returns where the adapter went."""
    from stages.core.models import resolve_device

    say = on_message or (lambda message: None)
    output_dir = Path(output_dir)
    device = resolve_device(config.device)
    dist = Distributed.from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    digest = records_digest(records)
    if resume:
        _check_resume_config(output_dir, config, digest)
    torch.manual_seed(config.seed)

    start = time.perf_counter()
    model, generator = _load_policy(config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    prompts, report = prepare_prompts(records, generator.encoder, config.max_prompt_length, config.drop_long)
    if report.truncated or report.dropped:
        say(
            f"prompts over {config.max_prompt_length} tokens: {report.truncated} cut from the left, "
            f"{report.dropped} dropped"
        )
    items = sft_examples(prompts, generator, config.max_completion_length) if config.algo == "sft" else prompts
    per_step_global = config.prompts_per_step * dist.world_size
    steps = total_steps(len(items), per_step_global, config.num_train_epochs, config.max_steps)
    first_step = 0
    if resume:
        checkpoint = find_checkpoint(output_dir, resume)
        first_step = load_checkpoint(checkpoint, model=model, optimizer=optimizer, params=params).step
        say(f"resumed from {checkpoint} at step {first_step}")
    trainable = sum(p.numel() for p in params)
    say(
        f"{config.algo.upper()} on {len(items)} {'examples' if config.algo == 'sft' else 'prompts'}: {steps} steps, "
        f"{trainable / 1e6:.2f}M trainable parameters, {device}, world size {dist.world_size}, "
        f"setup {time.perf_counter() - start:.1f}s"
    )
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            output_dir / "config.json",
            {
                "config": config.to_dict(),
                "input": {
                    "sha256": digest,
                    "records": len(records),
                    "prompts_kept": report.kept,
                    "prompts_truncated": report.truncated,
                    "prompts_dropped": report.dropped,
                },
                "total_steps": steps,
                "world_size": dist.world_size,
                "device": str(device),
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "trainable_parameters": trainable,
                "packages": package_versions(),
            },
        )
    log = MetricsLog(output_dir / "metrics.jsonl", enabled=dist.is_main, first_step=first_step)
    scorer = Scorer.from_names(config.reward)
    loss_config = LossConfig(
        config.beta, config.epsilon, config.eps_high, config.loss_type, config.importance_sampling_level
    )
    params_sampling = SamplingParams(config.max_completion_length, config.temperature, config.top_p)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
        else contextlib.nullcontext
    )

    with _sigint_requests_stop() as stop_requested:
        for step in range(first_step, steps):
            t0 = time.perf_counter()
            lr = lr_at(step, steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            global_positions = list(range(step * per_step_global, (step + 1) * per_step_global))
            mine = global_positions[dist.rank * config.prompts_per_step : (dist.rank + 1) * config.prompts_per_step]
            picked = step_items(step, per_step_global, len(items), config.seed)
            picked = picked[dist.rank * config.prompts_per_step : (dist.rank + 1) * config.prompts_per_step]
            if config.algo == "sft":
                metrics = sft_update(
                    model,
                    params,
                    optimizer,
                    [items[i] for i in picked],
                    config=config,
                    dist=dist,
                    device=device,
                    pad_id=generator.pad_id,
                    autocast=autocast,
                )
            else:
                metrics = grpo_step(
                    model,
                    generator,
                    scorer,
                    params,
                    optimizer,
                    [prompts[i] for i in picked],
                    mine,
                    step=step,
                    config=config,
                    loss_config=loss_config,
                    params_sampling=params_sampling,
                    dist=dist,
                    device=device,
                    autocast=autocast,
                )
            metrics = {
                "step": step + 1,
                "epoch": round((step + 1) * per_step_global / len(items), 4),
                "lr": lr,
                **metrics,
                "seconds": round(time.perf_counter() - t0, 4),
            }
            if (step + 1) % config.logging_steps == 0 or step + 1 == steps:
                log.write(metrics)
                if on_metrics and dist.is_main:
                    on_metrics(metrics)
            interrupted = stop_requested.is_set()
            if (step + 1) % config.save_steps == 0 or step + 1 == steps or interrupted:
                checkpoint = output_dir / "checkpoints" / f"step-{step + 1}"
                if dist.is_main:
                    save_checkpoint(
                        output_dir / "checkpoints",
                        step=step + 1,
                        model=model,
                        optimizer=optimizer,
                        params=params,
                        extra={"total_steps": steps},
                        keep_last=config.save_total_limit,
                    )
                dist.barrier()
                if interrupted:
                    raise TrainingInterrupted(checkpoint)

    adapter = output_dir / "adapter"
    if dist.is_main:
        save_adapter(model, generator.tokenizer, adapter)
        plot_metrics(log.path, output_dir / "reward.png", say)
        if merge_to:
            save_merged(model, generator.tokenizer, Path(merge_to))
            say(f"merged model written to {merge_to}")
    dist.barrier()
    dist.close()
    return TrainResult(output_dir, steps, adapter, log.records)
