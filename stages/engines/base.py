"""The engine seam: what every generation engine takes and returns.

An engine turns token-id prompts into sampled completions. Three engines stand behind this seam:
`transformers` (our own batched sampler, the exact reference), `vllm` (vLLM in this process) and
`server` (any OpenAI-compatible endpoint). Prompts are encoded and completions decoded locally with
the trainer's tokenizer, so every engine sees and returns the same token ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stages.core.errors import UsageError

ENGINES = ("transformers", "vllm", "server")
# The only values vLLM accepts for --max-lora-rank (server) and max_lora_rank (in process).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(rank: int | None) -> int:
    """The smallest rank vLLM accepts that fits an adapter of `rank` (16 when there is none)."""
    if rank is None:
        return 16
    return next((slot for slot in LORA_RANKS if slot >= rank), rank)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; built from user settings, so a bad value is a usage error."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise UsageError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UsageError("top_p must be in (0, 1]")


@dataclass
class Sample:
    token_ids: list[int]  # the completion, up to and including the first end-of-sequence token
    logprobs: list[float]  # log p of each token under softmax(logits / temperature); 0.0 when greedy
    finished: bool  # True: ended by an end-of-sequence token; False: cut at max_new_tokens
    text: str | None = None  # set only by text-only engines (a chat endpoint that returns no token ids)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (e.g. run seed, record id, sample index), stable across runs."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter folder to sample with. `name` is new for every version (engines cache by name)."""

    path: Path
    name: str
    version: int


class Engine(Protocol):
    """What the generate stage, eval and the GRPO trainer need from an engine."""

    name: str

    def sample(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Sample]]:
        """len(seeds[i]) samples for prompt i, each from its own seed. Returns samples[prompt][k]."""
        ...

    def set_adapter(self, adapter: AdapterRef | None) -> None:
        """Sample with this LoRA adapter from the next call on (None: the base model)."""
        ...

    def close(self) -> None:
        """Free what the engine holds (a model, an in-process vLLM, HTTP connections)."""
        ...
