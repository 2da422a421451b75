"""Outputs a kill cannot lose: what a command finished is kept, and the rerun with `--resume` keeps it.

Every `-o FILE` is written through a temporary file beside it (`.FILE.XXXXXXXX.tmp`, see
stages/core/files.py), its journal: each finished record reaches it at once as one complete, flushed
JSON line, and FILE itself appears only when the command succeeds, in one rename. A reader of FILE so
never sees a half-written line or a half-done run. A kill (-9, a dead server, Ctrl-C) leaves the
journal; the flock its writer held dies with the process, which tells a dead writer's journal from a
live one's. `finished(FILE)` reads what earlier runs finished: FILE itself (an earlier run completed
it) and every journal killed runs left. A rerun with `--resume` keeps those records and does the rest;
without it the command says in one line how many are there and how to keep them, and starts over: the
records of other settings must not be mixed in without being asked for. A successful write removes the
journals killed runs left.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from stages.core.errors import InputError
from stages.core.files import unowned


@dataclass
class Finished:
    """Records earlier runs of a command finished, by id (or another key: the first one found wins)."""

    target: Path
    records: dict[Hashable, dict[str, Any]] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)  # where they were found: the target, journals
    name: str | None = None  # what the messages call the output (default: the target)

    @property
    def count(self) -> int:
        return len(self.records)

    def kept_line(self, what: str = "records") -> str:
        """The first line a resumed command says."""
        if not self.records:
            return f"resuming: no finished {what} of {self.name or self.target} yet; starting from the first"
        return f"resuming: kept {self.count} finished {what} of {self.name or self.target} ({self._where()})"

    def left_line(self, what: str = "records") -> str:
        """What a rerun without --resume says about them."""
        return (
            f"{self.name or self.target}: {self.count} finished {what} of an earlier run are there "
            f"({self._where()}); add --resume to keep them (this run starts over)"
        )

    def _where(self) -> str:
        journals = [path for path in self.sources if path != self.target]
        parts = [f"{self.target.name} itself"] if self.target in self.sources else []
        if journals:
            parts.append(f"the journal{'s' if len(journals) > 1 else ''} a killed run left")
        return " and ".join(parts)


def journals(target: str | os.PathLike[str]) -> list[Path]:
    """The journals (temporary files) killed writers of `target` left beside it, oldest first; one a live
    writer still holds is not among them."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp$")
    try:
        found = [path for path in target.parent.iterdir() if pattern.match(path.name) and unowned(path)]
    except OSError:
        return []
    return sorted(found, key=lambda path: path.stat().st_mtime)


def finished(
    target: str | os.PathLike[str],
    *,
    read_target: bool = True,
    key: Callable[[dict[str, Any]], Hashable] = lambda record: record["id"],
) -> Finished:
    """What earlier runs finished: `target` itself (read by its format; not with `read_target=False`,
    where the target is not a file of such records) and the journals killed runs left, by `key`."""
    target = Path(target)
    result = Finished(target)
    if read_target and target.exists():
        _add(result, target, _target_records(target), key)
    for journal in journals(target):
        _add(result, journal, journal_records(journal), key)
    return result


def _add(
    result: Finished, source: Path, records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable]
) -> None:
    found = False
    for record in records:
        found = True
        result.records.setdefault(key(record), record)
    if found:
        result.sources.append(source)


def _target_records(target: Path) -> Iterator[dict[str, Any]]:
    """An earlier output, read by its format; a JSONL one as a journal is (a file an older bleuberi appended
    to may end in a line a kill cut in half: that line is left out)."""
    from stages.core.formats import input_format, iter_rows

    if input_format(target) == "jsonl":
        yield from journal_records(target)
        return
    for line, value in iter_rows(target):
        if isinstance(value, Exception):
            raise InputError(str(target), line, "not valid JSON; cannot resume after a damaged line") from None
        yield _with_id(value, target, line)


def journal_records(journal: Path) -> Iterator[dict[str, Any]]:
    """The complete lines of a journal: a last line a kill cut in half is left out (a compressed journal
    ends where its last complete flush did)."""
    for line_no, raw in enumerate(_complete_lines(journal), start=1):
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InputError(str(journal), line_no, "not valid JSON; cannot resume after a damaged line") from None
        yield _with_id(value, journal, line_no)


def _with_id(value: Any, source: Path, line: int) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        raise InputError(str(source), line, "a record without a string id; cannot resume", "id")
    return value


def _complete_lines(journal: Path) -> list[bytes]:
    data = journal.read_bytes()
    if data[:2] == b"\x1f\x8b":  # the journal of a .gz output
        data = _decompressed_prefix(data)
    return [line for line in data[: data.rfind(b"\n") + 1].splitlines() if line.strip()]


def _decompressed_prefix(data: bytes) -> bytes:
    """All a gzip stream cut by a kill holds up to where it stops (each record was sync-flushed)."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        return decompressor.decompress(data)
    except zlib.error:
        return b""


__all__ = ["Finished", "finished", "journal_records", "journals"]
