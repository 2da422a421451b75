"""A step's rewarded rows packed for the loss pass: micro-batches of prompt + completion ids, the
advantages, and the log-probs the sampler recorded (stages/train/grpo.py uses them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.train.data import Rollout
from stages.train.logprobs import PackedBatch, pack
from stages.train.policy import Policy


@dataclass(frozen=True)
class MicroBatch:
    """Rows of a rollout, packed: what one forward and backward pass of an update takes."""

    rows: list[int]  # the rollout's rows, in order
    batch: PackedBatch
    advantages: torch.Tensor  # [rows]
    sampled_logp: torch.Tensor  # [rows, completion width]: recorded while sampling (the behaviour policy)


def micro_batches(
    rollout: Rollout, *, size: int, pad_id: int, device: torch.device, mask_truncated: bool
) -> list[MicroBatch]:
    """The rollout's rows that go into the loss pass (`rollout.keep`), `size` to a micro-batch; with
    `mask_truncated`, a completion cut at the length limit is left out of the loss by its mask."""
    batches = []
    for start in range(0, len(rollout.keep), size):
        rows = rollout.keep[start : start + size]
        samples = [rollout.samples[r] for r in rows]
        batch = pack(
            [rollout.prompts[r // rollout.group_size].ids for r in rows], [s.token_ids for s in samples], pad_id, device
        )
        if mask_truncated:  # a completion cut at the length limit says nothing about how it would have ended
            finished = torch.tensor([s.finished for s in samples], device=device)
            batch.completion_mask = batch.completion_mask * finished[:, None]
        sampled = torch.zeros(batch.completion_ids.shape, dtype=torch.float32)
        for i, sample in enumerate(samples):
            sampled[i, : len(sample.logprobs)] = torch.tensor(sample.logprobs)
        batches.append(MicroBatch(rows, batch, rollout.advantages[rows].to(device), sampled.to(device)))
    return batches


def idle_batch(policy: Policy) -> MicroBatch:
    """A micro-batch that adds nothing to the loss or its gradient: one padding token, masked out. A sharded
    rank with fewer micro-batches than another runs these, so that every rank runs as many forward passes."""
    device, pad = policy.device, policy.generator.pad_id
    batch = pack([[pad]], [[pad]], pad, device)
    batch.completion_mask = torch.zeros_like(batch.completion_mask)
    zero = torch.zeros(1, 1, dtype=torch.float32, device=device)
    return MicroBatch([], batch, torch.zeros(1, device=device), zero)
