"""The `generate` stage: sample completions for each record's prompt and add them to the record.

Library use:

    generator = Generator.load("smollm2-135m")
    for record in generate_records(records, generator, SamplingParams(64, 0.9), Batching(n=4)):
        ...                                   # record["completions"], record["generation"]

    generate_file(records, "out.jsonl", lambda: Generator.load(...), params, resume=True)   # what the CLI does

Prompts go through the tokenizer's chat template (see stages/engines/prompts.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.core import options
from stages.core.errors import UsageError
from stages.core.formats import open_writer, refuse_append
from stages.core.jsonl import prepare_resume, put_in_order
from stages.core.options import option
from stages.core.versions import package_version
from stages.engines.base import EngineOptions, Sample, SamplingParams
from stages.engines.generator import Batching, Generator


def generation_info(
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
        "bleuberi": package_version("bleuberi"),
    }
    if system_prompt:
        info["system_prompt"] = system_prompt
    return info


def add_as_references(record: dict[str, Any], texts: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """Append generated texts to `references` (no duplicates, no empty ones) and say where each came from:
    `reference_sources[i]` is "input" or the generation settings that wrote references[i]."""
    references = list(record.get("references", []))
    sources = list(record.get("reference_sources", ["input"] * len(references)))
    origin = {k: info[k] for k in ("model", "adapter", "backend", "temperature", "seed", "bleuberi") if k in info}
    for text in texts:
        if text.strip() and text not in references:
            references.append(text)
            sources.append(origin)
    record["references"], record["reference_sources"] = references, sources
    return record


def add_completions(
    record: dict[str, Any], texts: list[str], samples: list[Sample], info: dict[str, Any]
) -> dict[str, Any]:
    record["completions"] = texts
    text_only = any(s.text is not None and not s.token_ids for s in samples)
    record["generation"] = {
        **info,
        "finish_reasons": ["stop" if s.finished else "length" for s in samples],
        # A chat endpoint returns text only: no token ids, so no token counts (and the server's template).
        "completion_tokens": None if text_only else [len(s.token_ids) for s in samples],
        **({"text_only": True} if text_only else {}),
    }
    return record


@dataclass
class GenerateStats:
    records: int = 0
    completions: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0
    truncated_prompts: int = 0


def generate_records(
    records: Iterable[dict[str, Any]],
    generator: Generator,
    params: SamplingParams,
    batching: Batching = Batching(),
    *,
    stats: GenerateStats | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    as_references: bool = False,
    in_order: bool = True,
) -> Iterator[dict[str, Any]]:
    """Add `completions` and `generation` to each record (with `as_references`, the texts go to `references`
    instead, for building multi-reference sets from strong models). In input order, or with `in_order=False`
    each batch as soon as it is done (see `Generator.generate`)."""
    stats = stats if stats is not None else GenerateStats()
    info = generation_info(
        params,
        model=generator.model_name,
        adapter=generator.adapter,
        n=batching.n,
        seed=batching.seed,
        backend=generator.engine.name,
        system_prompt=generator.system_prompt,
    )
    start = time.perf_counter()
    for record, samples in generator.generate(records, params, batching, on_batch=on_batch, in_order=in_order):
        stats.records += 1
        stats.completions += len(samples)
        stats.new_tokens += sum(len(s.token_ids) for s in samples)
        stats.seconds = time.perf_counter() - start
        stats.truncated_prompts = generator.encoder.truncated
        texts = [generator.text(s) for s in samples]
        if as_references:
            record["generation"] = info
            yield add_as_references(record, texts, info)
        else:
            yield add_completions(record, texts, samples, info)


def generate_file(
    records: Sequence[dict[str, Any]],
    output: str | Path | None,
    load_generator: Callable[[], Generator],
    params: SamplingParams,
    batching: Batching = Batching(),
    *,
    resume: bool = False,
    as_references: bool = False,
    on_message: Callable[[str], None] = lambda message: None,
    on_batch: Callable[[int, int], None] | None = None,
    on_todo: Callable[[int], None] = lambda count: None,
) -> GenerateStats:
    """Generate for every record not already in `output` and write each as it finishes.

    With `resume`, records whose id is in `output` are skipped, a half-written last line left by a
    kill is cut off, and each batch is appended (and flushed) the moment it is done, so a kill loses at
    most the batch in progress; once every record is there the file is put in input order, so a resumed
    file equals an uninterrupted one. Otherwise records are written in input order. The model is loaded
    only if anything is left to do. `on_todo(count)` says how many records are left, before the model
    loads; `on_batch(prompts, new_tokens)` follows each finished batch.
    """
    if resume and output is None:
        raise UsageError("--resume needs -o/--output FILE (the file to continue)")
    done = _already_done(output, on_message) if resume else set()
    todo = [r for r in records if r["id"] not in done]
    on_todo(len(todo))
    stats = GenerateStats()
    with open_writer(output, flush_each=True, append=resume) as writer:
        if todo:
            start = time.perf_counter()
            generator = load_generator()
            stats.load_seconds = time.perf_counter() - start
            try:
                outputs = generate_records(
                    todo,
                    generator,
                    params,
                    batching,
                    stats=stats,
                    on_batch=on_batch,
                    as_references=as_references,
                    in_order=not resume,
                )
                for record in outputs:
                    writer.write(record)
            finally:
                generator.close()
    if resume:  # also when a kill came after the last batch but before this
        put_in_order(output, [r["id"] for r in records])  # type: ignore[arg-type]
    return stats


def _already_done(output: str | Path | None, on_message: Callable[[str], None]) -> set[str]:
    """The ids already in `output` (a half-written last line is cut off first)."""
    refuse_append(output)  # before reading it as JSONL: a Parquet file cannot be continued
    state = prepare_resume(output)  # type: ignore[arg-type]
    if state.dropped_partial_line:
        on_message(f"dropped a half-written last line from {output}")
    if state.ids:
        on_message(f"resuming: {len(state.ids)} records already in {output}")
    return state.ids


def check_params(n: int, max_new_tokens: int, temperature: float, top_p: float) -> SamplingParams:
    if n < 1:
        raise UsageError("-n/--num-samples must be >= 1")
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)


SAMPLING = "Sampling"


@dataclass
class GenerateConfig:
    """Every option of `generate` (declared once, here: stages/core/options.py)."""

    model: str = options.model_option()
    adapter: str | None = option(
        None, "a PEFT LoRA folder (e.g. train's adapter/); merged for speed", metavar="PATH", panel="Model"
    )
    num_samples: int = option(1, "completions per prompt", metavar="N", flags=("-n", "--num-samples"), panel=SAMPLING)
    max_new_tokens: int = option(256, "stop a completion after this many tokens", metavar="N", panel=SAMPLING)
    temperature: float = option(1.0, "sampling temperature; 0 = greedy", metavar="T", panel=SAMPLING)
    top_p: float = option(1.0, "nucleus sampling mass, in (0, 1]", metavar="P", panel=SAMPLING)
    seed: int = options.seed_option()
    batch_size: int = option(8, "prompts per batch (each with n samples)", metavar="N", panel=SAMPLING)
    max_batch_tokens: int | None = option(
        None,
        "also cap rows x (longest prompt + max new tokens) per batch, to bound memory",
        metavar="N",
        panel=SAMPLING,
    )
    max_prompt_length: int | None = option(
        None, "cut longer prompts from the left (counted)", metavar="N", panel=SAMPLING
    )
    device: str = options.device_option()
    dtype: str = options.dtype_option()
    threads: int | None = options.threads_option()
    system_prompt: str | None = options.system_prompt_option()
    trust_remote_code: bool = options.trust_remote_code_option()
    engine: EngineOptions = field(default_factory=EngineOptions)
    as_references: bool = option(
        False,
        "append the generated texts to each record's `references` (deduplicated; `reference_sources` says which "
        "came from which model) instead of adding `completions`. Records may lack references",
    )

    def __post_init__(self) -> None:
        self.sampling  # noqa: B018 - bad sampling settings fail before any record is read

    @property
    def sampling(self) -> SamplingParams:
        return check_params(self.num_samples, self.max_new_tokens, self.temperature, self.top_p)

    @property
    def batching(self) -> Batching:
        return Batching(self.num_samples, self.seed, self.batch_size, self.max_batch_tokens)

    def load(self, say: Callable[[str], None] | None = None) -> Generator:
        """The model (with its adapter) in the engine the config names, with this process's thread budget."""
        prompting = (self.system_prompt, self.max_prompt_length)
        return Generator.for_stage(self, self.model, adapter=self.adapter, prompting=prompting, say=say)


__all__ = [
    "Batching",
    "GenerateConfig",
    "GenerateStats",
    "Generator",
    "SamplingParams",
    "add_completions",
    "check_params",
    "generate_file",
    "generate_records",
]
