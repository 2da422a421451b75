"""Metrics and rewards, looked up by name in one registry. Each declares the range of its scores
(`Metric.scale`); the list below is derived from the classes themselves.

>>> from stages.metrics import get_metric
>>> bleu = get_metric("bleu")
>>> round(bleu.sentence_score("The cat sat on the mat.", ["The cat sat on the mat."]), 6)
1.0
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Sequence

from stages.core.errors import UsageError
from stages.metrics.base import Batch, Metric, scale_text
from stages.metrics.bleu import Bleu, PaperBleu
from stages.metrics.chrf import ChrF
from stages.metrics.neural import BertScore, Embedding
from stages.metrics.python import PythonReward, RewardFunctionError
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
        Format,
        PythonReward,
    )
}


def metric_list(indent: str = "  ") -> str:
    """One line per metric: name, range, description (for `score --help` and this package's docstring)."""
    return "\n".join(
        f"{indent}{name:<14} {scale_text(cls.scale):<10} {cls.description}" for name, cls in METRICS.items()
    )


__doc__ = f"{__doc__}\nMetrics (name, range of a score, definition):\n\n{metric_list()}\n"

# The exact string metrics: no model, references only, scores on 0..1 (1 for a reference itself).
STRING_METRICS = ("bleu", "bleu-paper", "chrf", "rouge-l", "bleu-rouge-f1")

# What `eval` and `bleuberi run` report when no metric is named: the trained reward and the ones it was not.
DEFAULT_EVAL_METRICS = ("bleu", "bleu-paper", "chrf", "rouge-l")

SPEC_HELP = (
    "A spec is NAME[:ARG][:WEIGHT]. Only rm (PATH), rm-url (URL), bertscore and emb (optional ENCODER) and py "
    "(FILE.py:FUNCTION or module:FUNCTION, your own reward) take an ARG; a trailing :NUMBER is always the weight "
    "(rm:/models/rm:0.5 = that RM with weight 0.5; rm-url:http://host:8000/score:2; py:rewards.py:no_lists:0.3). "
    "An rm-url URL needs a path, so a port is never read as a weight."
)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_weighted(spec: str) -> tuple[str, float | None]:
    """Split a spec into the metric (with its argument) and its weight: a trailing `:NUMBER` is the weight.

    "bleu" -> ("bleu", None); "rouge-l:0.5" -> ("rouge-l", 0.5); "rm:/m/rm" -> ("rm:/m/rm", None);
    "rm:/m/rm:2" -> ("rm:/m/rm", 2.0); "rm-url:http://h:8000/score:0.5" -> ("rm-url:http://h:8000/score", 0.5).
    """
    name, sep, rest = spec.partition(":")
    if not sep:
        return spec, None
    cls = METRICS.get(name)
    if cls is None or cls.argument is None:  # NAME:WEIGHT is all these metrics take
        weight = _number(rest)
        if weight is None:
            raise UsageError(f"bad weight in {spec!r}: expected NAME:NUMBER, e.g. rouge-l:0.5")
        return name, _finite(weight, spec)
    head, sep2, tail = rest.rpartition(":")
    weight = _number(tail)
    if weight is None:
        return spec, None
    if name == "rm-url" and "://" in head and not urllib.parse.urlsplit(head).path:
        raise UsageError(
            f"{spec!r}: an rm-url URL needs a path (e.g. {head}:{tail}/score); a trailing :NUMBER is the "
            f"weight, so ':{tail}' would be read as one"
        )
    return (f"{name}:{head}" if sep2 and head else name), _finite(weight, spec)


def _finite(weight: float, spec: str) -> float:
    if not math.isfinite(weight):
        raise UsageError(f"bad weight in {spec!r}: must be finite")
    return weight


def python_signatures(specs: Sequence[str]) -> list[str]:
    """The signatures (with the source file's sha256) of the `py:` functions among `specs`, e.g. for a stage
    hash that must change when a function does. Empty when there are none."""
    names = [parse_weighted(spec)[0] for spec in specs]
    return [get_metric(name).signature() for name in names if name.startswith(f"{PythonReward.name}:")]


def get_metric(name: str, *, device: str = "auto") -> Metric:
    """A configured metric object by spec without weight: "bleu", "chrf", "rm:PATH", "bertscore:ENCODER", ...

    Model-based metrics are cheap to create: their model loads on first use, on `device`.
    """
    base, sep, argument = name.partition(":")
    cls = METRICS.get(base)
    if cls is None:
        raise UsageError(f"unknown metric {name!r}; choose from: {', '.join(METRICS)}")
    if cls.argument is None:
        if sep:
            raise UsageError(f"metric {base!r} takes no argument, got {name!r}")
        return cls()
    return cls(argument or None, device=device)  # type: ignore[call-arg]


__all__ = [
    "DEFAULT_EVAL_METRICS",
    "METRICS",
    "SPEC_HELP",
    "STRING_METRICS",
    "Batch",
    "BertScore",
    "Bleu",
    "BleuRougeF1",
    "ChrF",
    "Embedding",
    "Format",
    "Metric",
    "PaperBleu",
    "PythonReward",
    "RemoteReward",
    "RewardFunctionError",
    "RewardModel",
    "RougeL",
    "get_metric",
    "metric_list",
    "parse_weighted",
    "python_signatures",
    "scale_text",
]
