"""Small statistics shared by `eval` and `eval --agreement`: seeded bootstrap intervals, paired
differences, win rates and the sign test."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_RESAMPLES = 1000


def bootstrap_seed(*parts: object) -> int:
    """A bootstrap seed from any parts (run seed, system, metric...), so each figure resamples on its own."""
    from stages.engines.base import derive_seed

    return derive_seed(*parts) % 2**32


def bootstrap_ci(
    values: Sequence[float], *, seed: int, resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean: resample `values` with replacement `resamples` times.

    Seeded, so the same values and seed give the same interval. None for an empty sample.
    """
    import numpy as np

    if not values:
        return None
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mean_with_ci(values: Sequence[float], *, seed: int, resamples: int = DEFAULT_RESAMPLES) -> dict[str, object]:
    """{"mean", "ci95": [low, high], "n"}: how every averaged figure is reported."""
    interval = bootstrap_ci(values, seed=seed, resamples=resamples)
    return {
        "mean": statistics.fmean(values) if values else None,
        "ci95": list(interval) if interval else None,
        "n": len(values),
    }


def paired_difference(
    system: Sequence[float], base: Sequence[float], *, seed: int, resamples: int = DEFAULT_RESAMPLES
) -> dict[str, object]:
    """The mean per-prompt difference `system - base` with a paired bootstrap 95% interval.

    Resampling prompts (each keeps its own pair) measures the gain itself: two systems whose own
    intervals overlap can still differ significantly when their scores move together prompt by prompt.
    """
    differences = [s - b for s, b in zip(system, base, strict=True)]
    return mean_with_ci(differences, seed=seed, resamples=resamples)


def excludes_zero(entry: dict[str, object]) -> bool:
    """True when a {"mean", "ci95"} interval lies entirely above zero (a gain that is not noise)."""
    interval = entry.get("ci95")
    return isinstance(interval, list) and interval[0] > 0


SIGNIFICANCE = 0.05  # the level the verdicts use, matching the 95% intervals


def sign_test(wins: int, losses: int) -> float | None:
    """Two-sided exact sign test: how likely so lopsided a split of the untied prompts is if neither
    system were better (each untied prompt a fair coin). Ties are left out, as the test prescribes."""
    n = wins + losses
    if n == 0:
        return None
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class WinRate:
    """Per-prompt comparison of a system against the base: higher is a win."""

    win: int
    tie: int
    loss: int

    @classmethod
    def count(cls, system: Sequence[float], base: Sequence[float]) -> WinRate:
        pairs = list(zip(system, base, strict=True))
        return cls(
            sum(1 for s, b in pairs if s > b),
            sum(1 for s, b in pairs if s == b),
            sum(1 for s, b in pairs if s < b),
        )

    @property
    def total(self) -> int:
        return self.win + self.tie + self.loss

    def rates(self) -> dict[str, float | int | None]:
        """Shares of prompts won, tied and lost, the win rate counting a tie as half a win, and the
        sign test's p-value of wins against losses."""
        n = self.total
        if not n:
            return {"win": None, "tie": None, "loss": None, "win_rate": None, "sign_p": None, "n": 0}
        return {
            "win": self.win / n,
            "tie": self.tie / n,
            "loss": self.loss / n,
            "win_rate": (self.win + 0.5 * self.tie) / n,
            "sign_p": sign_test(self.win, self.loss),
            "n": n,
        }
