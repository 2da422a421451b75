"""A tokenizer and an engine: records in, samples out, the same way whichever engine samples.

generator = Generator.load("smollm2-135m")                  # load once
ids = generator.encode(record)                              # chat template applied
for record, samples in generator.generate(records, SamplingParams(64, 0.9), Batching(n=4, seed=42)):
    ...                                                     # samples[k].token_ids / .logprobs / .finished
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stages.core.errors import UsageError
from stages.core.models import DEFAULT_MODEL, Device, Dtype
from stages.core.options import DEFAULT_SEED, LongPrompts, ModelOptions, PromptOptions
from stages.core.records import prompt_messages
from stages.core.threads import recheck as recheck_threads
from stages.engines.base import (
    CACHE_BUDGET_BYTES,
    MAX_ROWS,
    SERVER_BATCH,
    BatchOptions,
    Engine,
    EngineOptions,
    EngineTarget,
    Sample,
    SamplingParams,
    derive_seed,
    lora_rank_slot,
    start_engine,
    stop_token_ids,
)
from stages.engines.prompts import PromptEncoder

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from stages.core.models import ResolvedModel

# Records read ahead and sorted by prompt length, in batches: more means less padding, later output.
WINDOW_BATCHES = 16
WINDOW_RECORDS = 64  # a window's batch, in records, when batches are sized by memory (x WINDOW_BATCHES)


def pad_token_id(tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]) -> int:
    """Padding is masked out everywhere, so any id works: the tokenizer's, else an end-of-sequence id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)


@dataclass(frozen=True)
class Batching:
    """How a stage's records are sampled: `n` samples each, sample k seeded from (seed, record id, k), and per
    batch at most `batch_size` records and at most `max_batch_tokens` rows x (longest prompt + max_new_tokens).
    Left out (None), a batch is as large as the engine's memory budget allows (`batch_limits`). The defaults
    are the options' (BatchOptions, seed_option)."""

    n: int = 1
    seed: int = DEFAULT_SEED
    batch_size: int | None = BatchOptions.batch_size
    max_batch_tokens: int | None = BatchOptions.max_batch_tokens

    @classmethod
    def of(cls, batch: BatchOptions, *, n: int = 1, seed: int = DEFAULT_SEED) -> Batching:
        return cls(n, seed, batch.batch_size, batch.max_batch_tokens)


@dataclass(frozen=True)
class BatchLimits:
    """What one batch may hold, resolved for an engine: prompts, rows (prompts x samples) and tokens."""

    prompts: int | None
    rows: int | None
    tokens: int | None

    def fits(self, prompts: int, rows: int, longest: int, max_new_tokens: int) -> bool:
        return (
            (self.prompts is None or prompts <= self.prompts)
            and (self.rows is None or rows <= self.rows)
            and (self.tokens is None or rows * (longest + max_new_tokens) <= self.tokens)
        )


def batch_limits(batching: Batching, cache_bytes_per_token: int | None) -> BatchLimits:
    """The limits a batch keeps: those asked for; where none is, the engine's memory budget (an engine holding
    its own cache in this process: CACHE_BUDGET_BYTES of it, at most MAX_ROWS rows), or SERVER_BATCH prompts
    for an engine that batches on its own."""
    tokens = batching.max_batch_tokens
    if tokens is None and cache_bytes_per_token:
        tokens = max(1, CACHE_BUDGET_BYTES // cache_bytes_per_token)
    if batching.batch_size is not None:
        return BatchLimits(batching.batch_size, None, tokens)
    if cache_bytes_per_token is None and batching.max_batch_tokens is None:
        return BatchLimits(SERVER_BATCH, None, None)
    return BatchLimits(None, MAX_ROWS, tokens)


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
    long_prompts: LongPrompts = "cut-middle"

    def __post_init__(self) -> None:
        self.encoder = PromptEncoder(self.tokenizer, self.system_prompt, self.max_prompt_length, self.long_prompts)
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
        long_prompts: LongPrompts = "cut-middle",
    ) -> Generator:
        """A generator that samples with `model` in this process (the transformers engine)."""
        from stages.engines.transformers_engine import TransformersEngine

        stop_ids = stop_token_ids(getattr(model, "generation_config", None), tokenizer)
        engine = TransformersEngine(model, stop_ids=stop_ids, pad_id=pad_token_id(tokenizer, stop_ids))
        return cls(tokenizer, engine, stop_ids, model_name, adapter, system_prompt, max_prompt_length, long_prompts)

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        adapter: str | None = None,
        device: Device = "auto",
        dtype: Dtype = "auto",
        trust_remote_code: bool = False,
        system_prompt: str | None = None,
        max_prompt_length: int | None = None,
        long_prompts: LongPrompts = "cut-middle",
        engine: EngineOptions | None = None,
        threads: int | None = None,
        say: Callable[[str], None] | None = None,
    ) -> Generator:
        """`for_options` with each setting by keyword (library use)."""
        options = ModelOptions(model, device, dtype, threads, trust_remote_code)
        prompt = PromptOptions(system_prompt, max_prompt_length, long_prompts)
        return cls.for_options(options, prompt, engine or EngineOptions(), adapter=adapter, say=say)

    @classmethod
    def for_options(
        cls,
        model: ModelOptions,
        prompt: PromptOptions,
        engine: EngineOptions,
        *,
        adapter: str | None = None,
        say: Callable[[str], None] | None = None,
    ) -> Generator:
        """The tokenizer here; the engine `engine` names (transformers in this process, by default) started
        for the model, sampling with `adapter` (merged into the weights by the transformers engine in float32). This
        process's thread budget is applied first (`model.threads` overrides it; `say` logs the choice). The
        groups are the ones generate, eval and a run's stages nest."""
        from stages.core.models import adapter_rank, check_adapter, load_tokenizer, resolve_model
        from stages.core.threads import apply_thread_budget

        apply_thread_budget(model.threads, say=say)
        resolved = resolve_model(model.model)
        tokenizer = load_tokenizer(resolved, trust_remote_code=model.trust_remote_code)
        folder = check_adapter(adapter) if adapter else None
        rank = adapter_rank(folder) if folder else None
        target = engine_target(resolved, tokenizer, model, adapter=folder, lora_rank=rank)
        started = start_engine(engine, target)
        return cls(tokenizer, started, target.stop_ids, model.model, adapter, *prompt_settings(prompt))

    @property
    def model(self) -> PreTrainedModel:
        """The in-process model (transformers engine only)."""
        from stages.engines.transformers_engine import TransformersEngine

        if not isinstance(self.engine, TransformersEngine):
            raise UsageError(f"the {self.engine.name} engine holds no model in this process")
        return self.engine.model

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
        recheck_threads()  # between batches and steps: cores back to a process that came since, or taken again
        return self.engine.sample(prompts, seeds, sampling)

    def generate(
        self,
        records: Iterable[dict[str, Any]],
        sampling: SamplingParams,
        batching: Batching = Batching(),
        *,
        on_batch: Callable[[int, int], None] | None = None,
        in_order: bool = True,
    ) -> Iterator[tuple[dict[str, Any], list[Sample]]]:
        """Yield (record, n samples) as batches finish.

        Records are read in windows of WINDOW_BATCHES batches; inside a window they are sorted by prompt
        length so each batch holds prompts of similar length (little padding). `on_batch(prompts,
        new_tokens)` reports progress. Sample k of a record is seeded from (seed, record id, k), whatever
        its batch.

        `in_order`: records come out in input order, each as soon as it and every record before it in
        its window are done. Otherwise each batch's records come out the moment the batch is done
        (completion order), so a writer that keeps them loses at most the batch in progress to a kill.
        """
        if batching.n < 1 or (batching.batch_size is not None and batching.batch_size < 1):
            raise UsageError("num_samples and batch_size must be >= 1")
        limits = batch_limits(batching, self.engine.cache_bytes_per_token)
        records = iter(records)
        while window := list(itertools.islice(records, (limits.prompts or WINDOW_RECORDS) * WINDOW_BATCHES)):
            encoded = [self.encode(record) for record in window]
            order = sorted(range(len(window)), key=lambda i: -len(encoded[i]))
            results: dict[int, list[Sample]] = {}
            next_out = 0  # in input order: the first record of the window not yet yielded
            for batch in _batches(order, encoded, batching.n, limits, sampling.max_new_tokens):
                samples = self._sample_batch(
                    [window[i] for i in batch], [encoded[i] for i in batch], sampling, batching
                )
                if on_batch:
                    on_batch(len(batch), sum(len(s.token_ids) for group in samples for s in group))
                if not in_order:
                    yield from ((window[i], group) for i, group in zip(batch, samples))
                    continue
                results.update(zip(batch, samples))
                while next_out in results:
                    yield window[next_out], results.pop(next_out)
                    next_out += 1

    def _sample_batch(
        self,
        records: Sequence[dict[str, Any]],
        encoded: Sequence[Sequence[int]],
        sampling: SamplingParams,
        batching: Batching,
    ) -> list[list[Sample]]:
        """n samples for each record of one batch."""
        seeds = [[derive_seed(batching.seed, record["id"], k) for k in range(batching.n)] for record in records]
        if self.engine.text_only:  # a chat endpoint: the server applies its own template to the turns
            turns = [self.encoder.turns(prompt_messages(record)) for record in records]
            return self.engine.sample_messages(turns, seeds, sampling)
        return self.sample_ids(encoded, seeds, sampling)

    def close(self) -> None:
        self.engine.close()


def prompt_settings(prompt: PromptOptions) -> tuple[str | None, int | None, LongPrompts]:
    """A generator's prompt fields, from the prompt options."""
    return prompt.system_prompt, prompt.max_prompt_length, prompt.long_prompts


def prompt_encoder(model: ModelOptions, prompt: PromptOptions) -> PromptEncoder:
    """The prompts as a generator for `model` would encode them, with only the tokenizer loaded: to check
    (and skip or refuse) over-long prompts before a model is loaded."""
    from stages.core.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model.model), trust_remote_code=model.trust_remote_code)
    return PromptEncoder(tokenizer, *prompt_settings(prompt))


def _batches(
    order: list[int], encoded: list[list[int]], n: int, limits: BatchLimits, max_new_tokens: int
) -> Iterator[list[int]]:
    """Consecutive runs of `order` (longest prompt first) that keep `limits`; a prompt too large alone is a
    batch of its own."""
    batch: list[int] = []
    longest = 0
    for i in order:
        candidate_longest = max(longest, len(encoded[i]))
        if batch and not limits.fits(len(batch) + 1, (len(batch) + 1) * n, candidate_longest, max_new_tokens):
            yield batch
            batch, candidate_longest = [], len(encoded[i])
        batch.append(i)
        longest = candidate_longest
    if batch:
        yield batch


def engine_target(
    resolved: ResolvedModel,
    tokenizer: PreTrainedTokenizerBase,
    model: ModelOptions,
    *,
    device: str | None = None,
    adapter: Path | None = None,
    lora_rank: int | None = None,
    live_policy: Any = None,
) -> EngineTarget:
    """What an engine needs to serve a model: its folder, end-of-sequence and padding ids, where and how it
    runs (`device`: the one the trainer resolved, e.g. cuda:1, instead of the option's), the adapter."""
    from stages.core.models import load_generation_config

    stop_ids = stop_token_ids(load_generation_config(resolved), tokenizer)
    return EngineTarget(
        resolved,
        stop_ids,
        pad_token_id(tokenizer, stop_ids),
        device=device or model.device,
        dtype=model.dtype,
        trust_remote_code=model.trust_remote_code,
        adapter=adapter,
        max_lora_rank=lora_rank_slot(lora_rank),
        live_policy=live_policy,
    )
