"""`bleuberi eval`: base model vs adapters on held-out records; or metric-human agreement on pairs."""

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
    emit_results,
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
    ServerModelOpt,
    ServerUrlOpt,
    SystemPromptOpt,
    TrustRemoteCodeOpt,
)
from stages.core.models import DEFAULT_MODEL
from stages.metrics import DEFAULT_EVAL_METRICS, METRICS

if TYPE_CHECKING:
    from stages.eval.evaluate import EvalConfig
    from stages.eval.judges import HttpJudge

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


def eval_command(
    input: InputOpt = None,
    output: OutputOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="NAME|PATH|HUB-ID",
            help=f"Causal LM that generates the base system (default '{DEFAULT_MODEL}', embedded; none is loaded "
            "when only --answers are given): embedded name, local folder or hub id.",
            envvar="BLEUBERI_MODEL",
            show_default=False,
        ),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", metavar="PATH[=NAME]", help="A LoRA adapter to compare with the base; repeatable."),
    ] = None,
    answers: Annotated[
        list[str] | None,
        typer.Option(
            "--answers", metavar="NAME=FILE", help="A system whose answers already exist (JSONL); repeatable."
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option("--baseline", metavar="NAME", help="The system others are compared with (default: base)."),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option("-m", "--metric", metavar="NAME", help="Metric to report; repeatable.", show_default=False),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", metavar="N", help="Answer length limit.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", metavar="T", help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", metavar="P", help="Nucleus sampling mass.")] = 1.0,
    seed: SeedOpt = 42,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Prompts per generation batch.")] = 8,
    max_prompt_length: Annotated[
        int | None, typer.Option("--max-prompt-length", metavar="N", help="Cut longer prompts from the left.")
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
    served: Annotated[
        list[str] | None,
        typer.Option(
            "--served",
            metavar="NAME=URL[#MODEL]",
            help="A system answered by an OpenAI-compatible server elsewhere (prompts through --model's chat "
            "template as token ids, or as chat turns with --server-chat-only); repeatable.",
        ),
    ] = None,
    length_control: Annotated[
        bool,
        typer.Option(
            "--length-control/--no-length-control",
            help="Add base@len(NAME) per system: the baseline's answers cut to that system's lengths, scored "
            "the same way; a gain it also gets is length, not learning.",
        ),
    ] = True,
    reasoning: Annotated[
        bool,
        typer.Option(
            "--reasoning",
            help="Evaluate adapters trained with `train --reasoning`: its <think>/<answer> system prompt (unless "
            "--system-prompt), and metrics score only the <answer> part (`-m format` scores the format).",
        ),
    ] = False,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            metavar="NAME|PATH",
            help="Counts answer lengths for the length control (default: --model's; with only --answers: words).",
        ),
    ] = None,
    bootstrap_resamples: Annotated[
        int, typer.Option("--bootstrap-resamples", metavar="N", help="Resamples for the 95% intervals.")
    ] = 1000,
    report: Annotated[
        str | None,
        typer.Option("--report", metavar="FILE", help="Write the summary: FILE.md as Markdown tables, else JSON."),
    ] = None,
    agreement: Annotated[
        bool, typer.Option("--agreement", help="Input is human preference pairs: measure metric agreement.")
    ] = False,
    judge_model: Annotated[
        str | None, typer.Option("--judge-model", metavar="PATH", help="Local reward model folder to score answers.")
    ] = None,
    judge_url: Annotated[
        str | None,
        typer.Option("--judge-url", metavar="URL", help="OpenAI-compatible endpoint (…/v1) for pairwise verdicts."),
    ] = None,
    judge_url_model: Annotated[
        str, typer.Option("--judge-url-model", metavar="NAME", help="The `model` sent to --judge-url.")
    ] = "judge",
    judge_key_env: Annotated[
        str | None,
        typer.Option("--judge-key-env", metavar="VAR", help="Environment variable holding the endpoint's API key."),
    ] = None,
    judge_timeout: Annotated[float, typer.Option("--judge-timeout", metavar="S", help="Seconds per request.")] = 60.0,
    judge_retries: Annotated[int, typer.Option("--judge-retries", metavar="N", help="Retries per request.")] = 3,
    judge_cache: Annotated[
        str | None,
        typer.Option("--judge-cache", metavar="DIR", help="Verdict cache (default: $BLEUBERI_CACHE/judge)."),
    ] = None,
    skip_invalid: SkipInvalidOpt = False,
    quiet: QuietOpt = False,
) -> None:
    with boundary():
        metrics = metric or list(DEFAULT_EVAL_METRICS)
        if agreement:
            from bleuberi_cli.agreement_cmd import agreement as measure

            measure(
                input,
                output,
                metrics,
                seed=seed,
                resamples=bootstrap_resamples,
                report=report,
                skip_invalid=skip_invalid,
                quiet=quiet,
            )
            return
        from stages.engines.generator import EngineOptions
        from stages.eval.evaluate import EvalConfig
        from stages.eval.judges import HttpJudge

        config = EvalConfig(
            model=model or (None if answers and not adapter and not served else DEFAULT_MODEL),
            # without --model and --adapter, the base model answers nothing: it only tokenizes for --served
            with_base=bool(model or adapter or not (answers or served)),
            adapters=adapter or [],
            answers=answers or [],
            baseline=baseline,
            metrics=metrics,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            max_prompt_length=max_prompt_length,
            device=device,
            dtype=dtype,
            system_prompt=system_prompt,
            trust_remote_code=trust_remote_code,
            resamples=bootstrap_resamples,
            engine=EngineOptions(backend, server_url, server_model, api_key_env, concurrency, server_chat_only),
            served=served or [],
            length_control=length_control,
            tokenizer=tokenizer,
            reasoning=reasoning,
        )
        http_judge = None
        if judge_url:
            http_judge = HttpJudge(
                judge_url,
                model=judge_url_model,
                key_env=judge_key_env,
                timeout=judge_timeout,
                retries=judge_retries,
                cache_dir=judge_cache,
                seed=seed,
            )
        records = read_all_records(input, skip_invalid=skip_invalid, quiet=quiet, purpose="evaluate")
        if records:
            _evaluate(records, config, output, report, judge_model=judge_model, http_judge=http_judge, quiet=quiet)


def _evaluate(
    records: list[dict],
    config: EvalConfig,
    output: str | None,
    report: str | None,
    *,
    judge_model: str | None,
    http_judge: HttpJudge | None,
    quiet: bool,
) -> None:
    from stages.eval.evaluate import evaluate
    from stages.eval.judges import RewardModelJudge
    from stages.eval.report import eval_tables, verdict

    reward_judge = RewardModelJudge(judge_model, device=config.device) if judge_model else None
    total = len(records) * sum(1 for s in config.systems if not s.answers)  # answers to generate
    with progress("generating", quiet=quiet, total=total, unit="answers") as advance:
        result = evaluate(
            records,
            config,
            reward_judge=reward_judge,
            http_judge=http_judge,
            on_progress=lambda _system, n: advance(n),
            on_message=lambda m: say(m, quiet=quiet),
        )
    tables = eval_tables(result.summary)
    emit_results(result.records, result.summary, tables, output=output, report=report, quiet=quiet)
    summary = result.summary
    for name, entry in summary["systems"].items():
        if "vs_base" in entry and "length_of" not in entry:
            say(f"{name}: " + verdict(summary, name, summary["metrics"][0]), quiet=quiet)
