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
import select
import shlex
import stat
import sys
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, BinaryIO

import orjson

from stages.core.errors import InputError, OutputClosed, WriteFailed, add_note
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
                    value = InputError(source, line_no, f"not valid JSON ({json_problem(exc, raw)})")
                yield line_no, value
        except (OSError, EOFError) as exc:  # a corrupt or truncated .gz
            raise InputError(source, line_no + 1, f"cannot read: {exc}") from None
    finally:
        if not is_std_stream(path):
            stream.close()


def json_problem(error: orjson.JSONDecodeError, raw: bytes) -> str:
    """What is wrong with one line, placed within that line: the parser counts lines and characters of what
    it was given, and a line handed over with its newline ends on the parser's "line 2" (`bad.jsonl:20: ...
    line 2 column 1` named two different lines)."""
    if error.lineno > 1 or error.pos >= len(raw.rstrip()):
        return f"{error.msg}, at the end of the line"
    return f"{error.msg}, at column {error.colno}"


def put_in_order(
    path: str | os.PathLike[str], ids: Sequence[str], *, target: str | os.PathLike[str] | None = None
) -> bool:
    """Rewrite a JSONL file of records (plain or .gz) so they follow `ids` (records whose id is not listed keep
    their order, after the others), atomically, into `target` (default: the file itself); only when they
    are not in that order already (then the file is just renamed to `target`). Returns whether the
    records were rewritten. Used after writing batches in the order they finished."""
    source = Path(path)
    destination = Path(target) if target is not None else source
    if not source.exists():
        return False
    data = source.read_bytes()
    packed = data[:2] == b"\x1f\x8b"
    lines = [line + b"\n" for line in (gzip.decompress(data) if packed else data).splitlines() if line.strip()]
    rank = {record_id: i for i, record_id in enumerate(ids)}
    keys = [rank.get(orjson.loads(line).get("id"), len(rank)) for line in lines]
    if all(a <= b for a, b in itertools.pairwise(keys)):
        if destination != source:
            os.replace(source, destination)
        return False
    ordered = b"".join(line for _, line in sorted(zip(keys, lines), key=lambda pair: pair[0]))  # ties keep order
    with atomic_path(destination) as tmp:
        tmp.write_bytes(gzip.compress(ordered, mtime=0) if packed else ordered)
    return True


def rescue_name(target: Path, *, gzipped: bool) -> Path:
    """A plain name beside `target` for the records of its journal, when `target` itself cannot be written:
    `out.jsonl` -> `out.kept.jsonl`, `adir` -> `adir.kept.jsonl` (`.jsonl.gz` for a gzip journal)."""
    stem = target.name
    for suffix in (".jsonl.gz", ".parquet", ".jsonl", ".gz"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return target.with_name(f"{stem}.kept.jsonl" + (".gz" if gzipped else ""))


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


def reader_gone(fd: int | None = None) -> bool:
    """Is `fd` (default: stdout) a pipe whose reader has closed it (`| head` has what it wanted)? The write end
    of such a pipe polls as an error at once, so a stage can stop between batches instead of at its next
    write, which may be many batches later (generate yields in input order)."""
    try:
        fd = sys.stdout.fileno() if fd is None else fd
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLERR)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # not a real file (a test's captured stream), or already closed
        return False


def stop_if_reader_gone() -> None:
    """Raise OutputClosed when stdout's reader is gone (see `reader_gone`): called between batches by the
    stages whose records go to stdout."""
    if reader_gone():
        _silence_stdout()
        raise OutputClosed("the reader of stdout closed the pipe")


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's own final flush cannot raise again."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


class JsonlWriter:
    """Writes records to stdout, or to a file through its journal: a temporary file beside it that gets
    each record at once (flushed), renamed to the file on success (stages/core/journal.py).

    Use as a context manager. On success the records are put in the order of `order` (ids; records
    whose id it does not list keep their place after the others) when they are not in it already, the
    journal becomes the file, and the journals killed writers of the same file left are removed. If the
    block raises, any earlier file at the target path is left untouched; the journal is kept when it
    holds records (what `--resume` continues from: the error says so), else removed. With
    `flush_each=True` every record also reaches a stdout reader at once (slow producers: generation).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        flush_each: bool = False,
        tolerate_closed_stdout: bool = False,
        order: Sequence[str] | None = None,
    ) -> None:
        self.path = None if is_std_stream(path) else Path(path)  # type: ignore[arg-type]
        self.flush_each = flush_each or self.path is not None  # a file: every record in its journal at once
        self.tolerate_closed_stdout = tolerate_closed_stdout
        self.order = order
        self.count = 0
        self.closed_stdout = False
        self._tmp_path: Path | None = None
        self._raw: IO[bytes] | None = None
        self._stream: IO[bytes] | None = None
        self._plain = False  # a file written as it is (not gzip): a failed write can be cut off cleanly

    @property
    def name(self) -> str:
        return STDOUT_NAME if self.path is None else str(self.path)

    def __enter__(self) -> JsonlWriter:
        if self.path is None:
            self._stream = sys.stdout.buffer
            return self
        fd, self._tmp_path = new_temp_file(self.path)
        self._raw = os.fdopen(fd, "wb")
        if self.path.name.endswith(".gz"):
            self._stream = gzip.GzipFile(fileobj=self._raw, mode="wb", mtime=0)  # type: ignore[assignment]
        else:
            self._stream, self._plain = self._raw, True
        return self

    def write(self, record: Any) -> None:
        if self.closed_stdout:
            return
        assert self._stream is not None, "JsonlWriter used outside its `with` block"
        start = self._raw.tell() if self._raw is not None and self._plain else None
        try:
            self._stream.write(dumps(record))
            if self.flush_each:
                self._stream.flush()  # a gzip stream: a sync flush, so what is there decompresses
        except BrokenPipeError:
            self._on_broken_pipe()
        except OSError as error:
            if start is not None:  # leave no half-written line for --resume to find
                with contextlib.suppress(OSError):
                    self._raw.truncate(start)  # type: ignore[union-attr]
            raise self._write_failed(error) from error
        self.count += 1

    def _write_failed(self, error: OSError) -> Exception:
        """Disk full (or quota) becomes one line naming our target; anything else stays as it is."""
        cause = out_of_space(error)
        if cause is None:
            return error
        kept = "" if self.path is None else kept_note(self.path)
        return WriteFailed(self.name, cause + kept)

    def check_reader(self) -> None:
        """Between batches: when this writer's stdout has lost its reader, stop as a failed write would (or,
        tolerating a closed stdout, only stop writing)."""
        if self.path is None and not self.closed_stdout and reader_gone():
            self._on_broken_pipe()

    def _on_broken_pipe(self) -> None:
        _silence_stdout()
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
        assert self._stream is not None and self._raw is not None and self._tmp_path is not None
        if exc_type is None:
            self._publish()
        else:
            self._keep_or_drop(exc)

    def _publish(self) -> None:
        assert self._stream is not None and self._raw is not None and self._tmp_path is not None
        target = self.path
        assert target is not None
        try:
            if self._stream is not self._raw:
                self._stream.close()  # writes the gzip trailer; leaves the raw file open
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._finish(self._tmp_path, target)
        except (OSError, WriteFailed) as error:
            raise self._publish_failed(error) from error
        finally:
            with contextlib.suppress(OSError):
                self._raw.close()  # and with it the journal's flock
        self._tmp_path.unlink(missing_ok=True)  # reordered into another file: this one is done
        remove_stale_temp_files(target)  # the journals killed writers of this output left beside it

    def _publish_failed(self, error: OSError | WriteFailed) -> WriteFailed:
        """The last step failed (the target became a folder, its folder read-only, the disk full): the finished
        records stay in the journal, and the error says how to keep them. Never deleted: they may be hours of
        generation."""
        assert self._tmp_path is not None and self.path is not None
        if isinstance(error, WriteFailed):
            cause = error.cause
        else:
            cause = out_of_space(error) or (os.strerror(error.errno).lower() if error.errno else str(error))
        if self.count == 0:
            self._tmp_path.unlink(missing_ok=True)
            return WriteFailed(self.name, cause)
        rescue = rescue_name(self.path, gzipped=self._stream is not self._raw)
        return WriteFailed(
            self.name,
            f"{cause}; its {self.count} finished records are kept in {self._tmp_path}: "
            f"mv {shlex.quote(str(self._tmp_path))} {shlex.quote(str(rescue))} keeps them as JSONL "
            f"(or make {self.path} writable and add --resume to the same command)",
        )

    def _finish(self, journal: Path, target: Path) -> None:
        """The journal, complete, becomes the target (its records put in order first, when asked)."""
        if self.order is not None:
            put_in_order(journal, self.order, target=target)
        else:
            os.replace(journal, target)

    def _keep_or_drop(self, exc: BaseException | None) -> None:
        """A failed command keeps the records it finished for `--resume` (and its error says so)."""
        assert self._stream is not None and self._raw is not None and self._tmp_path is not None
        with contextlib.suppress(Exception):
            if self._stream is not self._raw:
                self._stream.flush()
            self._raw.close()
        if self.count == 0:
            self._tmp_path.unlink(missing_ok=True)
        elif exc is not None:
            add_note(exc, self.kept_note())

    def kept_note(self) -> str:
        """What a failed command says of the records its journal keeps."""
        return f"{self.count} finished records of {self.path} kept: add --resume to the same command to keep them"
