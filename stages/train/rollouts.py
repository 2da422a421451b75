"""Sampling each step's groups, and keeping an engine of their own on the trainer's newest adapter.

An engine that samples with the live policy (the transformers engine) always has the newest weights:
nothing to publish, nothing to prefetch. An engine that holds the base model itself (vLLM in this
process, or a server) gets only the LoRA adapter after every optimizer step: saved (safetensors,
atomically) under `<run>/engine-adapters/step-N` and loaded under a new name (engines cache by name, so
a name is never reused). No merging and no full-weight transfer. The folder of the version before is
kept until the engine has moved on; older ones are removed.

With `async_rollouts`, step t+1's groups are sampled in a background thread while step t trains,
with the adapter of step t-1: one step stale, never more, because the new adapter is published only
after that sampling has finished. The update still takes its clipped ratio against the trainer's own
log-probs from before the step's first update, never the sampler's; the sampler's log-probs (the
behaviour policy) enter only through the importance weights trainer/sampler, where that correction is
on (by default for an engine of its own), and the logged drift (stages/train/grpo.py). With the option
off, sampling waits for the newest adapter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stages.core.errors import ModelError
from stages.core.files import atomic_folder
from stages.engines.base import AdapterRef, Sample, SamplingParams, derive_seed
from stages.engines.generator import Generator
from stages.train.data import StepPlan, TrainPrompt
from stages.train.distributed import Distributed
from stages.train.sharding import gathered_adapter

ADAPTERS_DIR = "engine-adapters"
# A different model differs by nats per token; the same weights through another kernel by a few 1e-3
# (fp32) to a few 1e-2 (bf16). Half a nat on average separates the two with a wide margin.
SAME_MODEL_TOLERANCE = 0.5
PROBE = [{"role": "user", "content": "Name three colours of the rainbow."}]


class Rollouts:
    """Samples G completions per prompt for each step, from the engine on the newest adapter (with async
    rollouts, on the adapter one step older: the next step is sampled while this one trains)."""

    def __init__(
        self,
        generator: Generator,
        plan: StepPlan[TrainPrompt],
        sampling: SamplingParams,
        *,
        group_size: int,
        prompts_per_batch: int,
        seed: int,
        output_dir: Path,
        dist: Distributed,
        async_rollouts: bool,
        sampling_context: Callable[[], Any],
    ) -> None:
        self.generator, self.plan, self.sampling = generator, plan, sampling
        self.group_size, self.prompts_per_batch, self.seed = group_size, prompts_per_batch, seed
        self.dist, self.sampling_context = dist, sampling_context
        self.folder = output_dir / ADAPTERS_DIR
        self.tag = hashlib.sha256(f"{output_dir.resolve()}|{os.getpid()}|{time.time()}".encode()).hexdigest()[:8]
        self.published: list[Path] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if async_rollouts else None
        self.pending: tuple[int, Future[list[Sample]]] | None = None

    @property
    def engine_of_its_own(self) -> bool:
        return not self.generator.engine.samples_with_live_policy

    def samples(self, step: int) -> list[Sample]:
        """This step's samples on this rank, group after group (prefetched, or sampled now); with async
        rollouts, start sampling the next step's."""
        if self.pending is not None and self.pending[0] == step:
            samples = self.pending[1].result()
            self.pending = None
        else:
            samples = self.sample(step)
        if self.pool is not None and step + 1 < self.plan.steps:
            self.pending = (step + 1, self.pool.submit(self.sample, step + 1))
        return samples

    def sample(self, step: int) -> list[Sample]:
        """G samples for each of this rank's prompts at `step`, seeded by (seed, step, global position, k):
        independent of the world size and of how prompts are batched."""
        picked, positions = self.plan.share(step)
        prompts = [self.plan.items[i] for i in picked]
        per_batch = self.prompts_per_batch
        samples: list[Sample] = []
        with self.sampling_context():  # autocast; a sharded policy gathered whole
            for start in range(0, len(prompts), per_batch):
                seeds = [
                    [derive_seed(self.seed, "sample", step, position, k) for k in range(self.group_size)]
                    for position in positions[start : start + per_batch]
                ]
                ids = [p.ids for p in prompts[start : start + per_batch]]
                for group in self.generator.sample_ids(ids, seeds, self.sampling):
                    samples.extend(group)
        return samples

    def connect(self, model: Any, *, first_step: int, temperature: float, say: Callable[[str], None]) -> None:
        """Check that an engine of its own serves the trainer's base model, then give it the current adapter."""
        if not self.engine_of_its_own:
            return
        name = self.generator.engine.name
        gap = check_same_base_model(model, self.generator, temperature=temperature, where=name)
        say(f"rollouts from the {name} engine (probe log-prob gap to the trainer {gap:.4f})")
        self.publish(model, first_step)

    def publish(self, model: Any, version: int) -> None:
        """Make the engine sample with the adapter as it is now (after `version` optimizer steps)."""
        if not self.engine_of_its_own:
            return
        if self.pending is not None:
            self.pending[1].result()  # the sampling in flight uses the version before: let it finish first
        folder = self.folder / f"step-{version}"
        weights = gathered_adapter(model)  # a sharded policy's LoRA, gathered by every rank (None otherwise)
        if self.dist.is_main:
            with atomic_folder(folder) as staging:
                model.save_pretrained(staging, safe_serialization=True, state_dict=weights)
        # Ranks sharing one server: every rank's sampling with the old version has finished (and the new
        # folder is written) before any rank loads the new one and unloads the old one; a rank that finds
        # the version already loaded by another just uses it.
        self.dist.barrier()
        self.generator.engine.set_adapter(AdapterRef(folder, f"bleuberi-{self.tag}-step-{version}", version))
        self.published.append(folder)
        if self.dist.is_main:
            for old in self.published[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        self.published = self.published[-2:]

    def close(self) -> None:
        if self.pending is not None:
            self.pending[1].cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.generator.close()
        if self.dist.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)


def check_same_base_model(model: Any, generator: Generator, *, temperature: float, where: str) -> float:
    """Stop unless the engine serves the trainer's base model: the log-probs of a probe completion
    sampled by the engine (adapter off) must match the trainer's own. Returns the mean difference."""
    import torch

    from stages.train.logprobs import completion_logprobs, pack

    prompt = generator.encoder.encode_messages(PROBE)
    [[probe]] = generator.sample_ids([prompt], [[derive_seed("probe")]], SamplingParams(16, temperature))
    vocab = model.get_base_model().config.vocab_size
    if not probe.token_ids or max(probe.token_ids) >= vocab or len(probe.logprobs) != len(probe.token_ids):
        raise ModelError(f"{where} returned tokens outside the trainer's vocabulary: it serves another model")
    device = next(model.parameters()).device
    batch = pack([prompt], [probe.token_ids], generator.pad_id, device)
    with torch.no_grad(), model.disable_adapter():
        trainer = completion_logprobs(model, batch, temperature)[0, : len(probe.token_ids)]
    gap = float((trainer.cpu() - torch.tensor(probe.logprobs)).abs().mean())
    if gap > SAME_MODEL_TOLERANCE:
        raise ModelError(
            f"{where} does not serve the trainer's base model: on a probe its log-probs differ from the "
            f"trainer's by {gap:.2f} nats per token on average (same weights differ by < {SAME_MODEL_TOLERANCE}); "
            "serve the same model as --model"
        )
    return gap
