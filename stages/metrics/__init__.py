"""Metrics and rewards, looked up by name in one registry. Each declares the range of its scores
(`Metric.scale`); the list below is derived from the classes themselves.

>>> from stages.metrics import get_metric
>>> bleu = get_metric("bleu")
>>> round(bleu.sentence_score("The cat sat on the mat.", ["The cat sat on the mat."]), 6)
1.0
"""

from __future__ import annotations

from stages.metrics.base import Batch, Metric, Usage, scale_text
from stages.metrics.bleu import Bleu, PaperBleu
from stages.metrics.chrf import ChrF
from stages.metrics.judge import JudgeError, JudgeReward
from stages.metrics.neural import BertScore, Embedding
from stages.metrics.python import PythonReward, RewardFunctionError
from stages.metrics.reasoning import Format
from stages.metrics.registry import (
    METRICS,
    SPEC_HELP,
    MetricSpec,
    get_metric,
    metric_list,
    parse_spec,
    parse_specs,
    python_signatures,
)
from stages.metrics.reward_model import RemoteReward, RewardModel
from stages.metrics.rouge import BleuRougeF1, RougeL

__doc__ = f"{__doc__}\nMetrics (name, range of a score, definition):\n\n{metric_list()}\n"

# The exact string metrics: no model, references only, scores on 0..1 (1 for a reference itself).
STRING_METRICS = ("bleu", "bleu-paper", "chrf", "rouge-l", "bleu-rouge-f1")

# What `eval` and `bleuberi run` report when no metric is named: the trained reward and the ones it was not.
DEFAULT_EVAL_METRICS = ("bleu", "bleu-paper", "chrf", "rouge-l")


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
    "JudgeError",
    "JudgeReward",
    "Metric",
    "MetricSpec",
    "PaperBleu",
    "PythonReward",
    "RemoteReward",
    "RewardFunctionError",
    "RewardModel",
    "RougeL",
    "Usage",
    "get_metric",
    "metric_list",
    "parse_spec",
    "parse_specs",
    "python_signatures",
    "scale_text",
]
