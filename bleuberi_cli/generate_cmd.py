"""`bleuberi generate`: sample completions for each record's prompt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bleuberi_cli.common import (
    OutputOpt,
    QuietOpt,
    ResumeOpt,
    finished_work,
    progress,
    read_all_records,
    say,
)
from bleuberi_cli.config_options import cli_command
from stages.core.preflight import Output, preflight
from stages.core.records import NORMALISATION_HELP, ReadOptions
from stages.generate import GenerateConfig

if TYPE_CHECKING:
    from stages.engines.generator import Generator
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


@cli_command({"config": GenerateConfig, "reading": ReadOptions})
def generate(
    config: GenerateConfig,
    reading: ReadOptions,
    output: OutputOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from stages.generate import generate_file

    preflight(inputs=[reading.input], outputs=[Output(output)], models=[config.model.model], adapters=[config.adapter])
    kept = finished_work(output, resume=resume, quiet=quiet)  # first: what a killed run left

    def load() -> Generator:
        name = config.model.model
        say(f"loading {name}" + (f" + adapter {config.adapter}" if config.adapter else ""), quiet=quiet)
        return config.load(say=lambda m: say(m, quiet=quiet))

    records = read_all_records(reading, quiet=quiet, purpose="generate", references_optional=True)
    records, skipped = config.check_prompts(records)
    with progress("generating", quiet=quiet, total=len(records), unit="prompts") as advance:
        stats = generate_file(
            records,
            output,
            load,
            config.sampling,
            config.batching,
            kept=kept,
            as_references=config.as_references,
            on_todo=advance.set_total,
            on_batch=lambda prompts, _tokens: advance(prompts),
        )
    if records and not stats.records:
        say(f"nothing to generate: every record is already in {output}", quiet=quiet)
    for line in stats.prompt_lines(skipped):
        say(line, quiet=quiet)
    _report(stats, output, quiet=quiet)


def _report(stats: GenerateStats, output: str | None, *, quiet: bool) -> None:
    if not stats.records:
        return
    seconds = max(stats.seconds, 1e-9)
    say(
        f"generated {stats.completions} completions for {stats.records} prompts in {seconds:.1f}s "
        f"({stats.records / seconds:.2f} prompts/s, {stats.new_tokens / seconds:.0f} tokens/s; "
        f"model load {stats.load_seconds:.1f}s)" + (f"; written to {output}" if output else ""),
        quiet=quiet,
    )
