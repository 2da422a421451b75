"""A tokenizer and an engine: records in, samples out, the same way whichever engine samples.

generator = Generator.load("smollm2-135m")                  # load once
ids = generator.encode(record)                              # chat template applied
for record, samples in generator.generate(records, SamplingParams(64, 0.9), n=4, seed=42):
    ...                                                     # samples[k].token_ids / .logprobs / .finished
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stages.core.errors import UsageError
from stages.core.models import DEFAULT_MODEL
from stages.core.records import prompt_messages
from stages.engines.base import AdapterRef, Engine, Sample, SamplingParams, derive_seed, lora_rank_slot
from stages.engines.prompts import PromptEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Records read ahead and sorted by prompt length, in batches: more means less padding, later output.
WINDOW_BATCHES = 16


def pad_token_id(tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]) -> int:
    """Padding is masked out everywhere, so any id works: the tokenizer's, else an end-of-sequence id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)


@dataclass
class Generator:
    """Prompt encoding and decoding with the model's tokenizer, sampling by an engine."""

    tokenizer: PreTrainedTokenizerBase
    engine: Engine
    stop_ids: set[int]
    model_name: str = DEFAULT_MODEL
    adapter: str | None = None
    system_prompt: str | None = None
    max_prompt_length: int | None = None

    def __post_init__(self) -> None:
        self.encoder = PromptEncoder(self.tokenizer, self.system_prompt, self.max_prompt_length)
        self.pad_id = pad_token_id(self.tokenizer, self.stop_ids)

    @classmethod
    def for_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_name: str = DEFAULT_MODEL,
        adapter: str | None = None,
        system_prompt: str | None = None,
        max_prompt_length: int | None = None,
    ) -> Generator:
        """A generator that samples with `model` in this process (the transformers engine)."""
        from stages.engines.transformers_engine import TransformersEngine, stop_token_ids

        stop_ids = stop_token_ids(getattr(model, "generation_config", None), tokenizer)
        engine = TransformersEngine(model, stop_ids=stop_ids, pad_id=pad_token_id(tokenizer, stop_ids))
        return cls(tokenizer, engine, stop_ids, model_name, adapter, system_prompt, max_prompt_length)

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        adapter: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        system_prompt: str | None = None,
        max_prompt_length: int | None = None,
        engine: EngineOptions | None = None,
    ) -> Generator:
        """Load the tokenizer, and the model for the transformers engine (an adapter merged into it), or
        start the engine named by `engine` (vllm in this process, or a server) with the adapter."""
        if engine is not None and engine.backend != "transformers":
            return cls._load_with_engine(
                model,
                engine,
                adapter=adapter,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                system_prompt=system_prompt,
                max_prompt_length=max_prompt_length,
            )
        from stages.core.models import (
            attach_adapter,
            load_model,
            load_tokenizer,
            resolve_device,
            resolve_dtype,
            resolve_model,
        )

        resolved = resolve_model(model)
        torch_device = resolve_device(device)
        tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        loaded = load_model(
            resolved, device=torch_device, dtype=resolve_dtype(dtype, torch_device), trust_remote_code=trust_remote_code
        )
        if adapter:
            loaded = attach_adapter(loaded, adapter, merge=True)  # merged: plain matmuls while sampling
        return cls.for_model(
            loaded,
            tokenizer,
            model_name=model,
            adapter=adapter,
            system_prompt=system_prompt,
            max_prompt_length=max_prompt_length,
        )

    @classmethod
    def _load_with_engine(
        cls,
        model: str,
        options: EngineOptions,
        *,
        adapter: str | None,
        dtype: str,
        trust_remote_code: bool,
        system_prompt: str | None,
        max_prompt_length: int | None,
    ) -> Generator:
        """The tokenizer here, the model in the engine (vLLM in this process, or a server)."""
        from stages.core.models import (
            adapter_rank,
            check_adapter,
            load_generation_config,
            load_tokenizer,
            resolve_model,
        )
        from stages.engines.transformers_engine import stop_token_ids

        resolved = resolve_model(model)
        tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        stop_ids = stop_token_ids(load_generation_config(resolved), tokenizer)
        folder = check_adapter(adapter) if adapter else None
        engine = make_engine(
            options,
            model_path=resolved.path,
            stop_ids=stop_ids,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            max_lora_rank=lora_rank_slot(adapter_rank(folder) if folder else None),
        )
        generator = cls(tokenizer, engine, stop_ids, model, adapter, system_prompt, max_prompt_length)
        if folder:
            engine.set_adapter(AdapterRef(folder, f"adapter-{derive_seed(folder.resolve()) % 10**8}", 0))
        return generator

    @property
    def text_only(self) -> bool:
        """True for a chat endpoint that returns text and no token ids (generate and eval only)."""
        return bool(getattr(self.engine, "text_only", False))

    @property
    def model(self) -> PreTrainedModel:
        """The in-process model (transformers engine only)."""
        model = getattr(self.engine, "model", None)
        if model is None:
            raise UsageError(f"the {self.engine.name} engine holds no model in this process")
        return model

    def encode(self, record: dict[str, Any]) -> list[int]:
        return self.encoder.encode(record)

    def decode(self, token_ids: Sequence[int]) -> str:
        ids = [t for t in token_ids if t not in self.stop_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def text(self, sample: Sample) -> str:
        """A sample's answer: decoded here, or as a text-only engine returned it."""
        return sample.text.strip() if sample.text is not None else self.decode(sample.token_ids)

    def answer_tokens(self, sample: Sample) -> int:
        """Tokens of the answer itself (end-of-sequence tokens not counted); a text-only answer is
        counted with our tokenizer."""
        if sample.text is not None and not sample.token_ids:
            return len(self.tokenizer(sample.text, add_special_tokens=False)["input_ids"])
        return sum(1 for t in sample.token_ids if t not in self.stop_ids)

    def sample_ids(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Sample]]:
        return self.engine.sample(prompts, seeds, sampling)

    def generate(
        self,
        records: Iterable[dict[str, Any]],
        sampling: SamplingParams,
        *,
        n: int = 1,
        seed: int = 42,
        batch_size: int = 8,
        max_batch_tokens: int | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> Iterator[tuple[dict[str, Any], list[Sample]]]:
        """Yield (record, n samples) in input order.

        Records are read in windows of WINDOW_BATCHES batches; inside a window they are sorted by prompt
        length so each batch holds prompts of similar length (little padding). `max_batch_tokens` caps
        batch rows x (longest prompt + max_new_tokens) as well. `on_batch(prompts, new_tokens)` reports
        progress. Sample k of a record is seeded from (seed, record id, k), whatever its batch.
        """
        if n < 1 or batch_size < 1:
            raise UsageError("num_samples and batch_size must be >= 1")
        records = iter(records)
        while window := list(itertools.islice(records, batch_size * WINDOW_BATCHES)):
            encoded = [self.encode(record) for record in window]
            order = sorted(range(len(window)), key=lambda i: -len(encoded[i]))
            results: dict[int, list[Sample]] = {}
            for batch in _batches(order, encoded, batch_size, n, sampling.max_new_tokens, max_batch_tokens):
                seeds = [[derive_seed(seed, window[i]["id"], k) for k in range(n)] for i in batch]
                if self.text_only:  # a chat endpoint: the server applies its own template to the turns
                    turns = [self.encoder.turns(prompt_messages(window[i])) for i in batch]
                    samples = self.engine.sample_messages(turns, seeds, sampling)  # type: ignore[attr-defined]
                else:
                    samples = self.sample_ids([encoded[i] for i in batch], seeds, sampling)
                results.update(zip(batch, samples))
                if on_batch:
                    on_batch(len(batch), sum(len(s.token_ids) for group in samples for s in group))
            for i, record in enumerate(window):
                yield record, results[i]

    def close(self) -> None:
        self.engine.close()


def _batches(
    order: list[int],
    encoded: list[list[int]],
    batch_size: int,
    n: int,
    max_new_tokens: int,
    max_batch_tokens: int | None,
) -> Iterator[list[int]]:
    batch: list[int] = []
    for i in order:
        candidate = [*batch, i]
        longest = max(len(encoded[j]) for j in candidate)
        too_big = max_batch_tokens is not None and len(candidate) * n * (longest + max_new_tokens) > max_batch_tokens
        if batch and (len(candidate) > batch_size or too_big):
            yield batch
            batch = [i]
        else:
            batch = candidate
    if batch:
        yield batch


@dataclass(frozen=True)
class EngineOptions:
    """Which engine samples, and where to reach it (`server`)."""

    backend: str = "transformers"  # transformers | vllm | server
    server_url: str | None = None  # base URL ending in /v1
    server_model: str | None = None  # default: the one model the server lists
    api_key_env: str | None = None  # environment variable holding the server's API key
    concurrency: int = 8  # requests in flight to a server
    chat_only: bool = False  # the server has only /v1/chat/completions: text answers (generate, eval)

    def __post_init__(self) -> None:
        from stages.engines.base import ENGINES

        if self.backend not in ENGINES:
            raise UsageError(f"unknown backend {self.backend!r}; choose from {', '.join(ENGINES)}")
        if self.backend == "server" and not self.server_url:
            raise UsageError("--backend server needs --server-url URL (the base URL, ending in /v1)")
        if self.concurrency < 1:
            raise UsageError("--concurrency must be >= 1")


def make_engine(
    options: EngineOptions,
    *,
    model_path: str,
    stop_ids: set[int],
    dtype: str = "auto",
    trust_remote_code: bool = False,
    max_lora_rank: int = 16,
) -> Engine:
    """Start the engine `options` names for a model folder (vllm, server; transformers needs a loaded model)."""
    if options.backend == "server":
        from stages.engines.server import ServerEngine

        return ServerEngine(
            options.server_url or "",
            model=options.server_model,
            api_key_env=options.api_key_env,
            concurrency=options.concurrency,
            stop_ids=stop_ids,
            chat_only=options.chat_only,
        )
    if options.backend == "vllm":
        from stages.engines.vllm_engine import VllmEngine, vllm_dtype

        return VllmEngine(
            model_path,
            dtype=vllm_dtype(dtype),
            max_lora_rank=max_lora_rank,
            stop_ids=stop_ids,
            trust_remote_code=trust_remote_code,
        )
    raise UsageError(f"the {options.backend} engine is made from a loaded model (Generator.for_model)")
