"""The `eval` stage: did training help? Generate held-out answers with the base model and each adapter,
score them against the references, and compare every system with the base prompt by prompt.

Library use:

    config = EvalConfig(adapters=["runs/x/adapter=bleuberi"], max_new_tokens=128)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.errors import UsageError
from stages.core.models import DEFAULT_MODEL
from stages.engines.base import SamplingParams
from stages.engines.generator import EngineOptions
from stages.eval.stats import DEFAULT_RESAMPLES
from stages.metrics import DEFAULT_EVAL_METRICS, get_metric

if TYPE_CHECKING:
    from stages.eval.judges import HttpJudge, RewardModelJudge

BASE = "base"


@dataclass(frozen=True)
class System:
    name: str
    adapter: str | None
    answers: str | None = None  # a file of answers produced elsewhere: nothing is generated
    engine: EngineOptions | None = None  # a system served elsewhere (default: the eval's own engine)
    length_of: str | None = None  # a length control: the baseline cut to this system's answer lengths


def parse_systems(
    adapter_specs: Sequence[str], answer_specs: Sequence[str] = (), *, with_base: bool = True
) -> list[System]:
    """`PATH[=NAME]` adapter specs and `NAME=FILE` answer specs -> systems, the base first (unless
    `with_base` is False). A default adapter name is its folder's name (or the run folder's, for `.../adapter`)."""
    from stages.eval.answers import parse_answer_spec

    systems = [System(BASE, None)] if with_base else []
    for spec in answer_specs:
        name, path = parse_answer_spec(spec)
        if name in {s.name for s in systems}:
            raise UsageError(f"two systems are named {name!r}; give each --answers its own NAME")
        systems.append(System(name, None, path))
    for spec in adapter_specs:
        path, sep, name = spec.partition("=")
        if not path or (sep and not name):
            raise UsageError(f"bad --adapter {spec!r}: expected PATH or PATH=NAME")
        if not name:
            folder = Path(path.rstrip("/"))
            name = folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name
        if name in {s.name for s in systems}:
            raise UsageError(f"two systems are named {name!r}; name them with --adapter PATH=NAME")
        systems.append(System(name, path))
    return systems


def parse_served(spec: str, defaults: EngineOptions) -> System:
    """`NAME=URL[#MODEL]`: a system answered by an OpenAI-compatible server (the key and chat mode as
    for the eval's own --api-key-env / --server-chat-only)."""
    name, sep, target = spec.partition("=")
    url, _, model = target.partition("#")
    if not sep or not name or not url:
        raise UsageError(f"bad --served {spec!r}: expected NAME=URL or NAME=URL#MODEL (URL ending in /v1)")
    engine = EngineOptions("server", url, model or None, defaults.api_key_env, defaults.concurrency, defaults.chat_only)
    return System(name, None, engine=engine)


@dataclass
class EvalConfig:
    model: str | None = DEFAULT_MODEL  # None: no generated systems, only `answers`
    adapters: list[str] = field(default_factory=list)  # PATH[=NAME]
    answers: list[str] = field(default_factory=list)  # NAME=FILE: answers produced elsewhere
    baseline: str | None = None  # the system the others are compared with (default: base)
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_METRICS))
    max_new_tokens: int = 256
    temperature: float = 0.0  # greedy: the answer a user would get
    top_p: float = 1.0
    seed: int = 42
    batch_size: int = 8
    max_prompt_length: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    system_prompt: str | None = None
    trust_remote_code: bool = False
    resamples: int = DEFAULT_RESAMPLES
    engine: EngineOptions = field(default_factory=EngineOptions)  # who generates the answers
    served: list[str] = field(default_factory=list)  # NAME=URL[#MODEL]: systems served elsewhere
    length_control: bool = True  # add base@len(NAME) for every other system
    reasoning: bool = False  # as `train --reasoning`: its system prompt; metrics score the <answer> only
    tokenizer: str | None = None  # counts lengths for the length control (default: the model's; else words)
    with_base: bool = True  # False: the model only tokenizes (served systems' prompts, lengths), answers nothing

    def __post_init__(self) -> None:
        if not self.metrics:
            raise UsageError("at least one --metric is needed")
        for name in self.metrics:
            get_metric(name)  # unknown names fail here, before any model is loaded
        if self.model is None and self.adapters:
            raise UsageError("--adapter needs the base model (--model)")
        if self.model is None and not self.answers:
            raise UsageError("nothing to evaluate: give --model (and --adapter) or --answers NAME=FILE")
        if not self.systems:
            raise UsageError("nothing to evaluate: give --model, --adapter, --answers or --served")
        names = [s.name for s in self.systems]
        if self.baseline is not None and self.baseline not in names:
            raise UsageError(f"--baseline {self.baseline!r} is not a system; systems: {', '.join(names)}")
        if self.resamples < 1:
            raise UsageError("--bootstrap-resamples must be >= 1")
        self.sampling  # noqa: B018 - validates the sampling parameters early

    @property
    def systems(self) -> list[System]:
        with_base = self.with_base and self.model is not None
        systems = parse_systems(self.adapters, self.answers, with_base=with_base)
        for spec in self.served:
            system = parse_served(spec, self.engine)
            if system.name in {s.name for s in systems}:
                raise UsageError(f"two systems are named {system.name!r}; give each --served its own NAME")
            systems.append(system)
        return systems

    @property
    def baseline_name(self) -> str:
        if self.baseline is not None:
            return self.baseline
        names = [s.name for s in self.systems]
        return BASE if BASE in names else names[0]

    @property
    def prompt(self) -> str | None:
        """--system-prompt, else in reasoning mode the prompt `train --reasoning` trained with."""
        from stages.metrics.reasoning import system_prompt_for

        return system_prompt_for(self.system_prompt, self.reasoning)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p)


@dataclass
class EvalResult:
    records: list[dict[str, Any]]
    summary: dict[str, Any]


Progress = Callable[[str, int], None]  # (system name, prompts done in this call)


def generate_answers(
    records: Sequence[dict[str, Any]], config: EvalConfig, system: System, on_progress: Progress | None = None
) -> list[dict[str, Any]]:
    """One answer per record from one system: text, token count, finish reason."""
    from stages.engines.generator import Generator

    generator = Generator.load(
        config.model,
        adapter=system.adapter,
        device=config.device,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        system_prompt=config.prompt,
        max_prompt_length=config.max_prompt_length,
        engine=system.engine or config.engine,
    )
    answers = []
    for _record, [sample] in generator.generate(
        records, config.sampling, n=1, seed=config.seed, batch_size=config.batch_size
    ):
        text = generator.text(sample)
        answers.append(
            {
                "completion": text,
                "tokens": generator.answer_tokens(sample),
                "words": len(text.split()),
                "finish_reason": "stop" if sample.finished else "length",
            }
        )
        if on_progress:
            on_progress(system.name, 1)
    generator.close()  # a server engine unloads its adapter; a local model is let go
    _free_accelerator_memory()
    return answers


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
) -> EvalResult:
    """Generate, score and compare. Adds `evaluation` ({system: answer and scores}) to each record."""
    from stages.core.records import prompt_messages
    from stages.eval.answers import read_answers

    say = on_message or (lambda message: None)
    systems = config.systems
    baseline = config.baseline_name
    metrics = [get_metric(name, device=config.device) for name in config.metrics]
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
            answers = generate_answers(records, config, system, on_progress)
        _score_system(records, system.name, answers, metrics, messages, config.reasoning)
    controls = _length_controls(records, systems, config, metrics, messages, say) if config.length_control else []
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
    from stages.eval.summary import summarise

    summary = summarise(records, [*systems, *controls], config, reward_judge=reward_judge, http_judge=http_judge)
    return EvalResult(list(records), summary)


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
    columns = {
        m.name: m.paired_scores(completions if m.full_completion else scored, references, messages) for m in metrics
    }
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
    cutter = load_cutter(config.tokenizer or config.model, trust_remote_code=config.trust_remote_code)
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
