"""Rollouts from an engine of their own (vLLM in this process, or a server), kept on the newest adapter.

After every optimizer step the trainer saves only the LoRA adapter (safetensors, atomically) under
`<run>/engine-adapters/step-N` and tells the engine to sample with it under a new name (engines cache
by name, so a name is never reused). No merging and no full-weight transfer. The folder of the version
before is kept until the engine has moved on; older ones are removed.

With `async_rollouts`, step t+1's groups are sampled in a background thread while step t trains,
with the adapter of step t-1: one step stale, never more, because the new adapter is published only
after that sampling has finished. The update then takes its clipped ratio against the sampler's
log-probs (the behaviour policy). With the option off, sampling waits for the newest adapter.

The transformers engine samples with the live policy itself: nothing to publish, nothing to prefetch.
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
from stages.train.distributed import Distributed

ADAPTERS_DIR = "engine-adapters"
# A different model differs by nats per token; the same weights through another kernel by a few 1e-3
# (fp32) to a few 1e-2 (bf16). Half a nat on average separates the two with a wide margin.
SAME_MODEL_TOLERANCE = 0.5
PROBE = [{"role": "user", "content": "Name three colours of the rainbow."}]

Sampler = Callable[[int], list[Sample]]  # step -> this rank's samples for that step


class RolloutEngine:
    """Samples each step's groups and keeps the engine on the trainer's newest adapter."""

    def __init__(self, generator: Generator, output_dir: Path, dist: Distributed, *, async_rollouts: bool) -> None:
        self.generator = generator
        self.folder = output_dir / ADAPTERS_DIR
        self.dist = dist
        self.async_rollouts = async_rollouts
        self.external = generator.engine.name != "transformers"
        tag = f"{output_dir.resolve()}|{os.getpid()}|{time.time()}"
        self.tag = hashlib.sha256(tag.encode()).hexdigest()[:8]
        self.published: list[Path] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if async_rollouts else None
        self.pending: tuple[int, Future[list[Sample]]] | None = None

    def samples(self, step: int, sample: Sampler, *, last_step: int) -> list[Sample]:
        """This step's samples (prefetched, or sampled now); with async rollouts, start the next step's."""
        if self.pending is not None and self.pending[0] == step:
            samples = self.pending[1].result()
            self.pending = None
        else:
            samples = sample(step)
        if self.pool is not None and step + 1 < last_step:
            self.pending = (step + 1, self.pool.submit(sample, step + 1))
        return samples

    def publish(self, model: Any, version: int) -> None:
        """Make the engine sample with the adapter as it is now (after `version` optimizer steps)."""
        if not self.external:
            return
        if self.pending is not None:
            self.pending[1].result()  # the sampling in flight uses the version before: let it finish first
        folder = self.folder / f"step-{version}"
        if self.dist.is_main:
            with atomic_folder(folder) as staging:
                model.save_pretrained(staging, safe_serialization=True)
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
