"""Everything a training run needs before its first step: the policy, the optimizer, the prompts,
the step count, a resumed checkpoint, and the run's record in config.json."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import orjson
import torch

from stages.engines.base import SamplingParams
from stages.engines.generator import Generator
from stages.score import Scorer
from stages.train.checkpoint import find_checkpoint, load_checkpoint
from stages.train.config import TrainConfig
from stages.train.distributed import Distributed
from stages.train.engine_sync import RolloutEngine, check_same_base_model
from stages.train.loss import LossConfig
from stages.train.outputs import write_json
from stages.train.rollout import PromptReport, TrainPrompt, prepare_prompts, step_items, total_steps
from stages.train.run_folder import check_resume, prepare_fresh_run
from stages.train.sft import SftExample, sft_examples


@dataclass
class TrainRun:
    """A run ready for its first step."""

    config: TrainConfig
    output_dir: Path
    device: torch.device
    dist: Distributed
    model: Any  # the PEFT-wrapped policy
    generator: Generator
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    prompts: list[TrainPrompt]
    items: list[TrainPrompt] | list[SftExample]  # what a step draws from: prompts (GRPO) or examples (SFT)
    steps: int
    first_step: int
    scorer: Scorer
    loss_config: LossConfig
    sampling: SamplingParams
    autocast: Callable[[], contextlib.AbstractContextManager[None]]
    rollouts: RolloutEngine
    input_digest: str = ""  # the records' hash, recorded in every checkpoint

    @property
    def per_step_global(self) -> int:
        return self.config.prompts_per_step * self.dist.world_size

    def step_share(self, step: int) -> tuple[list[int], list[int]]:
        """This rank's item indices at `step`, and their positions in the global order (which seed sampling)."""
        per_step, share = self.per_step_global, self.config.prompts_per_step
        mine = slice(self.dist.rank * share, (self.dist.rank + 1) * share)
        picked = step_items(step, per_step, len(self.items), self.config.seed)[mine]
        return picked, list(range(step * per_step, (step + 1) * per_step))[mine]


def set_up(
    records: Sequence[dict[str, Any]],
    config: TrainConfig,
    output_dir: Path,
    *,
    resume: str | None,
    say: Callable[[str], None],
    overwrite: bool = False,
) -> TrainRun:
    device, dist = _placement(config.device)
    digest = records_digest(records)
    checkpoint = None
    if resume:
        checkpoint = find_checkpoint(output_dir, resume)
        check_resume(checkpoint, output_dir, config.to_dict(), digest)
    elif dist.is_main:
        prepare_fresh_run(output_dir, overwrite=overwrite)
    torch.manual_seed(config.seed)  # before the LoRA weights are drawn

    start = time.perf_counter()
    model, generator = _load_policy(config, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    prompts, report = prepare_prompts(records, generator.encoder, config.max_prompt_length, config.drop_long)
    if report.truncated or report.dropped:
        say(
            f"prompts over {config.max_prompt_length} tokens: {report.truncated} cut from the left, "
            f"{report.dropped} dropped"
        )
    items = sft_examples(prompts, generator, config.max_completion_length) if config.algo == "sft" else prompts
    steps = total_steps(
        len(items), config.prompts_per_step * dist.world_size, config.num_train_epochs, config.max_steps
    )
    first_step = 0
    if checkpoint is not None:
        first_step = load_checkpoint(checkpoint, model=model, optimizer=optimizer, trainable=trainable).step
        say(f"resumed from {checkpoint} at step {first_step}")
    count = sum(p.numel() for p in trainable)
    say(
        f"{config.algo.upper()} on {len(items)} {'examples' if config.algo == 'sft' else 'prompts'}: {steps} steps, "
        f"{count / 1e6:.2f}M trainable parameters, {device}, world size {dist.world_size}, "
        f"setup {time.perf_counter() - start:.1f}s"
    )
    run = TrainRun(
        config=config,
        output_dir=output_dir,
        device=device,
        dist=dist,
        model=model,
        generator=generator,
        trainable=trainable,
        optimizer=optimizer,
        prompts=prompts,
        items=items,
        steps=steps,
        first_step=first_step,
        scorer=config.scorer(str(device)),
        loss_config=config.loss_config(),
        sampling=SamplingParams(config.max_completion_length, config.temperature, config.top_p),
        autocast=_autocast(model, device),
        rollouts=RolloutEngine(generator, output_dir, dist, async_rollouts=config.async_rollouts),
        input_digest=digest,
    )
    if run.rollouts.external and config.algo == "grpo":
        _connect_engine(run, say)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "config.json", _run_record(run, records, digest, report))
    return run


def _placement(device_name: str) -> tuple[torch.device, Distributed]:
    """The device this process trains on: under torchrun each CUDA process takes its local rank's GPU."""
    from stages.core.models import resolve_device

    device = resolve_device(device_name)
    dist = Distributed.from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device, dist


def _connect_engine(run: TrainRun, say: Callable[[str], None]) -> None:
    """Check that the rollout engine serves the trainer's base model, then give it the current adapter."""
    engine = run.generator.engine.name
    gap = check_same_base_model(run.model, run.generator, temperature=run.config.temperature, where=engine)
    say(f"rollouts from the {engine} engine (probe log-prob gap to the trainer {gap:.4f})")
    run.rollouts.publish(run.model, run.first_step)


def _autocast(model: Any, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[None]]:
    if device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _run_record(run: TrainRun, records: Sequence[dict[str, Any]], digest: str, report: PromptReport) -> dict[str, Any]:
    """config.json: the settings, the data's hash and counts, the hardware and the package versions."""
    return {
        "config": run.config.to_dict(),
        "input": {
            "sha256": digest,
            "records": len(records),
            "prompts_kept": report.kept,
            "prompts_truncated": report.truncated,
            "prompts_dropped": report.dropped,
        },
        "total_steps": run.steps,
        "world_size": run.dist.world_size,
        "device": str(run.device),
        "dtype": str(next(run.model.parameters()).dtype).replace("torch.", ""),
        "trainable_parameters": sum(p.numel() for p in run.trainable),
        "packages": package_versions(),
    }


def records_digest(records: Sequence[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
        digest.update(b"\n")
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    found = {}
    for name in ("bleuberi", "torch", "transformers", "peft", "sacrebleu", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


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
    generator = Generator.for_model(
        model, tokenizer, model_name=config.model, system_prompt=config.resolved_system_prompt()
    )
    if config.backend != "transformers":
        generator = _engine_generator(config, resolved.path, generator)
    return model, generator


def _engine_generator(config: TrainConfig, model_path: str, local: Generator) -> Generator:
    """The trainer's tokenizer and prompts, with rollouts from vLLM or a server holding the base model."""
    from stages.engines.base import lora_rank_slot
    from stages.engines.generator import EngineOptions, make_engine

    options = EngineOptions(
        config.backend, config.server_url, config.server_model, config.api_key_env, config.concurrency
    )
    engine = make_engine(
        options,
        model_path=model_path,
        stop_ids=local.stop_ids,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        max_lora_rank=lora_rank_slot(config.lora_r),
    )
    return Generator(
        local.tokenizer, engine, local.stop_ids, config.model, None, local.system_prompt, local.max_prompt_length
    )
