"""How often a metric picks the response people preferred: the evidence behind BLEUBERI.

A pair record is {id, prompt, response_a, response_b, winner, references} with winner `a`, `b` or
`tie` (Chatbot Arena's `model_a`, `model_b`, `tie` are accepted too). Pairs judged `tie (bothbad)`
are dropped and counted, as the paper did. For each metric, both responses are scored against the
references; the metric's winner is the higher score (a tie when equal), and agreement is the share of
pairs where it matches the human winner. Two baselines: `longer` (more characters wins) and `random`
(a seeded coin per pair). Agreement is also reported using only the first k references, k = 1..K;
a pair with fewer than k references uses all of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from stages.core.errors import InputError
from stages.core.records import ReadStats, read_validated, stable_id
from stages.engines.base import derive_seed
from stages.eval.stats import DEFAULT_RESAMPLES, bootstrap_seed, mean_with_ci
from stages.metrics import get_metric

WINNERS = {"a": "a", "b": "b", "tie": "tie", "model_a": "a", "model_b": "b"}
BOTH_BAD = "tie (bothbad)"
BASELINES = ("longer", "random")


@dataclass
class PairStats(ReadStats):
    dropped_both_bad: int = 0


def _need_string(record: dict[str, Any], name: str, source: str, line: int) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        got = "missing" if name not in record else f"expected a string, got {type(value).__name__}"
        raise InputError(source, line, got, name)
    return value


def normalise_pair(obj: Any, *, source: str, line: int) -> dict[str, Any] | None:
    """Validate a pair record in place; None for a `tie (bothbad)` pair (to be dropped)."""
    if not isinstance(obj, dict):
        raise InputError(source, line, f"expected a JSON object, got {type(obj).__name__}")
    for name in ("prompt", "response_a", "response_b"):
        _need_string(obj, name, source, line)
    winner = obj.get("winner")
    if winner == BOTH_BAD:
        return None
    if winner not in WINNERS:
        raise InputError(source, line, f"expected one of {[*WINNERS, BOTH_BAD]}, got {winner!r}", "winner")
    obj["winner"] = WINNERS[winner]
    if "references" not in obj and isinstance(obj.get("reference"), str):
        obj["references"] = [obj["reference"]]
    references = obj.get("references")
    if not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
        raise InputError(source, line, "expected a non-empty list of strings", "references")
    if "id" not in obj:
        obj["id"] = stable_id(obj)
    elif not isinstance(obj["id"], str):
        obj["id"] = str(obj["id"])
    return obj


def read_pairs(
    path: str | os.PathLike[str] | None, *, skip_invalid: bool = False, stats: PairStats | None = None
) -> Iterator[dict[str, Any]]:
    stats = stats if stats is not None else PairStats()

    def dropped() -> None:
        stats.dropped_both_bad += 1

    return read_validated(
        path,
        lambda obj, source, line: normalise_pair(obj, source=source, line=line),
        skip_invalid=skip_invalid,
        stats=stats,
        on_dropped=dropped,
        # Pairs are not keyed by id (it only seeds the random baseline), and one prompt often has
        # several judged pairs (Chatbot Arena): the same id twice is no error here.
        unique_ids=False,
    )


def _winner(score_a: float, score_b: float) -> str:
    return "a" if score_a > score_b else "b" if score_b > score_a else "tie"


@dataclass
class AgreementResult:
    records: list[dict[str, Any]]  # the pairs, each with `agreement` added
    summary: dict[str, Any] = field(default_factory=dict)


def measure_agreement(
    pairs: Iterable[dict[str, Any]],
    metrics: Sequence[str],
    *,
    seed: int = 42,
    resamples: int = DEFAULT_RESAMPLES,
    dropped_both_bad: int = 0,
) -> AgreementResult:
    """Score every pair with every metric (and the baselines); add `agreement` to each pair record."""
    scorers = [get_metric(name) for name in metrics]
    pairs = list(pairs)
    max_refs = max((len(p["references"]) for p in pairs), default=0)
    agrees: dict[str, list[float]] = {name: [] for name in [*metrics, *BASELINES]}
    by_k: dict[str, list[list[float]]] = {name: [[] for _ in range(max_refs)] for name in metrics}
    for pair in pairs:
        human = pair["winner"]
        per_metric: dict[str, Any] = {}
        for metric in scorers:
            # a metric that reads the prompt (a reward model, a judge) gets it as the one user turn
            turns = [{"role": "user", "content": pair["prompt"]}] if metric.needs_prompt else None
            for k in range(1, max_refs + 1):  # a slice past the end is all of the pair's references
                responses = [pair["response_a"], pair["response_b"]]
                a, b = metric.sentence_scores(responses, pair["references"][:k], messages=turns)
                by_k[metric.name][k - 1].append(float(_winner(a, b) == human))
            winner = _winner(a, b)  # k = max_refs: every reference, the headline figure
            per_metric[metric.name] = {"a": a, "b": b, "winner": winner, "agrees": winner == human}
            agrees[metric.name].append(float(winner == human))
        longer = _winner(len(pair["response_a"]), len(pair["response_b"]))
        coin = "a" if derive_seed(seed, "random-baseline", pair["id"]) % 2 == 0 else "b"
        agrees["longer"].append(float(longer == human))
        agrees["random"].append(float(coin == human))
        pair["agreement"] = {"human": human, "metrics": per_metric, "longer": longer, "random": coin}

    summary = {
        "pairs": len(pairs),
        "dropped_both_bad": dropped_both_bad,
        "human_winners": {w: sum(1 for p in pairs if p["winner"] == w) for w in ("a", "b", "tie")},
        "seed": seed,
        "agreement": {
            name: mean_with_ci(values, seed=bootstrap_seed(seed, name), resamples=resamples)
            for name, values in agrees.items()
        },
        "by_num_references": {
            name: [
                {"k": k + 1, **mean_with_ci(column, seed=bootstrap_seed(seed, name, k), resamples=resamples)}
                for k, column in enumerate(columns)
            ]
            for name, columns in by_k.items()
        },
        "signatures": {m.name: m.signature() for m in scorers},
    }
    return AgreementResult(pairs, summary)
