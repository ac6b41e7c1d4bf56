"""A dataset's files -> chunks of rows, streamed: Parquet a row group at a time (only the columns asked for),
CSV in 1 MB blocks (every column as text: the file's own characters, "007" stays
"007"), JSON Lines a line at a time (a .json file holding one array is read whole)."""

from __future__ import annotations

import csv as pycsv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson

from ..errors import UsageError
from .arrow import pyarrow
from .source import DataFile, Dataset, opened

CHUNK_ROWS = 8192
_BLOCK = 1 << 20


@dataclass
class Chunk:
    """`length` rows starting at row `start` of the dataset: a pyarrow RecordBatch (Parquet, CSV) or the parsed
    JSON objects."""

    start: int
    length: int
    batch: Any = None
    rows: list[dict[str, Any]] | None = None

    def values(self, name: str) -> list[Any]:
        """One column's values as Python objects (None where a JSON row lacks the key)."""
        if self.rows is not None:
            return [r.get(name) for r in self.rows]
        return list(self.batch.column(name).to_pylist())

    def records(self) -> list[dict[str, Any]]:
        return self.rows if self.rows is not None else list(self.batch.to_pylist())


def column_names(ds: Dataset) -> list[str]:
    """The first file's columns (a JSON file's: its first row's keys), before any row is streamed."""
    f = ds.files[0]
    if f.format == "parquet":
        pq = pyarrow("parquet")
        with opened(ds, f) as fh:
            return list(pq.ParquetFile(fh).schema_arrow.names)
    if f.format == "csv":
        with opened(ds, f, stream=True) as fh:
            return _csv_header(fh, f)
    for chunk in _json_chunks(ds, f, 0, 1):
        return list(chunk.rows[0]) if chunk.rows else []
    return []


def check_columns(ds: Dataset, wanted: list[tuple[str, str]]) -> None:
    """UsageError naming the option and the columns there are, for each (option, column) that is not there."""
    names = column_names(ds)
    missing = [(opt, col) for opt, col in wanted if col not in names]
    if missing:
        what = "; ".join(f"{opt} {col!r}" for opt, col in missing)
        where = "its first row's keys" if ds.format == "json" else "its columns"
        raise UsageError(f"{ds.label} has no such column: {what} ({where}: {', '.join(names) or 'none'})")


def chunks(ds: Dataset, columns: list[str] | None = None, rows: int = CHUNK_ROWS) -> Iterator[Chunk]:
    """Every row of the dataset in order, `rows` at a time at most (a chunk never spans two files). `columns`:
    only those (Parquet and CSV read nothing else; JSON rows stay whole)."""
    start = 0
    for f in ds.files:
        if f.format == "parquet":
            it = _parquet_chunks(ds, f, start, rows, columns)
        elif f.format == "csv":
            it = _csv_chunks(ds, f, start, rows, columns)
        else:
            it = _json_chunks(ds, f, start, rows)
        for chunk in it:
            yield chunk
            start += chunk.length


def _parquet_chunks(ds: Dataset, f: DataFile, start: int, rows: int, columns: list[str] | None) -> Iterator[Chunk]:
    pq = pyarrow("parquet")
    with opened(ds, f) as fh:
        pf = pq.ParquetFile(fh)
        if columns is not None:
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise UsageError(f"{f.rel} has no column {', '.join(map(repr, missing))} (its columns: "
                                 f"{', '.join(pf.schema_arrow.names)})")
        # A row group at a time, decoded on this thread: memory is one row group's, whatever the file's size
        # (measured: iter_batches, and decoding on pyarrow's threads, keep growing with the rows read).
        for group in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(group, columns=columns, use_threads=False)
            for batch in table.to_batches(max_chunksize=rows):
                yield Chunk(start, batch.num_rows, batch=batch)
                start += batch.num_rows
            del table


def _csv_header(fh: IO[bytes], f: DataFile) -> list[str]:
    head = b""
    while True:
        block = fh.read(_BLOCK)
        head += block
        text = head.decode("utf-8-sig", errors="replace")
        try:
            row = next(pycsv.reader(io.StringIO(text, newline=""), delimiter=f.delimiter, strict=True))
        except StopIteration:
            return []
        except pycsv.Error:
            row = None
        complete = "\n" in text or not block
        if row is not None and complete:
            return row
        if not block:
            raise UsageError(f"{f.rel}: could not read the CSV header")


def _csv_chunks(ds: Dataset, f: DataFile, start: int, rows: int, columns: list[str] | None) -> Iterator[Chunk]:
    pa, csv = pyarrow(), pyarrow("csv")
    with opened(ds, f, stream=True) as fh:
        names = _csv_header(fh, f)
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise UsageError(f"{f.rel} has no column {', '.join(map(repr, missing))} (its columns: {', '.join(names)})")
    types = {n: pa.string() for n in names}
    with opened(ds, f, stream=True) as fh:
        try:
            reader = csv.open_csv(
                fh, read_options=csv.ReadOptions(block_size=_BLOCK, use_threads=True),
                parse_options=csv.ParseOptions(delimiter=f.delimiter, newlines_in_values=True),
                convert_options=csv.ConvertOptions(column_types=types, include_columns=columns,
                                                   strings_can_be_null=False))
            for batch in reader:
                for offset in range(0, batch.num_rows, rows):
                    part = batch.slice(offset, rows)
                    yield Chunk(start, part.num_rows, batch=part)
                    start += part.num_rows
        except pa.ArrowInvalid as e:
            raise UsageError(f"{f.rel}: not a valid CSV file: {e}") from None


def _json_chunks(ds: Dataset, f: DataFile, start: int, rows: int) -> Iterator[Chunk]:
    with opened(ds, f, stream=True) as fh:
        first = fh.read(_BLOCK)
        if first.lstrip()[:1] == b"[":  # one JSON array of objects: read whole
            data = first + fh.read()
            try:
                items = orjson.loads(data)
            except orjson.JSONDecodeError as e:
                raise UsageError(f"{f.rel}: not valid JSON ({e})") from None
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise UsageError(f"{f.rel}: item {i} of the array is not an object")
            for offset in range(0, len(items), rows):
                part = items[offset:offset + rows]
                yield Chunk(start, len(part), rows=part)
                start += len(part)
            return
        buf, line_no, batch = first, 0, []
        while True:
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line_no += 1
                if raw.strip():
                    batch.append(_json_row(raw, f, line_no))
                    if len(batch) >= rows:
                        yield Chunk(start, len(batch), rows=batch)
                        start += len(batch)
                        batch = []
            block = fh.read(_BLOCK)
            if not block:
                break
            buf += block
        if buf.strip():
            line_no += 1
            batch.append(_json_row(buf, f, line_no))
        if batch:
            yield Chunk(start, len(batch), rows=batch)


def _json_row(raw: bytes, f: DataFile, line_no: int) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise UsageError(f"{f.rel}:{line_no}: not a JSON line ({e})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{f.rel}:{line_no}: a row must be a JSON object")
    return obj
