"""Reference-based metrics, all on a 0..1 scale, looked up by name in one registry.

>>> from stages.metrics import get_metric
>>> bleu = get_metric("bleu")
>>> round(bleu.sentence_score("The cat sat on the mat.", ["The cat sat on the mat."]), 6)
1.0
"""

from __future__ import annotations

from stages.core.errors import UsageError
from stages.metrics.base import Metric
from stages.metrics.bleu import Bleu, PaperBleu
from stages.metrics.chrf import ChrF
from stages.metrics.rouge import BleuRougeF1, RougeL

METRICS: dict[str, type[Metric]] = {cls.name: cls for cls in (Bleu, PaperBleu, ChrF, RougeL, BleuRougeF1)}

# What `eval` and `bleuberi run` report when no metric is named: the trained reward and the ones it was not.
DEFAULT_EVAL_METRICS = ("bleu", "bleu-paper", "chrf", "rouge-l")


def get_metric(name: str) -> Metric:
    """A configured metric object by registry name (e.g. "bleu", "bleu-paper", "chrf", "rouge-l")."""
    try:
        return METRICS[name]()
    except KeyError:
        raise UsageError(f"unknown metric {name!r}; choose from: {', '.join(METRICS)}") from None


__all__ = [
    "DEFAULT_EVAL_METRICS",
    "METRICS",
    "Bleu",
    "BleuRougeF1",
    "ChrF",
    "Metric",
    "PaperBleu",
    "RougeL",
    "get_metric",
]
