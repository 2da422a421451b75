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
from stages.core.formats import input_format, iter_rows
from stages.core.jsonl import source_name
from stages.core.options import group, option, repeatable

CHAT_ROLES = ("system", "user", "assistant", "tool")

NORMALISATION_HELP = (
    "Records are JSON objects, one per line: {id, prompt, references: [str]} or {id, messages, references}. "
    "Also accepted: chat `messages` whose last assistant turn is the reference (Tulu/ShareGPT), "
    "Alpaca `instruction`/`input`/`output`, and `reference` or `ground_truth` for `references`. "
    "A missing id becomes a hash of the prompt; unknown fields pass through. "
    "-i also reads .parquet, .csv, .tsv, .json (an array) and `datasets` save_to_disk folders; "
    "--prompt-field, --reference-field and --id-field map other schemas (dotted paths: reward_model.ground_truth)."
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


def _check_messages(value: Any, source: str, line: int, name: str = "messages") -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InputError(source, line, f"expected a non-empty list of chat turns, got {_type_name(value)}", name)
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise InputError(source, line, f"turn {i} is {_type_name(turn)}, expected an object", name)
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            raise InputError(source, line, f"turn {i} has role {role!r}, expected one of {CHAT_ROLES}", name)
        if not isinstance(content, str):
            raise InputError(source, line, f"turn {i} content is {_type_name(content)}, expected a string", name)
    return value


def turns_before_answer(messages: list[Any]) -> list[Any]:
    """The chat turns a model answers: `messages` without a final assistant turn (the record's answer)."""
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        return messages[:-1]
    return messages


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The chat turns a model answers: `prompt` as one user turn, or `messages` minus a final assistant turn."""
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    return [{"role": m["role"], "content": m["content"]} for m in turns_before_answer(record["messages"])]


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
        context = turns_before_answer(messages)
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


_MISSING = object()


@dataclass(frozen=True)
class FieldMap:
    """Where another schema keeps the prompt, the references and the id (verl: `prompt`, a chat list, and
    `reward_model.ground_truth`). Each is a field name or a dotted path into nested objects (a number
    indexes a list: `conversations.0.value`). The values are copied into the canonical fields before
    normalisation; the fields they came from stay as they were, except a `prompt` holding a chat list,
    which becomes `messages`."""

    prompt: str | None = None
    references: tuple[str, ...] = ()
    id: str | None = None

    @classmethod
    def of(cls, prompt: str | None, references: Iterable[str] | None, id: str | None) -> FieldMap | None:
        """The map the options give, or None when they name no field (records are read as they are)."""
        mapped = cls(prompt or None, tuple(r for r in references or () if r), id or None)
        return mapped if mapped != cls() else None

    def apply(self, obj: Any, source: str, line: int) -> Any:
        if not isinstance(obj, dict):
            return obj  # normalise names the problem
        if self.prompt:
            self._map_prompt(obj, _lookup(obj, self.prompt, source, line, "prompt"), source, line)
        if self.references:
            obj["references"] = self._references(obj, source, line)
        if self.id:
            value = _lookup(obj, self.id, source, line, "id")
            if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
                raise InputError(source, line, f"expected a non-empty string or an integer, got {value!r}", self.id)
            obj["id"] = value
        return obj

    def _map_prompt(self, obj: dict[str, Any], value: Any, source: str, line: int) -> None:
        if isinstance(value, str):
            obj["prompt"] = value
        elif isinstance(value, list):
            obj["messages"] = _check_messages(value, source, line, self.prompt)  # type: ignore[arg-type]
            obj.pop("prompt", None)  # `prompt` would win over `messages`: the chat list moved there
        else:
            raise InputError(source, line, f"expected a string or a chat list, got {_type_name(value)}", self.prompt)

    def _references(self, obj: dict[str, Any], source: str, line: int) -> list[str]:
        """Every named field's text(s), in order. With several fields, null and empty ones are skipped (rows
        with fewer references than columns); at least one text must remain."""
        several = len(self.references) > 1
        texts: list[str] = []
        for path in self.references:
            value = _lookup(obj, path, source, line, "reference")
            if several and value in (None, ""):
                continue
            if value is None:
                raise InputError(source, line, "is null", path)
            texts += _string_list(value, source, line, path)
        if not texts:
            names = ", ".join(self.references)
            raise InputError(source, line, f"no reference in any of the mapped fields ({names})", "references")
        return texts


def _lookup(obj: dict[str, Any], path: str, source: str, line: int, role: str) -> Any:
    """The value at a dotted path (a key with dots in its name is taken whole first)."""
    value = obj.get(path, _MISSING)
    if value is _MISSING:
        value = obj
        for part in path.split("."):
            if isinstance(value, dict):
                value = value.get(part, _MISSING)
            elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
                value = value[int(part)]
            else:
                value = _MISSING
            if value is _MISSING:
                break
    if value is _MISSING:
        raise InputError(source, line, f"missing (the mapped {role} field)", path)
    return value


def duplicate_id(key: str, first_line: dict[str, int], source: str, line: int, *, given: bool) -> None:
    """Refuse an id seen before. Stages key answers, resumes and selections by id, so a second record
    with the same id would be merged into the first or dropped without a word."""
    if key not in first_line:
        first_line[key] = line
        return
    why = "" if given else " (a missing id is a hash of the prompt: give records with the same prompt ids)"
    where = "line" if input_format(source) in ("jsonl", "json") else "row"  # a table's numbers count rows
    raise InputError(source, line, f"duplicate id {key!r}, first on {where} {first_line[key]}{why}", "id")


INPUT = "Input"


@dataclass(frozen=True)
class FieldOptions:
    """Where another schema keeps a record's prompt, references and id (one option each): read by every
    command that reads records, and by a run's [data]."""

    prompt_field: str | None = option(
        None,
        "take the prompt from this field (dotted for nested ones); a chat list becomes `messages`",
        metavar="PATH",
        panel=INPUT,
    )
    reference_field: list[str] = repeatable(
        "take the references from this field (a string or a list; repeat for several), e.g. reward_model.ground_truth",
        metavar="PATH",
        panel=INPUT,
    )
    id_field: str | None = option(None, "take the id from this field", metavar="PATH", panel=INPUT)

    @property
    def map(self) -> FieldMap | None:
        """The field map these options give (None: records are read as they are)."""
        return FieldMap.of(self.prompt_field, self.reference_field, self.id_field)


@dataclass(frozen=True)
class ReadOptions:
    """Where a command's records come from, and where another schema keeps their fields."""

    input: str | None = option(
        None,
        "records: .jsonl[.gz], .parquet, .csv, .tsv, .json (an array), or a `datasets` save_to_disk folder (by "
        "name). Default: stdin ('-'), JSONL",
        metavar="FILE",
        flags=("-i", "--input"),
        panel=INPUT,
    )
    fields: FieldOptions = group(FieldOptions)
    skip_invalid: bool = option(
        False, "skip records that fail validation (counted in the summary) instead of stopping", panel=INPUT
    )

    def records(
        self, *, require: Iterable[str] = (), stats: ReadStats | None = None, **settings: Any
    ) -> Iterator[dict[str, Any]]:
        """The normalised records (see `read_records`)."""
        return read_records(
            self.input, require=require, skip_invalid=self.skip_invalid, stats=stats, fields=self.fields.map, **settings
        )


def read_records(
    path: str | os.PathLike[str] | None,
    *,
    require: Iterable[str] = (),
    skip_invalid: bool = False,
    stats: ReadStats | None = None,
    references_optional: bool = False,
    fields: FieldMap | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield normalised records from a record file in any input format (see formats.py), `-`/None for stdin.

    `fields` maps another schema's fields onto the canonical ones first. With `skip_invalid`, records that
    fail validation are counted in `stats` and skipped; text that is not JSON is skipped the same way.
    Without it the first bad row raises InputError.
    """
    require = tuple(require)

    def check(obj: Any, source: str, line: int) -> dict[str, Any]:
        return normalise(obj, source=source, line=line, require=require, references_optional=references_optional)

    return read_validated(path, check, skip_invalid=skip_invalid, stats=stats, fields=fields)


T = TypeVar("T")


def read_validated(
    path: str | os.PathLike[str] | None,
    check: Callable[[Any, str, int], T | None],
    *,
    skip_invalid: bool = False,
    stats: ReadStats | None = None,
    on_dropped: Callable[[], None] = lambda: None,
    unique_ids: bool = True,
    fields: FieldMap | None = None,
) -> Iterator[T]:
    """Yield `check(value, source, line)` for every row; the one read-and-skip loop of every reader.

    `check` raises InputError for a bad row (raised, or counted and skipped with `skip_invalid`), or
    returns None for a valid row that is to be left out (`on_dropped` counts it). With `unique_ids`
    a record whose id an earlier row already had is a bad row (see `duplicate_id`). `fields` is applied
    to each row before `check`.
    """
    source = source_name(path)
    stats = stats if stats is not None else ReadStats()
    first_line: dict[str, int] = {}  # id -> the row that had it first
    for line, obj in iter_rows(path):
        try:
            if isinstance(obj, InputError):
                raise obj
            if fields is not None:
                obj = fields.apply(obj, source, line)
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
