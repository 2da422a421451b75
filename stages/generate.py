"""The `generate` stage: sample completions for each record's prompt from a causal LM.

Library use (the trainer and `eval` do this):

    generator = Generator.load("smollm2-135m")                 # load once
    ids = generator.encode(record)                              # chat template applied
    for record, samples in generator.generate(records, SamplingParams(64, 0.9), n=4, seed=42):
        ...                                                     # samples[k].token_ids / .logprobs / .finished

Prompts go through the tokenizer's chat template. A tokenizer without one gets a plain fallback:
an optional system text, then "User: ...", "Assistant: ..." turns separated by blank lines, ending
with "Assistant:".
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from stages.errors import UsageError
from stages.records import prompt_messages
from stages.sampling import Sample, SamplingParams, derive_seed, sample, stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BACKENDS = ("transformers", "vllm")


def plain_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The documented fallback for tokenizers without a chat template."""
    parts = []
    for turn in messages:
        if turn["role"] == "system":
            parts.append(turn["content"])
        else:
            parts.append(f"{turn['role'].capitalize()}: {turn['content']}")
    parts.append("Assistant:")
    return "\n\n".join(parts)


@dataclass
class PromptEncoder:
    """Turns a record's prompt into token ids: chat template, optional system prompt, left truncation."""

    tokenizer: PreTrainedTokenizerBase
    system_prompt: str | None = None
    max_prompt_length: int | None = None
    truncated: int = 0  # prompts cut from the left to fit max_prompt_length

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        turns = list(messages)
        if self.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(plain_prompt(turns))["input_ids"]
        if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
            self.truncated += 1
            ids = ids[len(ids) - self.max_prompt_length :]  # keep the end: the question and the answer cue
        return ids

    def encode(self, record: dict[str, Any]) -> list[int]:
        return self.encode_messages(prompt_messages(record))


@dataclass
class Generator:
    """A loaded model + tokenizer, ready to sample for records."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_name: str = "model"
    adapter: str | None = None
    system_prompt: str | None = None
    max_prompt_length: int | None = None

    def __post_init__(self) -> None:
        self.prompts = PromptEncoder(self.tokenizer, self.system_prompt, self.max_prompt_length)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.stop_ids)

    @classmethod
    def load(
        cls,
        model: str = "smollm2-135m",
        *,
        adapter: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        system_prompt: str | None = None,
        max_prompt_length: int | None = None,
    ) -> Generator:
        from stages.models import (
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
        return cls(loaded, tokenizer, model, adapter, system_prompt, max_prompt_length)

    def encode(self, record: dict[str, Any]) -> list[int]:
        return self.prompts.encode(record)

    def decode(self, token_ids: Sequence[int]) -> str:
        ids = [t for t in token_ids if t not in self.stop_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def sample_ids(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Sample]]:
        return sample(self.model, prompts, seeds, params, stop_ids=self.stop_ids, pad_id=self.pad_id)

    def generate(
        self,
        records: Iterable[dict[str, Any]],
        params: SamplingParams,
        *,
        n: int = 1,
        seed: int = 42,
        batch_size: int = 8,
        max_batch_tokens: int | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> Iterator[tuple[dict[str, Any], list[Sample]]]:
        """Yield (record, n samples) in input order.

        Records are read in windows of 16 batches; inside a window they are sorted by prompt length so
        each batch holds prompts of similar length (little padding). `max_batch_tokens` caps
        batch rows x (longest prompt + max_new_tokens) as well. `on_batch(prompts, new_tokens)` reports
        progress.
        """
        if n < 1 or batch_size < 1:
            raise UsageError("num_samples and batch_size must be >= 1")
        records = iter(records)
        while window := list(itertools.islice(records, batch_size * 16)):
            encoded = [self.encode(record) for record in window]
            order = sorted(range(len(window)), key=lambda i: -len(encoded[i]))
            results: dict[int, list[Sample]] = {}
            for batch in _batches(order, encoded, batch_size, n, params.max_new_tokens, max_batch_tokens):
                seeds = [[derive_seed(seed, window[i]["id"], k) for k in range(n)] for i in batch]
                samples = self.sample_ids([encoded[i] for i in batch], seeds, params)
                results.update(zip(batch, samples))
                if on_batch:
                    on_batch(len(batch), sum(len(s.token_ids) for group in samples for s in group))
            for i, record in enumerate(window):
                yield record, results[i]


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


def generation_info(
    generator: Generator | None,
    params: SamplingParams,
    *,
    model: str,
    adapter: str | None,
    n: int,
    seed: int,
    backend: str = "transformers",
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """The provenance written into each record's `generation` object (per-sample fields are added later)."""
    info: dict[str, Any] = {
        "model": model,
        "adapter": adapter,
        "backend": backend,
        "num_samples": n,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": seed,
        "bleuberi": version("bleuberi"),
    }
    if system_prompt:
        info["system_prompt"] = system_prompt
    return info


def add_completions(
    record: dict[str, Any], texts: list[str], samples: list[Sample], info: dict[str, Any]
) -> dict[str, Any]:
    record["completions"] = texts
    record["generation"] = {
        **info,
        "finish_reasons": ["stop" if s.finished else "length" for s in samples],
        "completion_tokens": [len(s.token_ids) for s in samples],
    }
    return record


@dataclass
class GenerateStats:
    records: int = 0
    completions: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0


def generate_records(
    records: Iterable[dict[str, Any]],
    generator: Generator,
    params: SamplingParams,
    *,
    n: int = 1,
    seed: int = 42,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
    stats: GenerateStats | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Add `completions` and `generation` to each record (transformers backend)."""
    stats = stats if stats is not None else GenerateStats()
    info = generation_info(
        generator,
        params,
        model=generator.model_name,
        adapter=generator.adapter,
        n=n,
        seed=seed,
        system_prompt=generator.system_prompt,
    )
    start = time.perf_counter()
    for record, samples in generator.generate(
        records, params, n=n, seed=seed, batch_size=batch_size, max_batch_tokens=max_batch_tokens, on_batch=on_batch
    ):
        texts = [generator.decode(s.token_ids) for s in samples]
        stats.records += 1
        stats.completions += len(samples)
        stats.new_tokens += sum(len(s.token_ids) for s in samples)
        stats.seconds = time.perf_counter() - start
        yield add_completions(record, texts, samples, info)


def vllm_generate_records(
    records: Iterable[dict[str, Any]],
    *,
    model: str,
    adapter: str | None,
    params: SamplingParams,
    n: int,
    seed: int,
    dtype: str,
    trust_remote_code: bool,
    system_prompt: str | None,
    max_prompt_length: int | None,
    stats: GenerateStats | None = None,
) -> Iterator[dict[str, Any]]:
    """The same output through vLLM (GPU only). Each sample is seeded like the transformers backend."""
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        raise UsageError("--backend vllm needs the vllm package and a CUDA GPU; use --backend transformers")
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams

    from stages.models import load_tokenizer, resolve_model

    stats = stats if stats is not None else GenerateStats()
    resolved = resolve_model(model)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    engine = LLM(
        model=resolved.path,
        dtype="auto" if dtype == "auto" else dtype,
        trust_remote_code=trust_remote_code,
        enable_lora=adapter is not None,
        seed=seed,
    )
    lora = None
    if adapter:
        from vllm.lora.request import LoRARequest

        from stages.models import check_adapter

        lora = LoRARequest("adapter", 1, str(check_adapter(adapter)))
    encoder = PromptEncoder(tokenizer, system_prompt, max_prompt_length)
    info = generation_info(
        None, params, model=model, adapter=adapter, n=n, seed=seed, backend="vllm", system_prompt=system_prompt
    )
    start = time.perf_counter()
    records = iter(records)
    while window := list(itertools.islice(records, 256)):
        prompts = [{"prompt_token_ids": encoder.encode(r)} for r in window]
        # n requests of one sample each, so every sample gets the same per-sample seed as elsewhere.
        requests = [p for p in prompts for _ in range(n)]
        sampling = [
            VllmSamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=derive_seed(seed, r["id"], k),
            )
            for r in window
            for k in range(n)
        ]
        outputs = engine.generate(requests, sampling, lora_request=lora, use_tqdm=False)
        for i, record in enumerate(window):
            outs = [outputs[i * n + k].outputs[0] for k in range(n)]
            samples = [Sample(list(o.token_ids), [], o.finish_reason == "stop") for o in outs]
            stats.records += 1
            stats.completions += n
            stats.new_tokens += sum(len(s.token_ids) for s in samples)
            stats.seconds = time.perf_counter() - start
            yield add_completions(record, [o.text.strip() for o in outs], samples, info)


def check_params(n: int, max_new_tokens: int, temperature: float, top_p: float) -> SamplingParams:
    if n < 1:
        raise UsageError("-n/--num-samples must be >= 1")
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    except ValueError as error:
        raise UsageError(str(error)) from None


__all__ = [
    "BACKENDS",
    "GenerateStats",
    "Generator",
    "PromptEncoder",
    "SamplingParams",
    "add_completions",
    "check_params",
    "generate_records",
    "plain_prompt",
    "vllm_generate_records",
]
