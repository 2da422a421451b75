"""The `generate` stage: sample completions for each record's prompt and add them to the record.

Library use:

    generator = Generator.load("smollm2-135m")
    for record in generate_records(records, generator, SamplingParams(64, 0.9), Batching(n=4)):
        ...                                   # record["completions"], record["generation"]

    generate_file(records, "out.jsonl", lambda: Generator.load(...), params, kept=finished("out.jsonl"))  # --resume

Prompts go through the tokenizer's chat template (see stages/engines/prompts.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core import options
from stages.core.errors import UsageError
from stages.core.formats import open_writer
from stages.core.journal import Finished
from stages.core.options import MODEL, ModelOptions, PromptOptions, group, option
from stages.core.versions import package_version
from stages.engines.base import SAMPLING, BatchOptions, EngineOptions, Sample, SamplingParams
from stages.engines.generator import Batching, Generator, prompt_encoder
from stages.engines.prompts import PromptCuts


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
    cuts: PromptCuts | None = None  # the prompts the generator cut (over max_prompt_length)

    def prompt_lines(self, skipped: PromptCuts | None) -> list[str]:
        """What to say of the over-long prompts: those `check_prompts` left out, and those the generator cut."""
        return [*(skipped.lines() if skipped else []), *(self.cuts.lines() if self.cuts else [])]


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
        stats.cuts = generator.encoder.cuts
        texts = [generator.text(s) for s in samples]
        if as_references:
            record["generation"] = dict(info)
            add_as_references(record, texts, info)
        else:
            add_completions(record, texts, samples, info)
        if cut := generator.encoder.cuts.note(record["id"]):
            record["generation"]["prompt_cut"] = cut
        yield record


def generate_file(
    records: Sequence[dict[str, Any]],
    output: str | Path | None,
    load_generator: Callable[[], Generator],
    params: SamplingParams,
    batching: Batching = Batching(),
    *,
    kept: Finished | None = None,
    as_references: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    on_todo: Callable[[int], None] = lambda count: None,
) -> GenerateStats:
    """Generate for every record not in `kept` (what earlier runs finished: `stages.core.journal.finished`)
    and write each as its batch finishes.

    A file output is journaled (stages/core/journal.py): each batch reaches its journal the moment it is
    done, in the order batches finish, so a kill loses at most the batch in progress; at the end the
    records, kept ones included, are put in input order, so a resumed file equals an uninterrupted one.
    stdout gets them in input order as they come. The model is loaded only if anything is left to do.
    `on_todo(count)` says how many records are left, before the model loads; `on_batch(prompts,
    new_tokens)` follows each finished batch.
    """
    done = kept.records if kept is not None else {}
    todo = [r for r in records if r["id"] not in done]
    on_todo(len(todo))
    stats = GenerateStats()
    order = [r["id"] for r in records] if output is not None else None
    with open_writer(output, flush_each=True, order=order) as writer:

        def batch_done(prompts: int, new_tokens: int) -> None:
            writer.check_reader()  # `| head` has what it wanted: stop now, not at the next in-order record
            if on_batch:
                on_batch(prompts, new_tokens)

        for record in records:
            if record["id"] in done:
                writer.write(done[record["id"]])
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
                    on_batch=batch_done,
                    as_references=as_references,
                    in_order=output is None,
                )
                for record in outputs:
                    writer.write(record)
            finally:
                generator.close()
    return stats


@dataclass
class GenerateConfig(options.Options):
    """Every option of `generate` (declared once: stages/core/options.py). The model, prompt, sampling and
    batch options are the groups every stage that generates nests."""

    model: ModelOptions = group(ModelOptions)
    adapter: str | None = option(
        None, "a PEFT LoRA folder (e.g. train's adapter/); merged in float32", metavar="PATH", panel=MODEL
    )
    prompt: PromptOptions = group(PromptOptions)
    num_samples: int = option(1, "completions per prompt", metavar="N", flags=("-n", "--num-samples"), panel=SAMPLING)
    sampling: SamplingParams = group(SamplingParams)
    batch: BatchOptions = group(BatchOptions)
    seed: int = options.seed_option()
    engine: EngineOptions = group(EngineOptions, table=True)
    as_references: bool = option(
        False,
        "append the generated texts to each record's `references` (deduplicated; `reference_sources` says which "
        "came from which model) instead of adding `completions`. Records may lack references",
    )

    def __post_init__(self) -> None:
        if self.num_samples < 1:  # before any record is read
            raise UsageError("-n/--num-samples must be >= 1")

    @property
    def batching(self) -> Batching:
        return Batching.of(self.batch, n=self.num_samples, seed=self.seed)

    def check_prompts(self, records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], PromptCuts | None]:
        """Before the model loads (only its tokenizer): under `--long-prompts skip` the records whose prompt fits
        (the cuts name the others), under `error` every record or a PromptTooLong. Without a prompt limit, or
        with a cutting mode, every record (cut later, as it is encoded)."""
        if self.prompt.max_prompt_length is None or self.prompt.long_prompts not in ("skip", "error"):
            return list(records), None
        encoder = prompt_encoder(self.model, self.prompt)
        return encoder.check(records), encoder.cuts

    def load(self, say: Callable[[str], None] | None = None) -> Generator:
        """The model (with its adapter) in the engine the config names, with this process's thread budget."""
        return Generator.for_options(self.model, self.prompt, self.engine, adapter=self.adapter, say=say)


__all__ = [
    "Batching",
    "GenerateConfig",
    "GenerateStats",
    "Generator",
    "SamplingParams",
    "add_completions",
    "generate_file",
    "generate_records",
]
