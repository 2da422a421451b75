"""The `eval` stage: did training help? Generate held-out answers with the base model and each adapter,
score them against the references, and compare every system with the base prompt by prompt.

Library use:

    config = EvalConfig.of(adapters=["runs/x/adapter=bleuberi"], max_new_tokens=128)
    result = evaluate(records, config)            # result.records: per prompt; result.summary: per system

The base model (no adapter) is the first system and the baseline. Generation is greedy unless
a temperature is given, and goes through the generate stage's engine; each system is loaded in turn
(adapters merged into a fresh copy of the base), so only one model is in memory at a time.

Every other system also gets a length control (stages/eval/length_control.py): the baseline's
answers cut to that system's answer lengths, scored as the system `base@len(NAME)`; a gain that
survives it is not only a change of length.

Systems whose answers already exist (`answers=["NAME=FILE"]`, see stages/eval/answers.py) are scored
and compared the same way. With `model=None` no model is loaded at all: only those systems are
compared, and `baseline` (default: one named "base", else the first) takes the base's place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from stages.eval.config import EvalConfig, System
from stages.eval.journal import AnswerJournal, settings_digest
from stages.eval.summary import summarise
from stages.metrics import Batch

if TYPE_CHECKING:
    from stages.eval.judges import HttpJudge, RewardModelJudge


@dataclass
class EvalResult:
    records: list[dict[str, Any]]
    summary: dict[str, Any]


Progress = Callable[[str, int], None]  # (system name, prompts of the batch that finished)


def generate_answers(
    records: Sequence[dict[str, Any]],
    config: EvalConfig,
    system: System,
    on_progress: Progress | None = None,
    journal: AnswerJournal | None = None,
) -> list[dict[str, Any]]:
    """One answer per record from one system: text, token count, finish reason. With a `journal`, the
    answers a killed eval finished with the same settings are kept, and each new one is journaled as its
    batch finishes."""
    from stages.engines.generator import Batching, Generator

    settings = settings_digest(config, system)
    answers = journal.kept(settings, system.name) if journal is not None else {}
    todo = [record for record in records if record["id"] not in answers]
    if on_progress and len(todo) < len(records):
        on_progress(system.name, len(records) - len(todo))
    if not todo:
        return [answers[record["id"]] for record in records]
    model = replace(config.model, name=config.base_model)  # systems that generate exist only with a model
    engine = system.engine or config.engine
    generator = Generator.for_options(model, config.prompting, engine, adapter=system.adapter)

    def on_batch(prompts: int, _tokens: int) -> None:
        # per finished batch (as generate and select report), not per answer: a batch's answers come out
        # at one moment, and a rate timed between them would see no time pass
        if on_progress:
            on_progress(system.name, prompts)

    batching = Batching.of(config.batch, seed=config.seed)
    for record, [sample] in generator.generate(todo, config.sampling, batching, on_batch=on_batch, in_order=False):
        text = generator.text(sample)
        answers[record["id"]] = answer = {
            "completion": text,
            "tokens": generator.answer_tokens(sample),
            "words": len(text.split()),
            "finish_reason": "stop" if sample.finished else "length",
        }
        if journal is not None:
            journal.add(settings, system.name, [record["id"]], [answer])
    generator.close()  # a server engine unloads its adapter; a local model is let go
    _free_accelerator_memory()
    return [answers[record["id"]] for record in records]


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(
    records: Sequence[dict[str, Any]],
    config: EvalConfig,
    *,
    reward_judge: RewardModelJudge | None = None,
    http_judge: HttpJudge | None = None,
    on_progress: Progress | None = None,
    on_message: Callable[[str], None] | None = None,
    journal: AnswerJournal | None = None,
) -> EvalResult:
    """Generate, score and compare. Adds `evaluation` ({system: answer and scores}) to each record. The
    judges are config.judges' unless given; `journal` keeps the answers through a kill (see
    stages/eval/journal.py)."""
    from stages.core.records import prompt_messages
    from stages.core.threads import apply_thread_budget
    from stages.eval.answers import read_answers

    say = on_message or (lambda message: None)
    apply_thread_budget(config.model.threads, say=say)  # before any model (generator, encoder, judge) is loaded
    reward_judge = reward_judge or config.judges.reward_judge(config.model.device)
    http_judge = http_judge or config.judges.http_judge(config.seed)
    systems = config.systems
    metrics = [spec.metric(device=config.model.device) for spec in config.metric_specs]
    # answers from files are read (and their ids checked) before any model is loaded
    given = {s.name: read_answers(s.answers, records) for s in systems if s.answers}
    for record in records:
        record["evaluation"] = {}
    messages = [prompt_messages(r) for r in records] if any(m.needs_prompt for m in metrics) else None
    for system in systems:
        if system.answers:
            say(f"scoring {system.name} ({system.answers})")
            answers = given[system.name]
        else:
            say(f"generating with {system.name}" + (f" ({system.adapter})" if system.adapter else ""))
            answers = generate_answers(records, config, system, on_progress, journal)
        _score_system(records, system.name, answers, metrics, messages, config.reasoning)
    controls = _length_controls(records, systems, config, metrics, messages, say) if config.length_control else []
    _judge(records, systems, config.baseline_name, reward_judge, http_judge, say)
    for metric in metrics:  # a judge-url metric: what it cost
        if (usage := metric.usage()) is not None:
            say(f"{metric.name}: {usage.line()}")
    summary = summarise(records, [*systems, *controls], config, reward_judge=reward_judge, http_judge=http_judge)
    return EvalResult(list(records), summary)


def _judge(
    records: Sequence[dict[str, Any]],
    systems: Sequence[System],
    baseline: str,
    reward_judge: RewardModelJudge | None,
    http_judge: HttpJudge | None,
    say: Callable[[str], None],
) -> None:
    """Each answer's reward (reward-model judge) and each system's pairwise verdict against the baseline."""
    if reward_judge is not None:
        say(f"scoring answers with the reward model {reward_judge.name}")
        for system in systems:
            rewards = reward_judge.score([(r, r["evaluation"][system.name]["completion"]) for r in records])
            for record, reward in zip(records, rewards):
                record["evaluation"][system.name]["judge_reward"] = reward
    if http_judge is not None:
        for system in (s for s in systems if s.name != baseline):
            say(f"asking {http_judge.url} to compare {system.name} with {baseline}")
            for record in records:
                evaluation = record["evaluation"]
                verdict = http_judge.compare(
                    record, evaluation[system.name]["completion"], evaluation[baseline]["completion"]
                )
                evaluation[system.name]["judge_verdict"] = verdict


def _score_system(
    records: Sequence[dict[str, Any]],
    name: str,
    answers: list[dict[str, Any]],
    metrics: Sequence[Any],
    messages: list[Any] | None,
    reasoning: bool = False,
) -> None:
    completions = [a["completion"] for a in answers]
    scored = completions
    if reasoning:  # as in training: reference metrics see the <answer> part, `format` the whole completion
        from stages.metrics.reasoning import extract_answer

        scored = [extract_answer(c) for c in completions]
    references = [r["references"] for r in records]
    # every prompt is compared between systems, so every answer needs a score (a `py:` None is an error)
    whole = Batch(completions, references, messages, records, missing_ok=False)
    extracted = replace(whole, completions=scored)
    columns = {m.name: m.score_batch(whole if m.full_completion else extracted) for m in metrics}
    for i, (record, answer) in enumerate(zip(records, answers)):
        answer["scores"] = {metric: column[i] for metric, column in columns.items()}
        record["evaluation"][name] = answer


def _length_controls(
    records: Sequence[dict[str, Any]],
    systems: Sequence[System],
    config: EvalConfig,
    metrics: Sequence[Any],
    messages: list[Any] | None,
    say: Callable[[str], None],
) -> list[System]:
    """The baseline cut to each other system's answer lengths, scored like a system of its own."""
    from stages.eval.length_control import control_name, cut_answers, load_cutter

    baseline = config.baseline_name
    others = [s for s in systems if s.name != baseline]
    if not others or not records:
        return []
    cutter = load_cutter(config.tokenizer or config.base_model, trust_remote_code=config.model.trust_remote_code)
    say(f"length control: {baseline}'s answers cut to each system's lengths ({cutter.unit})")

    def texts(name: str) -> list[str]:
        return [r["evaluation"][name]["completion"] for r in records]

    controls = []
    for system in others:
        control = System(control_name(baseline, system.name), None, length_of=system.name)
        answers = cut_answers(texts(baseline), texts(system.name), cutter)
        _score_system(records, control.name, answers, metrics, messages, config.reasoning)
        controls.append(control)
    return controls
