"""Everything a training run needs before its first step: the policy, the prompts and the step plan,
a resumed checkpoint, the rollout engine, and the run's record in config.json."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch

from stages.core.threads import ThreadBudget, apply_thread_budget, engine_competes
from stages.core.versions import package_versions
from stages.score import Scorer
from stages.train.checkpoint import find_checkpoint, load_checkpoint
from stages.train.config import TrainConfig
from stages.train.data import PromptReport, SftExample, StepPlan, TrainPrompt, prepare_prompts, total_steps
from stages.train.distributed import Distributed
from stages.train.outputs import write_json
from stages.train.policy import Policy, load_policy
from stages.train.rollouts import Rollouts
from stages.train.run_folder import check_resume, prepare_fresh_run
from stages.train.sft import sft_examples

TRAINING_PACKAGES = ("bleuberi", "torch", "transformers", "peft", "sacrebleu", "safetensors")


@dataclass
class TrainRun:
    """A run ready for its first step."""

    config: TrainConfig
    output_dir: Path
    dist: Distributed
    policy: Policy
    plan: StepPlan[TrainPrompt] | StepPlan[SftExample]  # what the steps draw from, on this rank
    first_step: int
    scorer: Scorer
    rollouts: Rollouts
    input_digest: str = ""  # the records' hash, recorded in every checkpoint
    threads: ThreadBudget | None = None  # this process's intra-op threads, and why


def set_up(
    records: Sequence[dict[str, Any]],
    config: TrainConfig,
    output_dir: Path,
    *,
    resume: str | None,
    say: Callable[[str], None],
    overwrite: bool = False,
) -> TrainRun:
    device, dist = _placement(config.model.device, sharded=config.parallel == "fsdp")
    digest = records_digest(records)
    checkpoint = None
    if resume:
        checkpoint = find_checkpoint(output_dir, resume)
        check_resume(checkpoint, output_dir, config.to_dict(), digest)
    elif dist.is_main:
        prepare_fresh_run(output_dir, overwrite=overwrite)
    threads = _thread_budget(config, device, say)  # said once the run is sure to start: a refusal is one line
    torch.manual_seed(config.seed)  # before the LoRA weights are drawn

    start = time.perf_counter()
    policy = load_policy(config, device, dist)
    plan, report = _plan(records, config, policy, dist, say)
    first_step = 0
    if checkpoint is not None:
        first_step = load_checkpoint(
            checkpoint, model=policy.model, optimizer=policy.optimizer, trainable=policy.trainable
        ).step
        say(f"resumed from {checkpoint} at step {first_step}")
    count = sum(p.numel() for p in policy.trainable)
    algorithm = config.algorithm
    say(
        f"{algorithm.name.upper()} on {len(plan.items)} {algorithm.noun}: "
        f"{plan.steps} step{'' if plan.steps == 1 else 's'}, {count / 1e6:.2f}M trainable parameters, {device}, "
        f"{dtype_note(config.model.dtype, policy.dtype)}, world size {dist.world_size}, "
        f"setup {time.perf_counter() - start:.1f}s"
    )
    rollouts = _rollouts(config, policy, plan, output_dir, dist)
    if algorithm.samples:
        rollouts.connect(policy.model, first_step=first_step, temperature=config.sampling.temperature, say=say)
    scorer = config.scorer.to(str(device))  # the reward's models load where the policy is
    run = TrainRun(config, output_dir, dist, policy, plan, first_step, scorer, rollouts, digest, threads)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "config.json", _run_record(run, records, report))
    return run


def _plan(
    records: Sequence[dict[str, Any]],
    config: TrainConfig,
    policy: Policy,
    dist: Distributed,
    say: Callable[[str], None],
) -> tuple[StepPlan[Any], PromptReport]:
    """The prompts (GRPO) or examples (SFT), and how many of them each step takes on each rank."""
    generator = policy.generator
    prompts, report = prepare_prompts(records, generator.encoder)
    for line in generator.encoder.cuts.lines():
        say(line)
    # GRPO samples the prompts themselves; SFT imitates one reference answer per example
    items: list[Any] = prompts
    if config.algo == "sft":
        items = sft_examples(prompts, generator, config.sampling.max_new_tokens)
    dist.check_split(len(items), config.prompts_per_step, config.algorithm.noun)
    steps = total_steps(
        len(items), config.prompts_per_step * dist.world_size, config.num_train_epochs, config.max_steps
    )
    return StepPlan(items, config.prompts_per_step, dist.rank, dist.world_size, config.seed, steps), report


def _rollouts(
    config: TrainConfig, policy: Policy, plan: StepPlan[Any], output_dir: Path, dist: Distributed
) -> Rollouts:
    return Rollouts(
        policy.generator,
        plan,
        config.sampling,
        group_size=config.num_generations,
        prompts_per_batch=max(1, config.per_device_train_batch_size // config.num_generations),
        seed=config.seed,
        output_dir=output_dir,
        dist=dist,
        async_rollouts=config.async_rollouts,
        sampling_context=_sampling_context(config, policy),
    )


def _sampling_context(config: TrainConfig, policy: Policy) -> Callable[[], AbstractContextManager[None]]:
    """What sampling runs under: the policy's autocast, and under --parallel fsdp (by default) the sharded
    policy gathered whole for the round, when the engine samples with it (stages/train/sharding.py)."""
    if not (
        config.parallel == "fsdp" and config.gather_for_sampling and policy.generator.engine.samples_with_live_policy
    ):
        return policy.autocast
    from stages.train.sharding import whole_while_sampling

    @contextmanager
    def gathered() -> Iterator[None]:
        with whole_while_sampling(policy.model), policy.autocast():
            yield

    return gathered


def dtype_note(asked: str, picked: torch.dtype) -> str:
    """The base weights' dtype as the log says it: `float32`, or `float32 (auto)` when auto chose it."""
    name = str(picked).removeprefix("torch.")
    return f"{name} (auto)" if asked == "auto" else name


def _placement(device_name: str, *, sharded: bool = False) -> tuple[torch.device, Distributed]:
    """The device this process trains on: under torchrun each CUDA process takes its local rank's GPU."""
    from stages.core.models import resolve_device

    device = resolve_device(device_name)
    dist = Distributed.from_env(device.type, sharded=sharded)
    if (dist.enabled or dist.sharded) and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device, dist


def _thread_budget(config: TrainConfig, device: torch.device, say: Callable[[str], None]) -> ThreadBudget:
    """Before the model loads: the threads this process trains with (a local engine that samples while it
    trains gets its share; see stages/core/threads.py)."""
    engine = config.engine
    concurrent = config.algorithm.samples and config.async_rollouts
    local = engine_competes(engine.backend, engine.server_url, device.type, concurrent)
    return apply_thread_budget(config.model.threads, local_engine=local, say=say)


def _run_record(run: TrainRun, records: Sequence[dict[str, Any]], report: PromptReport) -> dict[str, Any]:
    """config.json: the settings, the data's hash and counts, the hardware and the package versions."""
    return {
        "config": run.config.to_dict(),
        "input": {
            "sha256": run.input_digest,
            "records": len(records),
            "prompts_kept": report.kept,
            "prompts_cut": report.cut,  # ids: over max_prompt_length, cut as long_prompts says
            "prompts_skipped": report.skipped,  # ids: over it, left out (long_prompts skip)
        },
        "total_steps": run.plan.steps,
        "world_size": run.dist.world_size,
        "device": str(run.policy.device),
        "dtype": str(run.policy.dtype).replace("torch.", ""),
        "threads": run.threads.to_dict() if run.threads else None,
        "trainable_parameters": sum(p.numel() for p in run.policy.trainable),
        "packages": package_versions(TRAINING_PACKAGES),
        # each reward's signature: its settings, and for a py: reward its file's content hash
        "reward_signatures": run.scorer.info()["signatures"] if run.config.algorithm.samples else {},
    }


def records_digest(records: Sequence[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
        digest.update(b"\n")
    return digest.hexdigest()
