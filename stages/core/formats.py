"""Record files in the formats users already have: JSONL (the default, and every stream), Parquet, CSV/TSV,
a JSON array, a folder written by `datasets`' `save_to_disk` (or of Parquet shards); Parquet out on request.

Every reader yields (row number, object) pairs as `jsonl.iter_json_lines` does, so `records.read_validated`
stays the one read-and-skip loop. Row numbers are 1-based: JSONL counts lines, the others count data rows
(a CSV's header is not a row; a folder counts across its shards in order). pyarrow (the `data`
extra) is imported only when a Parquet or Arrow file is read or written.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from stages.core.errors import BleuberiError, InputError, UsageError
from stages.core.files import atomic_path
from stages.core.jsonl import JsonlWriter, is_std_stream, iter_json_lines, open_binary, source_name, to_json

BATCH_ROWS = 1024  # rows per Arrow batch turned into Python objects at a time
META_KEY = b"bleuberi"  # Parquet schema metadata: which columns we wrote as JSON text
TABLE_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")


def needs_pyarrow(action: str, source: str) -> Any:
    """pyarrow, or one line naming the extra that brings it."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise BleuberiError(f"{action} {source} needs pyarrow: pip install 'bleuberi[data]'") from None
    return pyarrow


def input_format(path: str | os.PathLike[str] | None) -> str:
    """jsonl, json, csv, tsv, parquet, arrow (one Arrow file) or folder (save_to_disk's, or Parquet shards), by name."""
    if is_std_stream(path):
        return "jsonl"  # streams stay JSONL
    if os.path.isdir(path):  # type: ignore[arg-type]
        return "folder"
    name = str(path).lower()
    if name.endswith((".parquet", ".arrow")):
        return name.rpartition(".")[2]
    base = name.removesuffix(".gz")
    for kind in ("csv", "tsv", "json"):
        if base.endswith(f".{kind}"):
            return kind
    return "jsonl"  # .jsonl, .jsonl.gz, and any other name, as before


def iter_rows(path: str | os.PathLike[str] | None) -> Iterator[tuple[int, Any]]:
    """(row number, object) for every record of the file at `path` (stdin: JSONL), read by its format.

    Like `iter_json_lines`, a row that cannot be parsed yields an InputError in place of its object.
    """
    kind = input_format(path)
    if kind == "jsonl":
        return iter_json_lines(path)
    source = source_name(path)
    if kind == "json":
        return _json_rows(path, source)  # type: ignore[arg-type]
    if kind in ("csv", "tsv"):
        return _table_rows(path, source, "\t" if kind == "tsv" else ",")  # type: ignore[arg-type]
    if kind == "parquet":
        return _parquet_rows([Path(path)], source)  # type: ignore[arg-type]
    if kind == "arrow":
        return _arrow_rows([Path(path)], source)  # type: ignore[arg-type]
    folder = Path(path)  # type: ignore[arg-type]
    parquet_shards = sorted(folder.glob("*.parquet"))  # as the hub and Spark store a split
    if parquet_shards and not (folder / "state.json").is_file():
        return _parquet_rows(parquet_shards, source)
    return _arrow_rows(_dataset_shards(folder, source), source)


def _json_rows(path: str | os.PathLike[str], source: str) -> Iterator[tuple[int, Any]]:
    """One JSON array of objects; a `.json` file that holds JSON Lines (as `Dataset.to_json` writes) is read as such."""
    with open_binary(path) as stream:
        head = stream.read(1 << 16).lstrip()[:1]
    if head != b"[":
        yield from iter_json_lines(path)
        return
    with open_binary(path) as stream:
        try:
            rows = orjson.loads(stream.read())
        except orjson.JSONDecodeError as error:
            where = f"line {error.lineno} column {error.colno}: " if error.lineno else ""
            raise InputError(source, None, f"{where}not valid JSON ({error.msg})") from None
    if not isinstance(rows, list):
        raise InputError(source, None, "expected a JSON array of records")
    yield from enumerate(rows, start=1)


def _table_rows(path: str | os.PathLike[str], source: str, delimiter: str) -> Iterator[tuple[int, Any]]:
    """CSV or TSV with a header row, as the csv module and pandas write them; every cell is a string."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # references can be long; the default is 128 KB
    with open_binary(path) as binary:
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")  # utf-8-sig: a BOM (Excel) is no column
        rows = csv.reader(text, delimiter=delimiter)
        row_no = 0
        try:
            header = next(rows, None)
            if header is None:
                return
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:
                raise InputError(source, None, f"the header names column {twice[0]!r} twice")
            for cells in rows:
                if not cells:
                    continue  # a blank line is no row
                row_no += 1
                if len(cells) != len(header):
                    yield row_no, InputError(source, row_no, f"has {len(cells)} cells, the header {len(header)}")
                else:
                    yield row_no, dict(zip(header, cells))
        except (UnicodeDecodeError, csv.Error) as error:
            raise InputError(source, row_no + 1, f"cannot read: {error}") from None


def _parquet_rows(files: list[Path], source: str) -> Iterator[tuple[int, Any]]:
    """Parquet files in order, row numbers running across them."""
    pa = needs_pyarrow("reading", source)
    offset = 0
    for file in files:
        where = source if len(files) == 1 else f"{source} ({file.name})"
        try:
            parquet = pa.parquet.ParquetFile(file)
        except FileNotFoundError:
            raise InputError(source, None, "no such file") from None
        except (pa.ArrowException, OSError) as error:
            raise InputError(where, None, f"not a Parquet file ({error})") from None
        count = 0
        with parquet:
            batches = parquet.iter_batches(batch_size=BATCH_ROWS)
            for count, row in _batch_rows(batches, parquet.schema_arrow):  # after the loop: the file's rows
                yield offset + count, row
        offset += count


def _dataset_shards(folder: Path, source: str) -> list[Path]:
    """The `.arrow` shards of a `save_to_disk` folder, in the order its state.json lists them."""
    state_file = folder / "state.json"
    if not state_file.is_file():
        splits = folder / "dataset_dict.json"
        if splits.is_file():
            names = orjson.loads(splits.read_bytes()).get("splits", [])
            example = f", e.g. {folder / names[0]}" if names else ""
            split_list = ", ".join(names)
            raise InputError(source, None, f"holds several splits ({split_list}): give one split's folder{example}")
        raise InputError(source, None, "is a folder with neither state.json (save_to_disk's) nor .parquet files")
    try:
        files = [entry["filename"] for entry in orjson.loads(state_file.read_bytes())["_data_files"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        expected = "expected save_to_disk's state ({'_data_files': [{'filename': ...}]})"
        raise InputError(str(state_file), None, expected) from None
    shards = []
    for name in files:
        if not isinstance(name, str) or Path(name).name != name:  # never read outside the folder
            raise InputError(str(state_file), None, f"shard name {name!r} is not a file name in the folder")
        shards.append(folder / name)
    return shards


def _arrow_rows(shards: list[Path], source: str) -> Iterator[tuple[int, Any]]:
    """Arrow IPC streams (what `datasets` writes; the IPC file format too), row numbers running across shards."""
    pa = needs_pyarrow("reading", source)
    offset = 0
    for shard in shards:
        count = 0
        try:
            with pa.memory_map(str(shard)) as stream:
                schema, batches = _open_ipc(stream, pa)
                for count, row in _batch_rows(batches, schema):  # after the loop: the shard's rows
                    yield offset + count, row
        except FileNotFoundError:
            raise InputError(source, None, f"shard {shard.name} is missing") from None
        except (pa.ArrowException, OSError) as error:
            raise InputError(source, offset + count + 1, f"cannot read {shard.name} as Arrow ({error})") from None
        offset += count


def _open_ipc(stream: Any, pa: Any) -> tuple[Any, Any]:
    try:
        reader = pa.ipc.open_stream(stream)
        return reader.schema, reader
    except pa.ArrowInvalid:  # not a stream: maybe the IPC file format (`.arrow` written by pyarrow's file writer)
        stream.seek(0)
        reader = pa.ipc.open_file(stream)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _batch_rows(batches: Any, schema: Any) -> Iterator[tuple[int, Any]]:
    metadata = schema.metadata or {}
    as_json = orjson.loads(metadata[META_KEY]).get("json_columns", []) if META_KEY in metadata else []
    row_no = 0
    for batch in batches:
        for row in batch.to_pylist():
            row_no += 1
            for name in as_json:  # written by `parquet_table`: JSON text, null where the record had no such key
                if row.get(name) is None:
                    row.pop(name, None)
                else:
                    row[name] = orjson.loads(row[name])
            yield row_no, row


def parquet_table(records: list[dict[str, Any]], pa: Any) -> Any:
    """Records as an Arrow table that reads back as the same records through `iter_rows`.

    A column is native (structs, lists, numbers: what verl and pandas expect) when every record has the
    key and Arrow gives back the same JSON; otherwise (a key some records lack, mixed types, dicts whose keys
    vary) it is JSON text, named in the schema metadata so that our reader parses it again.
    """
    names = list(dict.fromkeys(key for record in records for key in record))
    arrays, as_json = [], []
    for name in names:
        values = [record.get(name, _ABSENT) for record in records]
        native = _native_array(values, pa) if _ABSENT not in values else None
        if native is None:
            native = pa.array([None if v is _ABSENT else to_json(v).decode() for v in values], pa.string())
            as_json.append(name)
        arrays.append(native)
    table = pa.Table.from_arrays(arrays, names=names) if names else pa.table({})
    return table.replace_schema_metadata({META_KEY: orjson.dumps({"json_columns": as_json})})


_ABSENT = object()


def _native_array(values: list[Any], pa: Any) -> Any:
    try:
        array = pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None
    if _has_empty_struct(array.type, pa) or _json(array.to_pylist()) != _json(values):
        return None
    return array


def _json(values: list[Any]) -> bytes:
    return orjson.dumps(values, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY, default=str)


def _has_empty_struct(kind: Any, pa: Any) -> bool:
    """Parquet cannot store a struct without fields (what `{}` becomes)."""
    if pa.types.is_struct(kind):
        return kind.num_fields == 0 or any(_has_empty_struct(kind.field(i).type, pa) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _has_empty_struct(kind.value_type, pa)
    return False


class ParquetWriter(JsonlWriter):
    """`JsonlWriter` for a `.parquet` target: the records are journaled as JSONL lines as they come (so a kill
    keeps them for --resume), and the Parquet file is written from the journal at the end, to a temporary
    file renamed into place (a failure leaves any earlier file as it was)."""

    def __enter__(self) -> ParquetWriter:
        needs_pyarrow("writing", self.name)  # before any work, not after it
        super().__enter__()
        return self

    def _finish(self, journal: Path, target: Path) -> None:
        pa = needs_pyarrow("writing", self.name)
        records = [orjson.loads(line) for line in journal.read_bytes().splitlines() if line.strip()]
        if self.order is not None:
            rank = {record_id: i for i, record_id in enumerate(self.order)}
            records.sort(key=lambda record: rank.get(record.get("id"), len(rank)))  # stable: ties keep order
        table = parquet_table(records, pa)
        with atomic_path(target) as tmp:
            pa.parquet.write_table(table, tmp)


def is_parquet(path: str | os.PathLike[str] | None) -> bool:
    return not is_std_stream(path) and str(path).lower().endswith(".parquet")


def open_writer(
    path: str | os.PathLike[str] | None,
    *,
    flush_each: bool = False,
    tolerate_closed_stdout: bool = False,
    order: Sequence[str] | None = None,
) -> JsonlWriter:
    """The writer for an output: Parquet for `FILE.parquet`, JSONL for everything else (stdout included).
    A file's records reach its journal as they are written (see JsonlWriter)."""
    check_output_name(path)
    kind = ParquetWriter if is_parquet(path) else JsonlWriter
    return kind(path, flush_each=flush_each, tolerate_closed_stdout=tolerate_closed_stdout, order=order)


def check_output_name(path: str | os.PathLike[str] | None) -> None:
    """Records are written as JSONL or Parquet: a table name (.csv, .tsv) is refused before any work."""
    if not is_std_stream(path) and not is_parquet(path) and str(path).lower().endswith(TABLE_SUFFIXES):
        raise UsageError(f"{path}: records are written as JSONL or Parquet: name the output .jsonl or .parquet")
