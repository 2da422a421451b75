"""The metric registry, and metric and reward specs parsed once into typed objects.

A spec is how a metric or reward is named on the command line and in configs: NAME[:ARG][:WEIGHT]
(`bleu`, `rouge-l:0.5`, `rm:/models/rm:2`, `py:rewards.py:no_lists:0.3`). `parse_spec` is the only
place that splits one; everything else (score, train, eval, select, `bleuberi run`, preflight) works
with the `MetricSpec` it returns, which also says what the metric needs before it runs (models,
servers, files).
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from stages.core.errors import UsageError
from stages.core.preflight import Needs
from stages.metrics.base import Metric, scale_text
from stages.metrics.bleu import Bleu, PaperBleu
from stages.metrics.chrf import ChrF
from stages.metrics.judge import JudgeReward
from stages.metrics.neural import BertScore, Embedding
from stages.metrics.python import PythonReward
from stages.metrics.reasoning import Format
from stages.metrics.reward_model import RemoteReward, RewardModel
from stages.metrics.rouge import BleuRougeF1, RougeL

METRICS: dict[str, type[Metric]] = {
    cls.name: cls
    for cls in (
        Bleu,
        PaperBleu,
        ChrF,
        RougeL,
        BleuRougeF1,
        BertScore,
        Embedding,
        RewardModel,
        RemoteReward,
        JudgeReward,
        Format,
        PythonReward,
    )
}

SPEC_HELP = (
    "A spec is NAME[:ARG][:WEIGHT]. Only rm (PATH), rm-url (URL), judge-url (URL[#MODEL]), bertscore and emb "
    "(optional ENCODER) and py (FILE.py:FUNCTION or module:FUNCTION, your own reward) take an ARG; a trailing "
    ":NUMBER is always the weight (rm:/models/rm:0.5 = that RM with weight 0.5; rm-url:http://host:8000/score:2; "
    "judge-url:http://127.0.0.1:8000/v1#smol:0.5; py:rewards.py:no_lists:0.3). A URL needs a path, so a port is "
    "never read as a weight."
)


def metric_list(indent: str = "  ") -> str:
    """One line per metric: name, range, description (for `score --help` and the package docstring)."""
    return "\n".join(
        f"{indent}{name:<14} {scale_text(cls.scale):<10} {cls.description}" for name, cls in METRICS.items()
    )


@dataclass(frozen=True)
class MetricSpec:
    """One metric or reward as named: `kind` in the registry, its argument, its weight (None: not given)."""

    kind: str
    argument: str | None = None
    weight: float | None = None

    @property
    def name(self) -> str:
        """The metric's name in records and reports: kind and argument, without the weight ("rm:/m/rm")."""
        return self.kind if self.argument is None else f"{self.kind}:{self.argument}"

    def __str__(self) -> str:
        return self.name if self.weight is None else f"{self.name}:{self.weight:g}"

    def metric(self, *, device: str = "auto") -> Metric:
        """The configured metric object (a model-based one loads its model on first use, on `device`)."""
        cls = METRICS[self.kind]
        if cls.argument is None:
            return cls()
        return cls(self.argument, device=device)  # type: ignore[call-arg]

    def needs(self) -> Needs:
        """What must exist before this metric can run: checked by preflight, before any model loads."""
        return METRICS[self.kind].needs(self.argument)

    def weighted(self, weight: float | None) -> MetricSpec:
        return replace(self, weight=weight)


def parse_spec(text: str | MetricSpec) -> MetricSpec:
    """`NAME[:ARG][:WEIGHT]` -> a MetricSpec; a trailing `:NUMBER` is the weight. An unknown name, an
    argument to a metric that takes none, or a weight that is not a finite number is a usage error.

    "bleu" -> bleu; "rouge-l:0.5" -> rouge-l weight 0.5; "rm:/m/rm:2" -> rm, argument /m/rm, weight 2;
    "rm-url:http://h:8000/score:0.5" -> rm-url, argument http://h:8000/score, weight 0.5;
    "judge-url:http://h:8000/v1#smol:2" -> judge-url, argument http://h:8000/v1#smol, weight 2.
    """
    if isinstance(text, MetricSpec):
        return text
    kind, sep, rest = text.partition(":")
    cls = METRICS.get(kind)
    if cls is None:
        raise UsageError(f"unknown metric {text!r}; choose from: {', '.join(METRICS)}")
    if not sep:
        return MetricSpec(kind)
    if cls.argument is None:  # NAME:WEIGHT is all these metrics take
        weight = _number(rest)
        if weight is None:
            raise UsageError(
                f"metric {kind!r} takes no argument, got {text!r} (a weight is NAME:NUMBER, e.g. {kind}:0.5)"
            )
        return MetricSpec(kind, None, _finite(weight, text))
    head, sep2, tail = rest.rpartition(":")
    weight = _number(tail)
    if weight is None:
        return MetricSpec(kind, rest or None)
    if cls.argument_names == "servers" and "://" in head and not urllib.parse.urlsplit(head).path:
        example = "/v1" if kind == JudgeReward.name else "/score"
        raise UsageError(
            f"{text!r}: a {kind} URL needs a path (e.g. {head}:{tail}{example}); a trailing :NUMBER is the "
            f"weight, so ':{tail}' would be read as one"
        )
    return MetricSpec(kind, head if sep2 and head else None, _finite(weight, text))


def parse_specs(texts: Iterable[str | MetricSpec]) -> list[MetricSpec]:
    specs = [parse_spec(text) for text in texts]
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"a metric is named twice: {repeated[0]}")
    return specs


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _finite(weight: float, spec: str) -> float:
    if not math.isfinite(weight):
        raise UsageError(f"bad weight in {spec!r}: must be finite")
    return weight


def get_metric(name: str, *, device: str = "auto") -> Metric:
    """A configured metric object by spec without weight: "bleu", "chrf", "rm:PATH", "bertscore:ENCODER", ...

    Model-based metrics are cheap to create: their model loads on first use, on `device`.
    """
    spec = parse_spec(name)
    if spec.weight is not None:
        raise UsageError(f"{name!r}: a weight has no meaning here; name the metric alone ({spec.name})")
    return spec.metric(device=device)


def python_signatures(specs: Sequence[MetricSpec]) -> list[str]:
    """The signatures of the metrics among `specs` that depend on a file the spec does not spell out: a `py:`
    function (its source's sha256) and a judge (its template's sha256 and settings from the environment),
    e.g. for a stage hash that must change when either does. Empty when there are none."""
    return [spec.metric().signature() for spec in specs if spec.kind in (PythonReward.name, JudgeReward.name)]
