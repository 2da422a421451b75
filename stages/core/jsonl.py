"""JSONL streams: stdin or files (plain or .gz) in, stdout or atomically written files out.

Every stage reads and writes through this module so that `-`/nothing means stdin/stdout, `.gz` is
transparent, errors name the source and line, and a failed run never leaves a truncated output file.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, BinaryIO

import orjson

from stages.core.errors import InputError, OutputClosed, WriteFailed
from stages.core.files import atomic_path, kept_note, new_temp_file, out_of_space, remove_stale_temp_files

STDIN_NAME = "<stdin>"
STDOUT_NAME = "<stdout>"


def is_std_stream(path: str | os.PathLike[str] | None) -> bool:
    return path is None or str(path) == "-"


def source_name(path: str | os.PathLike[str] | None) -> str:
    return STDIN_NAME if is_std_stream(path) else str(path)


def open_binary(path: str | os.PathLike[str] | None) -> BinaryIO:
    if is_std_stream(path):
        stream: BinaryIO = sys.stdin.buffer
        # gzip data piped in is recognised by its magic bytes, so `zcat` is optional.
        # Not on a terminal: a peek there would swallow a Ctrl-D, and the read after it would wait again.
        if isinstance(stream, io.BufferedReader) and not stream.isatty() and stream.peek(2)[:2] == b"\x1f\x8b":
            return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
        return stream
    name = str(path)
    try:
        if name.endswith(".gz"):
            return gzip.open(name, "rb")  # type: ignore[return-value]
        return open(name, "rb")
    except FileNotFoundError:
        raise InputError(name, None, "no such file") from None
    except IsADirectoryError:
        raise InputError(name, None, "is a directory, not a record file") from None
    except PermissionError:
        raise InputError(name, None, "permission denied") from None


def iter_json_lines(path: str | os.PathLike[str] | None) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON value) for every non-blank line.

    A line that is not JSON yields an InputError (naming source and line) in place of the value, so
    the caller decides whether to raise it or skip it; an unreadable file raises.
    """
    source = source_name(path)
    stream = open_binary(path)
    try:
        line_no = 0
        try:
            for line_no, raw in enumerate(stream, start=1):
                if not raw.strip():
                    continue
                try:
                    value = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    value = InputError(source, line_no, f"not valid JSON ({exc.args[0]})")
                yield line_no, value
        except (OSError, EOFError) as exc:  # a corrupt or truncated .gz
            raise InputError(source, line_no + 1, f"cannot read: {exc}") from None
    finally:
        if not is_std_stream(path):
            stream.close()


@dataclass
class ResumeState:
    ids: set[str]
    dropped_partial_line: bool


def prepare_resume(path: str | os.PathLike[str]) -> ResumeState:
    """Read the ids already in an output file and cut off a last line left half-written by a kill.

    Complete lines that are not JSON objects with an `id` are errors: appending after them would hide
    a damaged file.
    """
    target = Path(path)
    if not target.exists():
        return ResumeState(set(), False)
    data = target.read_bytes()
    cut = data.rfind(b"\n") + 1
    dropped = cut < len(data)
    if dropped:
        with open(target, "r+b") as f:
            f.truncate(cut)
    ids: set[str] = set()
    for line_no, raw in enumerate(data[:cut].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InputError(str(target), line_no, "not valid JSON; cannot resume after a damaged line") from None
        if not isinstance(value, dict) or not isinstance(value.get("id"), str):
            raise InputError(str(target), line_no, "a record without a string id; cannot resume", "id")
        ids.add(value["id"])
    return ResumeState(ids, dropped)


def put_in_order(path: str | os.PathLike[str], ids: Sequence[str]) -> bool:
    """Rewrite a JSONL file of records so they follow `ids` (records whose id is not listed keep their
    order, after the others); atomically, and only when they are not in that order already. Returns
    whether the file was rewritten. Used after appending batches in the order they finished."""
    target = Path(path)
    if not target.exists():
        return False
    lines = [line + b"\n" for line in target.read_bytes().splitlines() if line.strip()]
    rank = {record_id: i for i, record_id in enumerate(ids)}
    keys = [rank.get(orjson.loads(line).get("id"), len(rank)) for line in lines]
    if all(a <= b for a, b in itertools.pairwise(keys)):
        return False
    ordered = [line for _, line in sorted(zip(keys, lines), key=lambda pair: pair[0])]  # stable: ties keep order
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"".join(ordered))
    return True


def _json_default(value: Any) -> Any:
    """What Parquet and Arrow files hold beyond JSON: decimals become numbers, bytes text (UTF-8, else base64)."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode()
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def to_json(value: Any) -> bytes:
    """One JSON value. Keys keep their order; non-ASCII text is written as UTF-8; dates as ISO 8601."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_json_default)


def dumps(record: Any) -> bytes:
    """One JSONL line."""
    return to_json(record) + b"\n"


class JsonlWriter:
    """Writes records to stdout, or to a file through a temporary file that is renamed on success.

    Use as a context manager. If the block raises, the temporary file is removed and any earlier
    file at the target path is left untouched; on success the temporary files that killed writers of the
    same target left are removed too. With `flush_each=True` every record reaches the
    reader at once (useful for slow producers such as generation). With `append=True` records are
    appended to the file as they come (for resumable runs; see `prepare_resume`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        flush_each: bool = False,
        tolerate_closed_stdout: bool = False,
        append: bool = False,
    ) -> None:
        self.path = None if is_std_stream(path) else Path(path)  # type: ignore[arg-type]
        self.append = append and self.path is not None
        self.flush_each = flush_each or self.append
        self.tolerate_closed_stdout = tolerate_closed_stdout
        self.count = 0
        self.closed_stdout = False
        self._tmp_path: Path | None = None
        self._raw: IO[bytes] | None = None
        self._stream: IO[bytes] | None = None

    @property
    def name(self) -> str:
        return STDOUT_NAME if self.path is None else str(self.path)

    def __enter__(self) -> JsonlWriter:
        if self.path is None:
            self._stream = sys.stdout.buffer
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.append:
            if self.path.name.endswith(".gz"):
                raise InputError(str(self.path), None, "cannot append to a .gz file; resume needs plain JSONL")
            self._raw = self._stream = open(self.path, "ab")
            return self
        fd, self._tmp_path = new_temp_file(self.path)
        self._raw = os.fdopen(fd, "wb")
        if self.path.name.endswith(".gz"):
            self._stream = gzip.GzipFile(fileobj=self._raw, mode="wb", mtime=0)  # type: ignore[assignment]
        else:
            self._stream = self._raw
        return self

    def write(self, record: Any) -> None:
        if self.closed_stdout:
            return
        assert self._stream is not None, "JsonlWriter used outside its `with` block"
        start = self._raw.tell() if self.append and self._raw is not None else None
        try:
            self._stream.write(dumps(record))
            if self.flush_each:
                self._stream.flush()
        except BrokenPipeError:
            self._on_broken_pipe()
        except OSError as error:
            if start is not None:  # leave no half-written line for --resume to find
                with contextlib.suppress(OSError):
                    self._raw.truncate(start)
            raise self._write_failed(error) from error
        self.count += 1

    def _write_failed(self, error: OSError) -> Exception:
        """Disk full (or quota) becomes one line naming our target; anything else stays as it is."""
        cause = out_of_space(error)
        if cause is None:
            return error
        kept = "" if self.path is None or self.append else kept_note(self.path)
        return WriteFailed(self.name, cause + kept)

    def _on_broken_pipe(self) -> None:
        # Point fd 1 at /dev/null so the interpreter's own final flush cannot raise again.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        self.closed_stdout = True
        if not self.tolerate_closed_stdout:
            raise OutputClosed("the reader of stdout closed the pipe")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.path is None:
            if not self.closed_stdout:
                try:
                    sys.stdout.buffer.flush()
                except BrokenPipeError:
                    if exc_type is None:
                        self._on_broken_pipe()
                except OSError as error:
                    if exc_type is None:
                        raise self._write_failed(error) from error
            return
        assert self._stream is not None and self._raw is not None
        if self.append:
            self._raw.close()  # what was written stays: that is what resuming continues from
            if exc_type is None:
                remove_stale_temp_files(self.path)
            return
        assert self._tmp_path is not None
        if exc_type is None:
            try:
                if self._stream is not self._raw:
                    self._stream.close()  # writes the gzip trailer; leaves the raw file open
                self._raw.flush()
                os.fsync(self._raw.fileno())
                self._raw.close()
                os.replace(self._tmp_path, self.path)
            except OSError as error:
                with contextlib.suppress(OSError):
                    self._raw.close()
                self._tmp_path.unlink(missing_ok=True)
                raise self._write_failed(error) from error
            remove_stale_temp_files(self.path)  # what killed writers of this output left beside it
        else:
            with contextlib.suppress(Exception):
                self._raw.close()
            with contextlib.suppress(FileNotFoundError):
                self._tmp_path.unlink()
