"""Data parallelism with plain torch.distributed: launched by `torchrun`, a no-op otherwise.

Each rank samples and scores its own share of the prompts; groups never straddle ranks. After the
backward passes, the LoRA gradients (small: a few million numbers) are summed across ranks in one
all-reduce (`--parallel ddp`), or reduce-scattered by FSDP after each rank's last micro-batch
(`--parallel fsdp`, stages/train/sharding.py). Loss denominators are global counts, so the summed gradient is exactly
the gradient of the whole batch. Only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stages.core.errors import UsageError

# What torchrun (and any launcher that follows its protocol) sets in every process it starts.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def require_launcher() -> None:
    """`--parallel fsdp` runs only in processes torchrun started (one process: --nproc_per_node 1)."""
    if not all(name in os.environ for name in LAUNCHER_VARIABLES):
        raise UsageError(
            "--parallel fsdp needs torchrun to start the processes: torchrun --nproc_per_node N "
            "-m bleuberi_cli train ... (N=1 for one process)"
        )


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sharded: bool = False  # FSDP: every forward pass is collective, gradients are reduced by FSDP

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str, *, sharded: bool = False) -> Distributed:
        """The ranks torchrun started (a process group even for one rank when sharded: FSDP needs one)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if sharded:
            require_launcher()
        if world <= 1 and not sharded:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend)
        return cls(rank, world, local_rank, sharded)

    def check_split(self, items: int, per_rank: int, what: str) -> None:
        """Each step gives every rank its own `per_rank` items: the data must hold one step's worth."""
        if self.world_size > 1 and items < per_rank * self.world_size:
            raise UsageError(
                f"{items} {what} cannot be split over {self.world_size} ranks: each step gives every rank "
                f"{per_rank} of its own ({per_rank * self.world_size} in all); lower "
                "--per-device-train-batch-size or start fewer processes"
            )

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of a few numbers over ranks."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def mean_std(self, values: Sequence[float], device: torch.device) -> tuple[float, float]:
        """Mean and unbiased standard deviation of numbers spread over the ranks (0, 0 for none)."""
        total, total_sq, count = self.sum([sum(values), sum(v * v for v in values), float(len(values))], device)
        if count == 0:
            return 0.0, 0.0
        mean = total / count
        variance = max(total_sq - total * mean, 0.0) / (count - 1) if count > 1 else 0.0
        return mean, math.sqrt(variance)

    def max(self, value: float, device: torch.device) -> float:
        """The largest of one number over ranks."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    def sum_gradients(self, trainable: list[torch.nn.Parameter]) -> None:
        """DDP: sum each LoRA gradient over the ranks (sharded parameters' gradients FSDP has reduced already)."""
        from torch.distributed.tensor import DTensor

        trainable = [p for p in trainable if not isinstance(p, DTensor)]
        if not self.enabled or not trainable:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(trainable, grads):
            count = grad.numel()
            param.grad = flat[offset : offset + count].view_as(grad).to(grad.dtype)
            offset += count

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if (self.enabled or self.sharded) and dist.is_initialized():
            dist.destroy_process_group()
