"""The record format: one JSON object per line, normalised on input.

Canonical shape: {"id": str, "prompt": str, "references": [str, ...]} where `messages` (a chat list
of {role, content}) may stand instead of `prompt`. Accepted on input and normalised:

- Tulu/ShareGPT `messages` whose last turn is the assistant's: that turn becomes the reference and
  the turns before it are the prompt (`messages` itself is kept as it was).
- Alpaca `instruction` / `input` / `output`: prompt = instruction (+ blank line + input), reference = output.
- `reference` (a string) or `ground_truth` (a string or a list of strings) instead of `references`.
- A missing `id` gets a stable one: a hash of the prompt.

Stages only add fields; every field they do not know passes through untouched.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from stages.core.errors import InputError
from stages.core.jsonl import iter_json_lines, source_name

CHAT_ROLES = ("system", "user", "assistant", "tool")

NORMALISATION_HELP = (
    "Records are JSON objects, one per line: {id, prompt, references: [str]} or {id, messages, references}. "
    "Also accepted: chat `messages` whose last assistant turn is the reference (Tulu/ShareGPT), "
    "Alpaca `instruction`/`input`/`output`, and `reference` or `ground_truth` for `references`. "
    "A missing id becomes a hash of the prompt; unknown fields pass through."
)


@dataclass
class ReadStats:
    """What a reader saw: counted so the CLI can print an honest summary."""

    records: int = 0
    skipped: int = 0
    first_errors: list[str] = field(default_factory=list)

    def note_skip(self, error: InputError) -> None:
        self.skipped += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(str(error))


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _string_list(value: Any, source: str, line: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise InputError(source, line, f"expected a non-empty list of strings, got {_type_name(value)}", name)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InputError(source, line, f"item {i} is {_type_name(item)}, expected a string", name)
    return value


def _check_messages(value: Any, source: str, line: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InputError(source, line, f"expected a non-empty list of chat turns, got {_type_name(value)}", "messages")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise InputError(source, line, f"turn {i} is {_type_name(turn)}, expected an object", "messages")
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            raise InputError(source, line, f"turn {i} has role {role!r}, expected one of {CHAT_ROLES}", "messages")
        if not isinstance(content, str):
            raise InputError(source, line, f"turn {i} content is {_type_name(content)}, expected a string", "messages")
    return value


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The chat turns a model answers: `prompt` as one user turn, or `messages` minus a final assistant turn."""
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    messages = record["messages"]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def prompt_text(record: dict[str, Any]) -> str:
    """A plain-text view of the prompt (for ids, logs and length checks)."""
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt_messages(record))


def stable_id(record: dict[str, Any]) -> str:
    if isinstance(record.get("prompt"), str):
        key = record["prompt"].encode()
    else:
        key = orjson.dumps(prompt_messages(record), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(key).hexdigest()[:16]


def normalise(
    obj: Any,
    *,
    source: str = "<record>",
    line: int = 0,
    require: Iterable[str] = (),
    references_optional: bool = False,
) -> dict[str, Any]:
    """Validate one record and bring it to the canonical shape (in place; the same dict is returned).

    `require` names extra fields a stage needs: "completions" (a non-empty list of strings) or
    "score" (a finite number).
    """
    if not isinstance(obj, dict):
        raise InputError(source, line, f"expected a JSON object, got {_type_name(obj)}")
    record: dict[str, Any] = obj
    _normalise_prompt(record, source, line)
    has_reference = any(k in record for k in ("references", "reference", "ground_truth", "output"))
    if references_optional and not has_reference:
        record["references"] = []  # `generate --as-references` is about to write them
    if not (references_optional and record.get("references") == []):
        _normalise_references(record, source, line)
    _normalise_id(record, source, line)
    for name in require:
        _check_required(record, name, source, line)
    return record


def _normalise_prompt(record: dict[str, Any], source: str, line: int) -> None:
    """`prompt`, else chat `messages`, else Alpaca `instruction` (+ `input`)."""
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise InputError(source, line, f"expected a string, got {_type_name(record['prompt'])}", "prompt")
        if not record["prompt"].strip():
            raise InputError(source, line, "is empty", "prompt")
    elif "messages" in record:
        messages = _check_messages(record["messages"], source, line)
        context = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        if not any(m["role"] == "user" and m["content"].strip() for m in context):
            raise InputError(source, line, "has no user turn before the final answer", "messages")
        if "references" not in record and messages[-1]["role"] == "assistant" and not _has_alt_reference(record):
            record["references"] = [messages[-1]["content"]]
    elif "instruction" in record:
        instruction, extra = record["instruction"], record.get("input", "")
        if not isinstance(instruction, str) or not instruction.strip():
            raise InputError(source, line, "expected a non-empty string", "instruction")
        if not isinstance(extra, str):
            raise InputError(source, line, f"expected a string, got {_type_name(extra)}", "input")
        record["prompt"] = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    else:
        raise InputError(source, line, "missing (or give `messages`, or `instruction`)", "prompt")


def _normalise_references(record: dict[str, Any], source: str, line: int) -> None:
    """`references`, else `reference`, `ground_truth`, or Alpaca `output`."""
    if "references" not in record:
        for alt in ("reference", "ground_truth", "output"):
            if alt in record and (alt != "output" or "instruction" in record):
                record["references"] = _string_list(record[alt], source, line, alt)
                return
        raise InputError(source, line, "missing (or give `reference` or `ground_truth`)", "references")
    if not isinstance(record["references"], list):
        got = _type_name(record["references"])
        raise InputError(source, line, f"expected a non-empty list of strings, got {got}", "references")
    _string_list(record["references"], source, line, "references")


def _normalise_id(record: dict[str, Any], source: str, line: int) -> None:
    if "id" not in record:
        record["id"] = stable_id(record)
    elif isinstance(record["id"], int) and not isinstance(record["id"], bool):
        record["id"] = str(record["id"])
    elif not isinstance(record["id"], str) or not record["id"]:
        raise InputError(source, line, f"expected a non-empty string, got {_type_name(record['id'])}", "id")


def _check_required(record: dict[str, Any], name: str, source: str, line: int) -> None:
    if name == "completions":
        if "completions" not in record:
            raise InputError(source, line, "missing (run `bleuberi generate` first)", "completions")
        _string_list_strict(record["completions"], source, line, "completions")
    elif name == "score":
        value = record.get("score")
        if "score" not in record:
            raise InputError(source, line, "missing (run `bleuberi score` first, or use --mode random)", "score")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(source, line, f"expected a finite number, got {value!r}", "score")
    else:  # pragma: no cover - programming error
        raise ValueError(f"unknown requirement {name!r}")


def _has_alt_reference(record: dict[str, Any]) -> bool:
    return "reference" in record or "ground_truth" in record


def _string_list_strict(value: Any, source: str, line: int, name: str) -> list[str]:
    if not isinstance(value, list):
        raise InputError(source, line, f"expected a non-empty list of strings, got {_type_name(value)}", name)
    return _string_list(value, source, line, name)


def duplicate_id(key: str, first_line: dict[str, int], source: str, line: int, *, given: bool) -> None:
    """Refuse an id seen before. Stages key answers, resumes and selections by id, so a second record
    with the same id would be merged into the first or dropped without a word."""
    if key not in first_line:
        first_line[key] = line
        return
    why = "" if given else " (a missing id is a hash of the prompt: give records with the same prompt ids)"
    raise InputError(source, line, f"duplicate id {key!r}, first on line {first_line[key]}{why}", "id")


def read_records(
    path: str | os.PathLike[str] | None,
    *,
    require: Iterable[str] = (),
    skip_invalid: bool = False,
    stats: ReadStats | None = None,
    references_optional: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield normalised records from a JSONL file, `-`/None for stdin.

    With `skip_invalid`, records that fail validation are counted in `stats` and skipped; text that is
    not JSON is skipped the same way. Without it the first bad line raises InputError.
    """
    require = tuple(require)

    def check(obj: Any, source: str, line: int) -> dict[str, Any]:
        return normalise(obj, source=source, line=line, require=require, references_optional=references_optional)

    return read_validated(path, check, skip_invalid=skip_invalid, stats=stats)


T = TypeVar("T")


def read_validated(
    path: str | os.PathLike[str] | None,
    check: Callable[[Any, str, int], T | None],
    *,
    skip_invalid: bool = False,
    stats: ReadStats | None = None,
    on_dropped: Callable[[], None] = lambda: None,
    unique_ids: bool = True,
) -> Iterator[T]:
    """Yield `check(value, source, line)` for every JSON line; the one read-and-skip loop of every reader.

    `check` raises InputError for a bad line (raised, or counted and skipped with `skip_invalid`), or
    returns None for a valid line that is to be left out (`on_dropped` counts it). With `unique_ids`
    a record whose id an earlier line already had is a bad line (see `duplicate_id`).
    """
    source = source_name(path)
    stats = stats if stats is not None else ReadStats()
    first_line: dict[str, int] = {}  # id -> the line that had it first
    for line, obj in iter_json_lines(path):
        try:
            if isinstance(obj, InputError):
                raise obj
            given = isinstance(obj, dict) and "id" in obj
            item = check(obj, source, line)
            if unique_ids and isinstance(item, dict) and isinstance(item.get("id"), str):
                duplicate_id(item["id"], first_line, source, line, given=given)
        except InputError as error:
            if not skip_invalid:
                raise
            stats.note_skip(error)
            continue
        if item is None:
            on_dropped()
            continue
        stats.records += 1
        yield item
