"""`bleuberi generate`: sample completions for each record's prompt."""

from __future__ import annotations

import time
from typing import Annotated, Literal

import typer

from bleuberi_cli.common import (
    InputOpt,
    OutputOpt,
    QuietOpt,
    SeedOpt,
    SkipInvalidOpt,
    boundary,
    progress,
    report_reading,
    say,
)
from bleuberi_cli.model_options import DeviceOpt, DtypeOpt, ModelOpt, SystemPromptOpt, TrustRemoteCodeOpt
from stages.errors import UsageError
from stages.records import NORMALISATION_HELP, ReadStats, read_records

HELP = f"""Sample completions from a causal LM for each record's prompt.

Adds `completions` (n strings) and `generation` (model, adapter, sampling parameters, seed, and per
sample the finish reason and token count). Prompts go through the tokenizer's chat template; records
with `messages` use their turns. Each sample has its own random stream derived from (seed, id, sample
index): same seed, same outputs, whatever the batching, and a resumed run matches an uninterrupted one.

\\b
Examples:
  bleuberi generate -i examples/data/heldout.jsonl -n 2 --max-new-tokens 32
  bleuberi generate -i pool.jsonl -o pool.gen.jsonl --resume       # continue after a kill
  bleuberi generate -i pool.jsonl --temperature 0 | bleuberi score | bleuberi select -n 20

{NORMALISATION_HELP}
"""


def generate(
    input: InputOpt = None,
    output: OutputOpt = None,
    model: ModelOpt = "smollm2-135m",
    adapter: Annotated[
        str | None,
        typer.Option("--adapter", metavar="PATH", help="A PEFT LoRA folder (e.g. train's adapter/); merged for speed."),
    ] = None,
    num_samples: Annotated[int, typer.Option("-n", "--num-samples", metavar="N", help="Completions per prompt.")] = 1,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", metavar="N", help="Stop a completion after this many tokens.")
    ] = 256,
    temperature: Annotated[
        float, typer.Option("--temperature", metavar="T", help="Sampling temperature; 0 = greedy.")
    ] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", metavar="P", help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    seed: SeedOpt = 42,
    batch_size: Annotated[
        int, typer.Option("--batch-size", metavar="N", help="Prompts per batch (each with n samples).")
    ] = 8,
    max_batch_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-batch-tokens",
            metavar="N",
            help="Also cap rows x (longest prompt + max new tokens) per batch, to bound memory.",
        ),
    ] = None,
    max_prompt_length: Annotated[
        int | None,
        typer.Option("--max-prompt-length", metavar="N", help="Cut longer prompts from the left (counted)."),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    system_prompt: SystemPromptOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    backend: Annotated[
        Literal["transformers", "vllm"], typer.Option("--backend", help="vllm needs the vllm package and a GPU.")
    ] = "transformers",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="With -o: skip records whose id is already in the file and append the rest as they finish.",
        ),
    ] = False,
    skip_invalid: SkipInvalidOpt = False,
    quiet: QuietOpt = False,
) -> None:
    with boundary():
        from stages.generate import GenerateStats, Generator, check_params, generate_records, vllm_generate_records
        from stages.jsonl import JsonlWriter, prepare_resume

        params = check_params(num_samples, max_new_tokens, temperature, top_p)
        if resume and not output:
            raise UsageError("--resume needs -o/--output FILE (the file to continue)")
        done: set[str] = set()
        if resume:
            state = prepare_resume(output)  # type: ignore[arg-type]
            done = state.ids
            if state.dropped_partial_line:
                say(f"dropped a half-written last line from {output}", quiet=quiet)
            if done:
                say(f"resuming: {len(done)} records already in {output}", quiet=quiet)
        stats = ReadStats()
        # Read and check everything before loading the model: a bad line at the end of a long file
        # must not cost hours of generation.
        todo = [r for r in read_records(input, skip_invalid=skip_invalid, stats=stats) if r["id"] not in done]
        gen_stats = GenerateStats()
        with JsonlWriter(output, flush_each=True, append=resume) as writer:
            if todo:
                start = time.perf_counter()
                if backend == "vllm":
                    outputs = vllm_generate_records(
                        todo,
                        model=model,
                        adapter=adapter,
                        params=params,
                        n=num_samples,
                        seed=seed,
                        dtype=dtype,
                        trust_remote_code=trust_remote_code,
                        system_prompt=system_prompt,
                        max_prompt_length=max_prompt_length,
                        stats=gen_stats,
                    )
                    generator = None
                else:
                    say(f"loading {model}" + (f" + adapter {adapter}" if adapter else ""), quiet=quiet)
                    generator = Generator.load(
                        model,
                        adapter=adapter,
                        device=device,
                        dtype=dtype,
                        trust_remote_code=trust_remote_code,
                        system_prompt=system_prompt,
                        max_prompt_length=max_prompt_length,
                    )
                    gen_stats.load_seconds = time.perf_counter() - start
                    outputs = generate_records(
                        todo,
                        generator,
                        params,
                        n=num_samples,
                        seed=seed,
                        batch_size=batch_size,
                        max_batch_tokens=max_batch_tokens,
                        stats=gen_stats,
                    )
                with progress("generating", quiet=quiet, unit="prompts") as advance:
                    for record in outputs:
                        writer.write(record)
                        advance(1)
                if generator is not None and generator.prompts.truncated:
                    say(
                        f"{generator.prompts.truncated} prompt(s) cut from the left to {max_prompt_length} tokens",
                        quiet=quiet,
                    )
        report_reading(stats, quiet=quiet)
        if gen_stats.records:
            seconds = max(gen_stats.seconds, 1e-9)
            say(
                f"generated {gen_stats.completions} completions for {gen_stats.records} prompts in {seconds:.1f}s "
                f"({gen_stats.records / seconds:.2f} prompts/s, {gen_stats.new_tokens / seconds:.0f} tokens/s; "
                f"model load {gen_stats.load_seconds:.1f}s)",
                quiet=quiet,
            )
        else:
            say("nothing to generate", quiet=quiet)
