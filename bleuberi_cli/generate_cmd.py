"""`bleuberi generate`: sample completions for each record's prompt."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from bleuberi_cli.common import (
    InputOpt,
    OutputOpt,
    QuietOpt,
    SeedOpt,
    SkipInvalidOpt,
    boundary,
    progress,
    read_all_records,
    say,
)
from bleuberi_cli.model_options import (
    ApiKeyEnvOpt,
    BackendOpt,
    ChatOnlyOpt,
    ConcurrencyOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    ServerModelOpt,
    ServerUrlOpt,
    SystemPromptOpt,
    TrustRemoteCodeOpt,
)
from stages.core.models import DEFAULT_MODEL
from stages.core.records import NORMALISATION_HELP

if TYPE_CHECKING:
    from stages.generate import GenerateStats

HELP = f"""Sample completions from a causal LM for each record's prompt.

Adds `completions` (n strings) and `generation` (model, adapter, engine, sampling parameters, seed,
and per sample the finish reason and token count). Prompts go through the tokenizer's chat template;
records with `messages` use their turns. Each sample has its own random stream derived from (seed, id,
sample index): same seed, same outputs, whatever the batching, and a resumed run matches an
uninterrupted one. Reads and checks every record before loading the model.

\b
Examples:
  bleuberi generate -i examples/data/heldout.jsonl -n 2 --max-new-tokens 32
  bleuberi generate -i pool.jsonl -o pool.gen.jsonl --resume       # continue after a kill
  bleuberi generate -i pool.jsonl --temperature 0 | bleuberi score | bleuberi select -n 20
  bleuberi generate -i pool.jsonl --backend server --server-url http://127.0.0.1:8000/v1
  bleuberi generate -i prompts.jsonl --as-references --backend server --server-chat-only \\
      --server-url https://api.example.com/v1 --server-model big --api-key-env API_KEY -o refs.jsonl

{NORMALISATION_HELP}
"""


def generate(
    input: InputOpt = None,
    output: OutputOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
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
    backend: BackendOpt = "transformers",
    server_url: ServerUrlOpt = None,
    server_model: ServerModelOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = 8,
    server_chat_only: ChatOnlyOpt = False,
    as_references: Annotated[
        bool,
        typer.Option(
            "--as-references",
            help="Append the generated texts to each record's `references` (deduplicated; `reference_sources` "
            "says which came from which model) instead of adding `completions`. Records may lack references.",
        ),
    ] = False,
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
        from stages.engines.generator import EngineOptions, Generator
        from stages.generate import check_params, generate_file

        params = check_params(num_samples, max_new_tokens, temperature, top_p)
        engine = EngineOptions(backend, server_url, server_model, api_key_env, concurrency, server_chat_only)

        def load() -> Generator:
            say(f"loading {model}" + (f" + adapter {adapter}" if adapter else ""), quiet=quiet)
            return Generator.load(
                model,
                adapter=adapter,
                device=device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                system_prompt=system_prompt,
                max_prompt_length=max_prompt_length,
                engine=engine,
            )

        records = read_all_records(
            input, skip_invalid=skip_invalid, quiet=quiet, purpose="generate", references_optional=as_references
        )
        with progress("generating", quiet=quiet, unit="prompts") as advance:
            stats = generate_file(
                records,
                output,
                load,
                params,
                n=num_samples,
                seed=seed,
                batch_size=batch_size,
                max_batch_tokens=max_batch_tokens,
                resume=resume,
                as_references=as_references,
                on_message=lambda m: say(m, quiet=quiet),
                on_record=lambda: advance(1),
            )
        if records and not stats.records:
            say(f"nothing to generate: every record is already in {output}", quiet=quiet)
        _report(stats, output, max_prompt_length, quiet=quiet)


def _report(stats: GenerateStats, output: str | None, max_prompt_length: int | None, *, quiet: bool) -> None:
    if stats.truncated_prompts:
        say(f"{stats.truncated_prompts} prompt(s) cut from the left to {max_prompt_length} tokens", quiet=quiet)
    if not stats.records:
        return
    seconds = max(stats.seconds, 1e-9)
    say(
        f"generated {stats.completions} completions for {stats.records} prompts in {seconds:.1f}s "
        f"({stats.records / seconds:.2f} prompts/s, {stats.new_tokens / seconds:.0f} tokens/s; "
        f"model load {stats.load_seconds:.1f}s)" + (f"; written to {output}" if output else ""),
        quiet=quiet,
    )
