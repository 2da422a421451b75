"""What `eval` compares and how: the systems, the metrics, generation settings, judges.

Every field is one `bleuberi eval` option (declared once, here; stages/core/options.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core import options
from stages.core.errors import InputError, UsageError
from stages.core.models import DEFAULT_MODEL
from stages.core.options import ModelOptions, PromptOptions, group, option, repeatable
from stages.engines.base import BatchOptions, EngineOptions, SamplingParams
from stages.eval.stats import DEFAULT_RESAMPLES
from stages.metrics import DEFAULT_EVAL_METRICS, MetricSpec, parse_specs

if TYPE_CHECKING:
    from stages.engines.prompts import PromptCuts
    from stages.eval.judges import HttpJudge, RewardModelJudge

BASE = "base"
SYSTEMS, COMPARISON, JUDGES = "Systems", "Comparison", "Judges"


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
    """`NAME=URL[,URL...][#MODEL]`: a system answered by an OpenAI-compatible server, or several serving
    the same model (the key and chat mode as for the eval's own --api-key-env / --server-chat-only)."""
    name, sep, target = spec.partition("=")
    url, _, model = target.partition("#")
    urls = [u for u in url.split(",") if u]
    if not sep or not name or not urls:
        raise UsageError(f"bad --served {spec!r}: expected NAME=URL or NAME=URL#MODEL (URL ending in /v1)")
    engine = EngineOptions(
        "server", urls, model or None, defaults.api_key_env, defaults.concurrency, defaults.chat_only
    )
    return System(name, None, engine=engine)


@dataclass(frozen=True)
class JudgeOptions:
    """The two optional judges, both off by default."""

    judge_model: str | None = option(
        None, "local reward model folder: scores every answer (win rate by reward)", metavar="PATH", panel=JUDGES
    )
    judge_url: str | None = option(
        None, "OpenAI-compatible endpoint (.../v1) asked for pairwise verdicts", metavar="URL", panel=JUDGES
    )
    judge_url_model: str = option("judge", "the `model` sent to --judge-url", metavar="NAME", panel=JUDGES)
    judge_key_env: str | None = option(
        None, "environment variable holding the endpoint's API key", metavar="VAR", panel=JUDGES
    )
    judge_timeout: float = option(60.0, "seconds per request", metavar="S", panel=JUDGES, in_digest=False)
    judge_retries: int = option(3, "retries per request", metavar="N", panel=JUDGES, in_digest=False)
    judge_cache: str | None = option(
        None, "verdict cache (default: $BLEUBERI_CACHE/judge)", metavar="DIR", panel=JUDGES, in_digest=False
    )

    def reward_judge(self, device: str) -> RewardModelJudge | None:
        from stages.eval.judges import RewardModelJudge

        return RewardModelJudge(self.judge_model, device=device) if self.judge_model else None

    def http_judge(self, seed: int) -> HttpJudge | None:
        from stages.eval.judges import HttpJudge

        if not self.judge_url:
            return None
        return HttpJudge(
            self.judge_url,
            model=self.judge_url_model,
            key_env=self.judge_key_env,
            timeout=self.judge_timeout,
            retries=self.judge_retries,
            cache_dir=self.judge_cache,
            seed=seed,
        )


@dataclass
class EvalConfig(options.Options):
    # The model's name left out (None): the embedded default, unless only --answers or --served systems are
    # given, when no model answers (a served system still needs one to build its prompts: the default).
    model: ModelOptions = group(ModelOptions)
    adapters: list[str] = repeatable(
        "a LoRA adapter to compare with the base; repeatable", metavar="PATH[=NAME]", panel=SYSTEMS, flag="--adapter"
    )
    answers: list[str] = repeatable(
        "a system whose answers already exist (a records file, as -i reads); repeatable",
        metavar="NAME=FILE",
        panel=SYSTEMS,
    )
    served: list[str] = repeatable(
        "a system answered by an OpenAI-compatible server elsewhere (prompts through --model's chat template "
        "as token ids, or as chat turns with --server-chat-only); repeatable",
        metavar="NAME=URL[#MODEL]",
        panel=SYSTEMS,
    )
    baseline: str | None = option(
        None, "the system others are compared with (default: base)", metavar="NAME", panel=SYSTEMS
    )
    metrics: list[str] = option(
        factory=lambda: list(DEFAULT_EVAL_METRICS),
        help="metric to report; repeatable",
        metavar="NAME",
        flags=("-m", "--metric"),
        panel=COMPARISON,
    )
    prompt: PromptOptions = group(PromptOptions)
    # greedy: the answer a user would get
    sampling: SamplingParams = group(SamplingParams, temperature=0.0)
    batch: BatchOptions = group(BatchOptions)
    seed: int = options.seed_option()
    bootstrap_resamples: int = option(
        DEFAULT_RESAMPLES, "resamples for the 95% intervals", metavar="N", panel=COMPARISON
    )
    engine: EngineOptions = group(EngineOptions, table=True)  # who generates the answers
    length_control: bool = option(
        True,
        "add base@len(NAME) per system: the baseline's answers cut to that system's lengths, scored the same "
        "way; a gain it also gets is length, not learning",
        panel=COMPARISON,
    )
    reasoning: bool = options.reasoning_option()
    tokenizer: str | None = option(
        None,
        "counts answer lengths for the length control (default: --model's; with only --answers: words)",
        metavar="NAME|PATH",
        panel=COMPARISON,
    )
    judges: JudgeOptions = group(JudgeOptions)

    def __post_init__(self) -> None:
        if not self.metrics:
            raise UsageError("at least one --metric is needed")
        self.metric_specs  # noqa: B018 - unknown names fail here, before any model is loaded
        if not self.systems:
            raise UsageError("nothing to evaluate: give --model, --adapter, --answers or --served")
        names = [s.name for s in self.systems]
        if self.baseline is not None and self.baseline not in names:
            raise UsageError(f"--baseline {self.baseline!r} is not a system; systems: {', '.join(names)}")
        if self.bootstrap_resamples < 1:
            raise UsageError("--bootstrap-resamples must be >= 1")

    @cached_property
    def metric_specs(self) -> list[MetricSpec]:
        """The metrics, parsed once (a weight has no meaning in a report: refused)."""
        specs = parse_specs(self.metrics)
        weighted = [str(spec) for spec in specs if spec.weight is not None]
        if weighted:
            raise UsageError(f"-m {weighted[0]}: eval reports each metric alone; a weight has no meaning here")
        for spec in specs:
            spec.metric()  # its argument checked too (a py: file imported, an rm folder looked at)
        return specs

    @property
    def metric_names(self) -> list[str]:
        return [spec.name for spec in self.metric_specs]

    @property
    def with_base(self) -> bool:
        """Does the base model answer? Not when only answers from files or servers are compared."""
        return bool(self.model.name or self.adapters or not (self.answers or self.served))

    @property
    def base_model(self) -> str | None:
        """The model loaded here (None: no model at all, only answers from files)."""
        if self.model.name:
            return self.model.name
        return None if self.answers and not self.adapters and not self.served else DEFAULT_MODEL

    @property
    def systems(self) -> list[System]:
        systems = parse_systems(self.adapters, self.answers, with_base=self.with_base and self.base_model is not None)
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

    def check_prompts(self, records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], PromptCuts | None]:
        """Before any model loads (only the base model's tokenizer): the records to evaluate and the prompts over
        --max-prompt-length (`cuts`). Each system sees the same prompts, so this is decided once: `skip` leaves
        a record out of every system, `error` refuses the eval, and a cut record gets `prompt_cut`."""
        if self.base_model is None or self.prompt.max_prompt_length is None:
            return list(records), None
        from stages.engines.generator import prompt_encoder

        encoder = prompt_encoder(replace(self.model, name=self.base_model), self.prompting)
        kept = encoder.check(records)
        if records and not kept:
            limit = self.prompt.max_prompt_length
            raise InputError(
                "<input>",
                None,
                f"no records left to evaluate: every prompt is over --max-prompt-length {limit} (--long-prompts skip)",
            )
        for record in kept:
            if cut := encoder.cuts.note(record["id"]):
                record["prompt_cut"] = cut
        return kept, encoder.cuts

    @property
    def prompting(self) -> PromptOptions:
        """The prompt options answers are generated with: --system-prompt, else in reasoning mode the prompt
        `train --reasoning` trained with."""
        from stages.metrics.reasoning import system_prompt_for

        return replace(self.prompt, system_prompt=system_prompt_for(self.prompt.system_prompt, self.reasoning))
