"""`bleuberi eval`: base model vs adapters on held-out records; or metric-human agreement on pairs."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Annotated

import typer

from bleuberi_cli.common import (
    OutputOpt,
    QuietOpt,
    emit_results,
    finished_work,
    progress,
    read_all_records,
    say,
)
from bleuberi_cli.config_options import cli_command
from stages.core.preflight import Output, preflight
from stages.core.records import ReadOptions
from stages.eval.config import EvalConfig
from stages.metrics import DEFAULT_EVAL_METRICS, METRICS

if TYPE_CHECKING:
    from stages.eval.journal import AnswerJournal

HELP = f"""Measure whether training helped: generate held-out answers with the base model and each
--adapter, score them against the references, and compare each system with the base.

Per system: every --metric as a mean with a seeded bootstrap 95% interval, answer length (tokens and
words) and truncation rate. Against the base, per metric: the mean difference with a paired bootstrap
95% interval (prompts resampled with their pairs), the win / tie / loss shares with a sign test, and
the length control: base@len(NAME), the base's answers cut per prompt to NAME's answer length and
scored the same way. A gain "survives" when NAME beats that cut base too (interval above zero);
otherwise it is a change of length, not learning. One verdict line per system ends the summary. stdout gets one
record per prompt with an `evaluation` field ({{system: completion, scores, tokens, ...}}); the summary
table goes to stderr and, with --report, to a file (.md: Markdown tables; else JSON). Generation is
greedy by default. Reads all records into memory.

Judges (both off by default): --judge-model PATH, a local sequence-classification reward model
(win rate by reward); --judge-url URL, an OpenAI-compatible endpoint asked for a pairwise verdict
(answer order randomised per pair, retries with backoff, verdicts cached on disk).

With --agreement the input is instead pairs {{id, prompt, response_a, response_b, winner,
references}} (winner a|b|tie, or Arena's model_a|model_b|tie; `tie (bothbad)` pairs are dropped and
counted): how often each metric, a `longer` baseline and a seeded `random` baseline pick the human
winner, in total and using the first k references.

Answers produced elsewhere: --answers NAME=FILE (repeatable) adds a system whose answers are read,
not generated: FILE has one record per held-out id with `id` and `completion` (or `completions`, the
first is used); references come from -i; a missing or extra id is an error. With only --answers (no
--model, no --adapter) no model is loaded, and --baseline NAME (default: a system named "base", else
the first) is the system the others are compared with. The same holds with --served systems: without
--model or --adapter the base model answers nothing (its tokenizer still builds the served prompts).

Metrics: {", ".join(METRICS)} (default: {", ".join(DEFAULT_EVAL_METRICS)}); rm:PATH and rm-url:URL
report raw reward-model scores, bertscore[:ENCODER] and emb[:ENCODER] encoder similarities.

\b
Examples:
  bleuberi eval -i examples/data/heldout.jsonl --adapter runs/x/adapter --report report.md > answers.jsonl
  bleuberi eval -i heldout.jsonl --adapter runs/bleu/adapter=bleu --adapter runs/sft/adapter=sft
  bleuberi eval -i heldout.jsonl --answers base=base.jsonl --answers grpo=grpo.jsonl --baseline base
  bleuberi eval -i heldout.jsonl --adapter runs/x/adapter --served big=http://gpu-box:8000/v1#Qwen2.5-7B-Instruct
  bleuberi eval --agreement -i examples/pairs.jsonl --report agreement.md > pairs.scored.jsonl
"""


@cli_command({"config": EvalConfig, "reading": ReadOptions})
def eval_command(
    config: EvalConfig,
    reading: ReadOptions,
    output: OutputOpt = None,
    report: Annotated[
        str | None,
        typer.Option("--report", metavar="FILE", help="Write the summary: FILE.md as Markdown tables, else JSON."),
    ] = None,
    agreement: Annotated[
        bool, typer.Option("--agreement", help="Input is human preference pairs: measure metric agreement.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="With -o or --report: keep the answers a killed eval finished (journaled beside that file), "
            "for every system whose settings are unchanged, and generate only the rest.",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    preflight(outputs=[Output(output), Output(report, "--report", example="report.md")])
    if agreement:
        from bleuberi_cli.agreement_cmd import agreement as measure

        measure(reading, output, config, report=report, quiet=quiet)
        return
    systems = config.systems
    preflight(
        inputs=[reading.input, *(system.answers for system in systems if system.answers)],
        models=[config.base_model, config.judges.judge_model],
        adapters=[system.adapter for system in systems],
        needs=[spec.needs() for spec in config.metric_specs],
    )
    from stages.eval.journal import AnswerJournal, finished_answers

    journaled = output or report  # the answers are journaled beside the file the eval writes
    kept = finished_work(
        journaled, resume=resume, quiet=quiet, what="answers", find=lambda target, _: finished_answers(target),
        needs="-o FILE or --report FILE",
    )  # fmt: skip
    records = read_all_records(reading, quiet=quiet, purpose="evaluate", needed=True)
    records, cuts = config.check_prompts(records)
    for line in cuts.lines("held-out prompts") if cuts else []:
        say(line, quiet=quiet)
    if records:
        with AnswerJournal(journaled, kept) if journaled else contextlib.nullcontext() as journal:
            _evaluate(records, config, output, report, quiet=quiet, journal=journal)


def _evaluate(
    records: list[dict],
    config: EvalConfig,
    output: str | None,
    report: str | None,
    *,
    quiet: bool,
    journal: AnswerJournal | None,
) -> None:
    from stages.core.jsonl import stop_if_reader_gone
    from stages.eval.evaluate import evaluate
    from stages.eval.report import eval_tables, verdict

    total = len(records) * sum(1 for s in config.systems if not s.answers)  # answers to generate
    with progress("generating", quiet=quiet, total=total, unit="answers") as advance:

        def on_progress(_system: str, answers: int) -> None:
            if output is None and report is None:  # stdout is all it writes: `| head` done means done
                stop_if_reader_gone()
            advance(answers)

        result = evaluate(
            records,
            config,
            on_progress=on_progress,
            on_message=lambda m: say(m, quiet=quiet),
            journal=journal,
        )
    tables = eval_tables(result.summary)
    emit_results(result.records, result.summary, tables, output=output, report=report, quiet=quiet)
    summary = result.summary
    for name, entry in summary["systems"].items():
        if "vs_base" in entry and "length_of" not in entry:
            say(f"{name}: " + verdict(summary, name, summary["metrics"][0]), quiet=quiet)
