"""`bleuberi run`'s stage hashes and the ledger of them, stages.json.

A stage declares what it reads as a frozen dataclass of inputs (stages/run/recipe.py); its hash is made
from every field of that declaration, so an input the stage reads is an input its hash covers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.core.declare import computed_values
from stages.core.files import atomic_path


def file_digest(path: Path) -> str:
    """The contents' hash; for a folder (save_to_disk), every file's name and contents."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stage_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_parts(inputs: Any) -> list[Any]:
    """What each declared input adds to its stage's hash, in declaration order: a file (a Path) its
    contents' hash, a config its settings that say what the stage computes (`computed_values`: not
    threads or a server's address), a tuple each of its items, anything else its value."""
    parts: list[Any] = []
    for declared in dataclasses.fields(inputs):
        value = getattr(inputs, declared.name)
        if isinstance(value, Path):
            parts.append(file_digest(value))
        elif dataclasses.is_dataclass(value):
            parts.append(computed_values(value))
        elif isinstance(value, tuple):
            parts.extend(value)
        else:
            parts.append(value)
    return parts


def inputs_digest(stage: str, inputs: Any) -> str:
    """A stage's hash: its name and every input it declares."""
    return stage_hash(stage, *input_parts(inputs))


@dataclass
class StageLedger:
    """stages.json: {stage: {"hash", "done", "seconds"}}, rewritten atomically at every change."""

    path: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, run_dir: Path) -> StageLedger:
        path = run_dir / "stages.json"
        return cls(path, json.loads(path.read_text()) if path.is_file() else {})

    def status(self, stage: str, digest: str) -> str:
        """done (skip), partial (continue), or new (start afresh)."""
        entry = self.entries.get(stage)
        if not entry or entry.get("hash") != digest:
            return "new"
        return "done" if entry.get("done") else "partial"

    def mark(
        self, stage: str, digest: str, *, done: bool, seconds: float | None = None, threads: int | None = None
    ) -> None:
        self.entries[stage] = {
            "hash": digest,
            "done": done,
            **({"seconds": round(seconds, 1)} if seconds else {}),
            **({"threads": threads} if threads else {}),  # the intra-op threads the stage ran with
        }
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.entries, indent=2) + "\n")
