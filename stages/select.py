"""The `select` stage: pick N records by their `score` (hard = lowest, as in the BLEUBERI paper).

Selection needs the whole pool in memory. Ties are broken by a seeded hash of the record id, so the
result depends only on the pool's contents and the seed, never on the input order. Selected records
are returned in their input order, each with a `selection` field: mode, rank (0 = first picked) and
pool size.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from stages.core import options
from stages.core.errors import UsageError
from stages.core.files import atomic_path
from stages.core.options import option

Mode = Literal["hard", "easy", "medium", "random"]
MODES: tuple[str, ...] = get_args(Mode)


@dataclass
class SelectConfig(options.Options):
    """Every option of `select`, and of a `bleuberi run` config's [select] (declared once:
    stages/core/options.py)."""

    mode: Mode = option(
        "hard",
        "hard (the lowest scores: the BLEUBERI recipe) | easy (the highest) | medium (around the median) "
        "| random (a seeded sample; needs no scores)",
    )
    # One of the two is given: a config that sets one drops a default of the other (a run's num).
    num: int | None = option(None, "how many records to keep", metavar="N", flags=("-n", "--num"), excludes="fraction")
    fraction: float | None = option(None, "share of the pool to keep, in (0, 1]", metavar="F")
    seed: int = options.seed_option()

    def __post_init__(self) -> None:
        options.check_literals(self)
        if (self.num is None) == (self.fraction is None):
            raise UsageError("give exactly one of -n/--num and --fraction")
        if self.num is not None and self.num < 1:
            raise UsageError(f"-n/--num must be >= 1, got {self.num} (a selection of nothing trains nothing)")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise UsageError(f"--fraction must be in (0, 1], got {self.fraction}")

    def shortfall(self, pool_size: int) -> str | None:
        """A line when -n asks for more records than the pool holds (all of them are kept), else None."""
        if self.num is None or self.num <= pool_size or not pool_size:
            return None
        return f"-n {self.num} asks for more records than the pool's {pool_size}: all {pool_size} are kept"

    def size(self, pool_size: int) -> int:
        """How many to pick: `num`, or `fraction` of the pool rounded half up (never more than the pool)."""
        if self.num is not None:
            return min(self.num, pool_size)
        assert self.fraction is not None
        return min(pool_size, math.floor(self.fraction * pool_size + 0.5))


def _tie_breaker(record_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{record_id}".encode()).hexdigest()


def rank_pool(records: Sequence[dict[str, Any]], mode: Mode, seed: int = 42) -> list[int]:
    """Indices of the pool in the order `mode` picks them."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if not records:
        return []
    if mode == "random":
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        return order
    ascending = sorted(range(len(records)), key=lambda i: (records[i]["score"], _tie_breaker(records[i]["id"], seed)))
    if mode == "hard":
        return ascending
    if mode == "easy":
        return sorted(range(len(records)), key=lambda i: (-records[i]["score"], _tie_breaker(records[i]["id"], seed)))
    # medium: outward from the median, so the first N picked form a window centred on it.
    middle = (len(ascending) - 1) // 2
    order = [middle]
    for step in range(1, len(ascending)):
        for index in (middle + step, middle - step):
            if 0 <= index < len(ascending):
                order.append(index)
    return [ascending[i] for i in order[: len(ascending)]]


@dataclass
class Selection:
    chosen: list[dict[str, Any]]
    pool_scores: list[float]
    chosen_scores: list[float]


def select_records(records: Sequence[dict[str, Any]], config: SelectConfig) -> Selection:
    """Pick records (each with a numeric `score`, except in random mode). Returns them in input order."""
    mode, seed = config.mode, config.seed
    picked = rank_pool(records, mode, seed)[: config.size(len(records))]
    rank = {index: position for position, index in enumerate(picked)}
    chosen = []
    for index in sorted(picked):
        record = records[index]
        record["selection"] = {"mode": mode, "rank": rank[index], "pool_size": len(records), "seed": seed}
        chosen.append(record)
    has_scores = all("score" in r for r in records)
    return Selection(
        chosen=chosen,
        pool_scores=[r["score"] for r in records] if has_scores else [],
        chosen_scores=[r["score"] for r in chosen] if has_scores else [],
    )


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """min, 25%, median, 75%, max (linear interpolation, as numpy's default)."""
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"min": ordered[0], "p25": at(0.25), "median": at(0.5), "p75": at(0.75), "max": ordered[-1]}


def plot_histogram(selection: Selection, path: str, mode: str) -> None:
    """Histogram of the pool's scores with the selected range shaded (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'bleuberi[plot]'") from None
    if not selection.pool_scores:
        raise UsageError("--plot needs scored records (random mode without scores has nothing to plot)")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(selection.pool_scores, bins=40, color="#8da0cb", label=f"pool ({len(selection.pool_scores)})")
    ax.hist(selection.chosen_scores, bins=40, color="#e78ac3", alpha=0.8, label=f"selected: {mode}")
    if selection.chosen_scores and mode != "random":
        ax.axvspan(min(selection.chosen_scores), max(selection.chosen_scores), color="#e78ac3", alpha=0.15)
    ax.set_xlabel("score")
    ax.set_ylabel("records")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
