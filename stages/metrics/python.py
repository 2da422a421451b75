"""Your own reward in Python: `py:FILE.py:FUNCTION` or `py:dotted.module:FUNCTION`, usable wherever a
metric or reward name is (score, select, train, eval, run), with an optional `:WEIGHT` after it.

The function is written as for TRL's GRPOTrainer: called once per batch (a record's completions in
`score`, a GRPO group in `train`, all of a system's answers in `eval`) with keyword arguments

- `completions`: the answers, as strings (also for chat records; TRL would pass chat turns there);
- `prompts`: per completion, its record's prompt: the text for a `prompt` record, the chat turns
  (`[{"role", "content"}, ...]`, without a final assistant turn) for a `messages` record; the system
  prompt a policy was given is not included;
- `references`: per completion, the list of its record's references;
- `completion_ids`: per completion, its token ids in `train`, else None;
- every other field of the records (`id`, `source`, ...) as a list aligned with the completions (None
  where a record lacks it); `completions` and eval's `evaluation` fields are left out.

A function without `**kwargs` is given only the arguments it names. It returns one number per
completion, or None for "no reward for this one": as TRL does, a None counts as NaN, so it is left out
of the metric's logged mean and of the weighted sum (a completion with no reward from any function gets
0 in training); `score` writes it as null and leaves it out of the record's aggregate. `async def`
functions are awaited on one event loop that lives as long as the process, so a function may call a
remote judge concurrently and keep its client between calls.

A file is imported by itself (its folder is not put on sys.path), a module as Python finds it (installed,
or under the current directory). Either is imported once per process (each `score --jobs` worker and
each torchrun rank imports it once too). The signature carries the source file's sha256, so a changed
function changes `bleuberi run`'s stage hashes.

Every failure is one line naming the spec: a missing file, module or function, an import that fails,
a call that raises (its exception type and message, and which records), a wrong number of values, a
value that is not a number, NaN or infinity.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from stages.core.errors import BleuberiError, UsageError
from stages.core.preflight import Needs
from stages.core.records import turns_before_answer
from stages.metrics.base import Batch, BatchMetric, Messages

# Passed by name; a record field with one of these names is not passed as a column.
RESERVED = frozenset({"prompt", "prompts", "completion", "completions", "references", "completion_ids", "evaluation"})


class RewardFunctionError(BleuberiError):
    """A `py:` reward that cannot be loaded, raised, or returned something that is not one score per completion."""


@dataclass(frozen=True)
class Source:
    """An imported module and the sha256 of the source file it was run from."""

    module: ModuleType
    sha256: str


_SOURCES: dict[str, Source] = {}  # by resolved file path, or by module name
_LOCK = threading.RLock()
_LOOP: asyncio.AbstractEventLoop | None = None


def split_argument(argument: str) -> tuple[str, str]:
    """The target and the function: `rewards.py:no_lists` -> (rewards.py, no_lists); `pkg.mod:judge` ->
    (pkg.mod, judge)."""
    target, sep, function = argument.rpartition(":")
    if not sep or not target or not function.isidentifier():
        raise UsageError(
            f"py:{argument}: expected py:FILE.py:FUNCTION or py:module.name:FUNCTION (then optionally :WEIGHT)"
        )
    return target, function


def is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def load_source(spec: str, target: str) -> Source:
    """Import `target` (a file path or a dotted module name) once per process."""
    if is_file_target(target):
        path = Path(target).expanduser().resolve()
        key = str(path)
        with _LOCK:
            if key not in _SOURCES:
                _SOURCES[key] = _import_file(spec, path)
            return _SOURCES[key]
    with _LOCK:
        if target not in _SOURCES:
            _SOURCES[target] = _import_module(spec, target)
        return _SOURCES[target]


def _import_file(spec: str, path: Path) -> Source:
    if not path.is_file():
        raise RewardFunctionError(f"{spec}: no such file: {path}")
    source = path.read_bytes()
    # A stable name per file: the same file is one module, whichever spelling of its path named it.
    name = f"bleuberi_reward_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None  # a .py path always gets a spec
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and typing look their module up here while it runs
    try:
        # The bytes hashed are the bytes run, even if the file changes meanwhile.
        exec(compile(source, str(path), "exec"), module.__dict__)
    except Exception as error:
        del sys.modules[name]
        raise RewardFunctionError(f"{spec}: importing {path.name} failed: {_one_line(error)}") from error
    return Source(module, hashlib.sha256(source).hexdigest())


def _import_module(spec: str, name: str) -> Source:
    if os.getcwd() not in sys.path:  # as `python -m` would, so a module beside the data is found
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and (name == error.name or name.startswith(f"{error.name}.")):
            raise RewardFunctionError(f"{spec}: no such module: {name} (a file is named with its .py)") from None
        raise RewardFunctionError(f"{spec}: importing {name} failed: {_one_line(error)}") from error
    except Exception as error:
        raise RewardFunctionError(f"{spec}: importing {name} failed: {_one_line(error)}") from error
    file = getattr(module, "__file__", None)
    content = Path(file).read_bytes() if file and Path(file).is_file() else name.encode()
    return Source(module, hashlib.sha256(content).hexdigest())


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def run_coroutine(awaitable: Any) -> Any:
    """Await on the process's one reward event loop (a daemon thread), so clients a function keeps between
    calls stay bound to a running loop; works whether or not the caller runs a loop of its own."""
    global _LOOP
    with _LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="bleuberi-py-rewards", daemon=True).start()
        loop = _LOOP

    async def wait() -> Any:
        return await awaitable

    return asyncio.run_coroutine_threadsafe(wait(), loop).result()


def prompt_of(record: Mapping[str, Any]) -> str | Messages | None:
    """A record's prompt as a function sees it: the text, or the chat turns before the answer."""
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    messages = record.get("messages")
    if not isinstance(messages, list):
        return None
    return [dict(turn) for turn in turns_before_answer(messages)]


def record_columns(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Every field of the records but the reserved ones, as lists aligned with the records."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(k for k in record if k not in RESERVED))
    return {name: [record.get(name) for record in records] for name in names}


class PythonReward(BatchMetric):
    name = "py"
    argument = "FILE.py:FUNCTION"
    description = "your own function: py:FILE.py:FUNCTION or py:module:FUNCTION (TRL's reward signature)"
    full_completion = True  # as in TRL: in reasoning mode the function sees think and answer
    needs_record = True
    scale = None  # whatever the function returns

    @classmethod
    def needs(cls, argument: str | None) -> Needs:
        if not argument:
            return Needs()
        target, _ = split_argument(argument)
        return Needs(files=(target,) if is_file_target(target) else ())

    def __init__(self, argument: str | None = None, *, device: str = "auto") -> None:
        if not argument:
            raise UsageError("py needs a function: py:FILE.py:FUNCTION or py:module.name:FUNCTION")
        self.target, self.function_name = split_argument(argument)
        self.name = f"py:{argument}"  # type: ignore[misc]
        self.source = load_source(self.name, self.target)
        function = getattr(self.source.module, self.function_name, None)
        if function is None:
            defined = sorted(
                n for n, v in vars(self.source.module).items() if inspect.isfunction(v) and not n.startswith("_")
            )
            raise RewardFunctionError(
                f"{self.name}: no function {self.function_name!r} in {self.target}"
                + (f" (it defines: {', '.join(defined)})" if defined else "")
            )
        if not callable(function):
            raise RewardFunctionError(
                f"{self.name}: {self.function_name!r} is a {type(function).__name__}, not a function"
            )
        self.function: Callable[..., Any] = function
        self.parameters = _named_parameters(function)

    def score_prepared(self, hypothesis: str, prepared: Sequence[str]) -> float:
        return self.sentence_scores([hypothesis], prepared)[0]

    def score_batch(self, batch: Batch) -> list[float | None]:
        if not batch.completions:
            return []
        arguments = self._arguments(batch)
        try:
            # stdout carries only records: a function's prints (debugging, progress) go to stderr
            with contextlib.redirect_stdout(sys.stderr):
                result = self.function(**arguments)
                if inspect.isawaitable(result):
                    result = run_coroutine(result)
        except Exception as error:
            raise RewardFunctionError(f"{self.name}: {_one_line(error)} ({_where(batch)})") from error
        return self._checked(result, batch)

    def _arguments(self, batch: Batch) -> dict[str, Any]:
        n = len(batch.completions)
        records = batch.records if batch.records is not None else [{}] * n
        arguments: dict[str, Any] = {
            **record_columns(records),
            "prompts": [prompt_of(r) for r in records],
            "completions": list(batch.completions),
            "references": [list(refs) for refs in batch.references],
            "completion_ids": None if batch.completion_ids is None else [list(ids) for ids in batch.completion_ids],
        }
        if self.parameters is None:  # **kwargs: everything, as TRL passes it
            return arguments
        required, named = self.parameters
        missing = [p for p in required if p not in arguments]
        if missing:
            known = ", ".join(sorted(arguments))
            raise RewardFunctionError(
                f"{self.name}: {self.function_name}() needs {', '.join(map(repr, missing))}, which the records "
                f"do not have (it can take: {known})"
            )
        return {k: v for k, v in arguments.items() if k in named}

    def _checked(self, result: Any, batch: Batch) -> list[float | None]:
        n = len(batch.completions)
        values = result.tolist() if hasattr(result, "tolist") else result  # numpy arrays, torch tensors
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
            raise RewardFunctionError(
                f"{self.name}: returned {type(result).__name__}, expected a list of {n} numbers (or None) "
                f"({_where(batch)})"
            )
        if len(values) != n:
            raise RewardFunctionError(
                f"{self.name}: returned {len(values)} values for {n} completions ({_where(batch)})"
            )
        checked: list[float | None] = []
        for i, value in enumerate(values):
            if value is None and batch.missing_ok:
                checked.append(None)
                continue
            if value is None:
                raise RewardFunctionError(
                    f"{self.name}: returned None ({_where(batch, i)}), but every answer needs a score here "
                    "(None, no reward, is for train, score and select)"
                )
            if not isinstance(value, numbers.Real):
                raise RewardFunctionError(
                    f"{self.name}: returned {value!r} ({type(value).__name__}), not a number or None "
                    f"({_where(batch, i)})"
                )
            number = float(value)
            if not math.isfinite(number):
                raise RewardFunctionError(
                    f"{self.name}: returned {number} ({_where(batch, i)}); return None for no reward, "
                    "not NaN or infinity"
                )
            checked.append(number)
        return checked

    def signature(self) -> str:
        return f"py:{self.target}:{self.function_name}@sha256:{self.source.sha256[:12]}"


def _named_parameters(function: Callable[..., Any]) -> tuple[list[str], set[str]] | None:
    """(required names, all names) a function takes by keyword; None when it takes **kwargs (or cannot be read)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    usable = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in usable if p.default is p.empty], {p.name for p in usable}


def _where(batch: Batch, index: int | None = None) -> str:
    """Which records: one by id, or the batch's first few."""
    if index is not None:
        record = batch.record_id(index)
        if record is None:
            return f"completion {index}"
        return f"record {record!r}, completion {index}" if batch.one_prompt else f"record {record!r}"
    ids = list(dict.fromkeys(i for i in (batch.record_id(k) for k in range(len(batch.completions))) if i is not None))
    if not ids:
        return f"a batch of {len(batch.completions)} completions"
    if len(ids) == 1:
        return f"record {ids[0]!r}"
    shown = ", ".join(map(repr, ids[:3])) + (", ..." if len(ids) > 3 else "")
    return f"a batch of {len(ids)} records: {shown}"
