"""Eval's answers, journaled as each one finishes, so a kill loses at most the batch in progress.

Eval writes its records only at the end (every record holds every system's answer), so its answers are
journaled on the side: one line per answer, `{"id", "system", "settings", "answer"}`, in a temporary
file beside the eval's output (`.OUT.answers.XXXXXXXX.tmp`, stages/core/journal.py). `settings` is a
hash of what the answer depends on (the system, the model, the prompts, sampling, the engine), so a
resumed eval keeps an answer only for a system that would give it again; the others are generated anew.
When the eval succeeds its records are in the output and the journal is removed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.journal import Finished, finished
from stages.core.jsonl import JsonlWriter

if TYPE_CHECKING:
    from stages.eval.config import EvalConfig, System


def journal_path(output: str | Path) -> Path:
    """Where the answers of an eval writing `output` are journaled (a name no file has: only journals)."""
    output = Path(output)
    return output.with_name(f"{output.name}.answers")


def finished_answers(output: str | Path) -> Finished:
    """The answers killed evals writing `output` finished (each system's, with its settings)."""
    kept = finished(journal_path(output), read_target=False, key=answer_key)
    kept.name = str(output)
    return kept


def answer_key(entry: dict[str, Any]) -> tuple[str, str, str]:
    return entry["id"], entry["system"], entry["settings"]


def settings_digest(config: EvalConfig, system: System) -> str:
    """What one system's answers depend on: a resumed eval keeps an answer only when this is unchanged."""
    from dataclasses import asdict

    parts = {
        "system": asdict(system),
        "model": config.base_model,
        "dtype": config.model.dtype,
        "prompt": asdict(config.prompting),
        "sampling": asdict(config.sampling),
        "seed": config.seed,
        "engine": {"backend": config.engine.backend, "server_model": config.engine.server_model},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class AnswerJournal(JsonlWriter):
    """The answers as they finish (`add`), and those a killed eval finished (`kept`). Use as a context
    manager around the eval: on success the journal is removed (its answers are in the output by then);
    on failure it stays, for `--resume`."""

    def __init__(self, output: str | Path, kept: Finished | None = None) -> None:
        super().__init__(journal_path(output))
        self.output = Path(output)
        self._kept: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for entry in kept.records.values() if kept is not None else ():
            self._kept.setdefault((entry["system"], entry["settings"]), {})[entry["id"]] = entry["answer"]

    def kept(self, settings: str, system: str) -> dict[str, dict[str, Any]]:
        """The answers of `system` a killed eval finished with the same settings, by record id; written again
        into this journal, so a second kill keeps them too."""
        answers = self._kept.get((system, settings), {})
        for record_id, answer in answers.items():
            self.write({"id": record_id, "system": system, "settings": settings, "answer": answer})
        return answers

    def add(self, settings: str, system: str, record_ids: Sequence[str], answers: Sequence[dict[str, Any]]) -> None:
        for record_id, answer in zip(record_ids, answers):
            self.write({"id": record_id, "system": system, "settings": settings, "answer": answer})

    def kept_note(self) -> str:
        return f"{self.count} finished answers for {self.output} kept: add --resume to the same command to keep them"

    def _finish(self, journal: Path, target: Path) -> None:
        journal.unlink(missing_ok=True)  # the answers are in the eval's output now
