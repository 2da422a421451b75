"""Answers produced elsewhere (a vLLM batch, an API, another toolkit), evaluated as a system of `eval`.

`--answers NAME=FILE`: FILE holds one record per held-out id, in any format that `-i` reads (JSONL, Parquet,
CSV/TSV, a JSON array, a `datasets` folder; stages/core/formats.py): `id` and `completion` (or
`completions`, whose first item is used). The references always come from the held-out set (`-i`), so
every system is scored against the same ones. Optional, when present: `tokens` (an integer) or
`generation.completion_tokens` (bleuberi generate's output) for the length columns, and
`finish_reason` or `generation.finish_reasons` (`stop` / `length`) for the truncation rate; without
them those columns show "-". Every held-out id needs exactly one answer: a missing id, an id that is
not in the held-out set, or an id answered twice is an error naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stages.core.errors import InputError, UsageError
from stages.core.formats import iter_rows

SHOWN_IDS = 5


def parse_answer_spec(spec: str) -> tuple[str, str]:
    """`NAME=FILE` -> (name, file)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"bad --answers {spec!r}: expected NAME=FILE")
    return name, path


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else None


def _answer(obj: dict[str, Any], source: str, line: int) -> dict[str, Any]:
    completion = obj.get("completion")
    if completion is None and "completions" in obj:
        completion = _first(obj["completions"])
        if not isinstance(completion, str):
            raise InputError(source, line, "expected a non-empty list of strings", "completions")
    if not isinstance(completion, str):
        raise InputError(source, line, "expected a string (or `completions`, a list of strings)", "completion")
    generation = obj.get("generation") if isinstance(obj.get("generation"), dict) else {}
    tokens = obj.get("tokens", _first(generation.get("completion_tokens")))
    finish = obj.get("finish_reason", _first(generation.get("finish_reasons")))
    return {
        "completion": completion,
        "tokens": tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None,
        "words": len(completion.split()),
        "finish_reason": finish if finish in ("stop", "length") else None,
    }


def _ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:SHOWN_IDS])
    return shown + (f" (and {len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else "")


def read_answers(path: str, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One answer per held-out record, in the records' order."""
    by_id: dict[str, dict[str, Any]] = {}
    for line, obj in iter_rows(path):
        if isinstance(obj, InputError):
            raise obj
        if not isinstance(obj, dict):
            raise InputError(path, line, "expected a JSON object")
        key = obj.get("id")
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if not isinstance(key, str) or not key:
            raise InputError(path, line, "expected the held-out record's id (a string)", "id")
        if key in by_id:
            raise InputError(path, line, f"id {key!r} is answered twice", "id")
        by_id[key] = _answer(obj, path, line)
    wanted = [r["id"] for r in records]
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise InputError(path, None, f"{len(missing)} held-out ids have no answer: {_ids(missing)}")
    extra = sorted(set(by_id) - set(wanted))
    if extra:
        raise InputError(path, None, f"{len(extra)} ids are not in the held-out set: {_ids(extra)}")
    return [by_id[i] for i in wanted]
