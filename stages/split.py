"""The `split` stage: one record file into a training pool and a held-out set that share no id.

    pool, heldout = split_records(records, SplitConfig(held_out=0.2, seed=42))

Which records are held out depends only on their ids and the seed: each id is ranked by a seeded hash,
and the first `held_out` of that ranking go to the held-out set (a count, or a share of the records
rounded half up). Reordering the file, or splitting it again with the same seed, gives the same split.
Both parts keep the input order and the records as they were (no field is added).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stages.core import options
from stages.core.errors import UsageError
from stages.core.options import option


@dataclass
class SplitConfig(options.Options):
    """Every option of `split` (declared once: stages/core/options.py)."""

    held_out: float = option(
        0.2,
        "how many records to hold out: a share below 1 (0.2: a fifth, rounded half up) or a count (40)",
        metavar="N|F",
    )
    seed: int = options.seed_option()

    def __post_init__(self) -> None:
        if self.held_out <= 0 or (self.held_out >= 1 and self.held_out != int(self.held_out)):
            raise UsageError(f"--held-out must be a share in (0, 1) or a whole count >= 1, got {self.held_out:g}")

    def size(self, total: int) -> int:
        """How many of `total` records are held out (never all of them: the pool keeps at least one)."""
        wanted = math.floor(self.held_out * total + 0.5) if self.held_out < 1 else int(self.held_out)
        return min(wanted, max(total - 1, 0))


def held_out_rank(record_id: str, seed: int) -> str:
    """Where a record stands in the seeded ranking: its id's hash under the seed."""
    return hashlib.sha256(f"split:{seed}:{record_id}".encode()).hexdigest()


def split_records(
    records: Sequence[dict[str, Any]], config: SplitConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pool, held-out): the first `config.size` records of the seeded ranking are held out; both in input order."""
    ranked = sorted(range(len(records)), key=lambda i: held_out_rank(records[i]["id"], config.seed))
    chosen = set(ranked[: config.size(len(records))])
    pool = [record for i, record in enumerate(records) if i not in chosen]
    heldout = [record for i, record in enumerate(records) if i in chosen]
    return pool, heldout


__all__ = ["SplitConfig", "held_out_rank", "split_records"]
