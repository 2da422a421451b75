"""The engine seam: what every generation engine takes and returns, and the registry of engines.

An engine turns token-id prompts into sampled completions. The engines stand behind this seam by
name in `ENGINES`: `transformers` (our own batched sampler, the exact reference), `vllm` (vLLM in this
process) and `server` (any OpenAI-compatible endpoint). Prompts are encoded and completions decoded
locally with the trainer's tokenizer, so every engine sees and returns the same token ids.

Adding an engine: a module with a `start(options, target) -> Engine` function, and one line in
`ENGINES`. The `--backend` choices and every check of a backend name come from that dict.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stages.core.errors import ConfigError, ModelError, UsageError
from stages.core.models import ResolvedModel
from stages.core.options import option

# The only values vLLM accepts for --max-lora-rank (server) and max_lora_rank (in process).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(rank: int | None) -> int:
    """The smallest rank vLLM accepts that fits an adapter of `rank` (16 when there is none)."""
    if rank is None:
        return 16
    return next((slot for slot in LORA_RANKS if slot >= rank), rank)


SAMPLING = "Sampling"


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: declared once, nested in every stage that samples (generate, eval, train, each
    with defaults of its own); built from user settings, so a bad value is a usage error."""

    max_new_tokens: int = option(256, "new tokens per answer, at most", metavar="N", panel=SAMPLING)
    temperature: float = option(1.0, "sampling temperature; 0 = greedy", metavar="T", panel=SAMPLING)
    top_p: float = option(1.0, "nucleus sampling mass, in (0, 1]", metavar="P", panel=SAMPLING)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise UsageError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UsageError("top_p must be in (0, 1]")


# What a batch's key/value cache may take when --max-batch-tokens is not given (the transformers engine):
# safe beside the model on a 24 GiB CPU machine and on a GPU, and on a 2-core CPU past the batch size where
# more rows stop paying (docs/engines.md, "Batches").
CACHE_BUDGET_BYTES = 2 * 1024**3
MAX_ROWS = 256  # rows (prompts x samples) per batch when neither --batch-size nor the memory budget says fewer:
# on a 2-core CPU 128 rows decode at 3.3 ms a token, 256 at 2.95 (bench/RESULTS.md), and a batch is what a kill
# loses and what progress counts in
SERVER_BATCH = 64  # prompts per batch for engines that batch on their own (vLLM, a server)


@dataclass(frozen=True)
class BatchOptions:
    """How many prompts are sampled together (generate, eval): as many as the memory budget allows."""

    batch_size: int | None = option(
        None,
        "prompts per generation batch, at most (each with its samples; default: as many as --max-batch-tokens allows)",
        metavar="N",
        panel=SAMPLING,
    )
    max_batch_tokens: int | None = option(
        None,
        "rows x (longest prompt + max new tokens) per batch, at most (default: what 2 GiB of the model's key/value "
        "cache holds; docs/engines.md)",
        metavar="N",
        panel=SAMPLING,
    )

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise UsageError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")


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

    @classmethod
    def for_folder(cls, folder: Path) -> AdapterRef:
        """A fixed adapter (generate, eval): its name follows from its resolved path."""
        return cls(folder, f"adapter-{derive_seed(folder.resolve()) % 10**8}", 0)


class Engine(Protocol):
    """What the generate stage, eval and the GRPO trainer need from an engine."""

    name: str
    # True: the engine samples with the trainer's own model in this process, so it always has the newest
    # adapter (nothing to publish, nothing to prefetch). False: it holds the base model itself and
    # samples with the adapter last given to `set_adapter`.
    samples_with_live_policy: bool
    # True: answers come back as text without token ids or log-probs (a chat-only endpoint): fine for
    # generate and eval (through `sample_messages`), not for training.
    text_only: bool
    # Bytes of key/value cache each token of a batch takes in this process (batches are sized by it), or
    # None for an engine that manages its own memory (vLLM, a server).
    cache_bytes_per_token: int | None

    def sample(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Sample]]:
        """len(seeds[i]) samples for prompt i, each from its own seed. Returns samples[prompt][k]."""
        ...

    def sample_messages(
        self, turns: Sequence[Sequence[dict[str, str]]], seeds: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Sample]]:
        """The chat variant, for text-only engines: chat turns in (the engine applies its own template),
        samples with `text` out. Engines with token ids raise UsageError."""
        ...

    def set_adapter(self, adapter: AdapterRef | None) -> None:
        """Sample with this LoRA adapter from the next call on (None: the base model)."""
        ...

    def close(self) -> None:
        """Free what the engine holds (a model, an in-process vLLM, HTTP connections)."""
        ...


def stop_token_ids(generation_config: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the model's generation config and the tokenizer (engines stop on any)."""
    ids: set[int] = set()
    for source in (generation_config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if not ids:
        raise ModelError("the model and tokenizer define no end-of-sequence token")
    return ids


@dataclass(frozen=True)
class EngineTarget:
    """The model an engine is started for."""

    model: ResolvedModel  # where the weights are
    stop_ids: set[int]
    pad_id: int
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    adapter: Path | None = None  # sample with this LoRA adapter from the start (checked folder)
    max_lora_rank: int = 16
    live_policy: Any = None  # the trainer's model: an engine that samples with it in process uses it


EngineFactory = Callable[["EngineOptions", EngineTarget], Engine]


@dataclass(frozen=True)
class EngineSpec:
    """A registered engine: how to start it, and what settings can know before it starts."""

    start: EngineFactory
    samples_with_live_policy: bool  # as the Engine attribute of the same name


def _lazy(module: str) -> EngineFactory:
    """The `start(options, target)` function of an engine module, imported only when that engine is used."""

    def start(options: EngineOptions, target: EngineTarget) -> Engine:
        return importlib.import_module(module).start(options, target)

    return start


# name -> engine. Only this dict names the engines.
ENGINES: dict[str, EngineSpec] = {
    "transformers": EngineSpec(_lazy("stages.engines.transformers_engine"), samples_with_live_policy=True),
    "vllm": EngineSpec(_lazy("stages.engines.vllm_engine"), samples_with_live_policy=False),
    "server": EngineSpec(_lazy("stages.engines.server"), samples_with_live_policy=False),
}

PANEL = "Generation engine"


@dataclass(frozen=True)
class EngineOptions:
    """Which engine samples, and where to reach it (`server`)."""

    backend: str = option(
        "transformers",
        "who samples: transformers (in this process, the exact reference), vllm (vLLM in this process, CPU or "
        "GPU), or server (an OpenAI-compatible endpoint at --server-url: vllm serve, SGLang, ...)",
        choices=tuple(ENGINES),
        panel=PANEL,
    )
    server_url: list[str] = option(
        factory=list,
        help="base URL of the server, ending in /v1, e.g. http://127.0.0.1:8000/v1; several servers of one model "
        "share the requests, and one that fails is left out (repeat the flag; in BLEUBERI_SERVER_URL: separated by "
        "spaces)",
        metavar="URL",
        envvar="BLEUBERI_SERVER_URL",
        panel=PANEL,
        in_digest=False,
    )
    server_model: str | None = option(
        None, "the served model's name (default: the one the server lists)", metavar="NAME", panel=PANEL
    )
    api_key_env: str | None = option(
        None,
        "environment variable holding the server's API key; sent to that host only, never on a redirect",
        metavar="VAR",
        panel=PANEL,
        in_digest=False,
    )
    concurrency: int = option(8, "requests in flight to each server at once", metavar="N", panel=PANEL, in_digest=False)
    chat_only: bool = option(
        False,
        "the server has only /v1/chat/completions: answers come back as text, with no token ids (fine for "
        "generate and eval; training needs token ids)",
        flags=("--server-chat-only",),
        panel=PANEL,
    )

    def __post_init__(self) -> None:
        if self.backend not in ENGINES:
            raise UsageError(f"unknown backend {self.backend!r}; choose from {', '.join(ENGINES)}")
        if not isinstance(self.server_url, list):  # library callers: one URL as a string, or None for none
            object.__setattr__(self, "server_url", [self.server_url] if self.server_url else [])
        if self.backend == "server":
            check_server_urls(self.server_url)
        if self.concurrency < 1:
            raise UsageError("--concurrency must be >= 1")

    @property
    def samples_with_live_policy(self) -> bool:
        return ENGINES[self.backend].samples_with_live_policy


def check_server_urls(urls: Sequence[str]) -> None:
    """The `server` engine's URLs: at least one, each a base URL ending in /v1, none given twice (with or
    without a final slash: it would get twice the requests of the others)."""
    if not urls:
        raise UsageError("--backend server needs --server-url URL (the base URL, ending in /v1)")
    seen: set[str] = set()
    for url in urls:
        base = url.rstrip("/")
        if not base.endswith("/v1"):
            raise ConfigError(f"server URL {url!r} must end in /v1 (e.g. http://127.0.0.1:8000/v1)")
        if base in seen:
            raise UsageError(f"--server-url {url} is given twice")
        seen.add(base)


def start_engine(options: EngineOptions, target: EngineTarget) -> Engine:
    """Start the engine `options` names for `target`."""
    return ENGINES[options.backend].start(options, target)
