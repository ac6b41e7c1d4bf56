"""Merge: a dataset's rows, in their order, + the columns of their answers (joined on custom_id through a SQLite
file: answers.py) -> Parquet, CSV or JSON Lines. Every row is kept: a row without an answer gets `error` set.
Written to a temporary file beside the result and renamed when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, TypedDict

import orjson

from ..errors import UsageError
from ..fingerprints import FingerprintIds
from ..writer import escape_separators
from .answers import AnswerStore, Loaded
from .arrow import pyarrow
from .prepare import _text, duplicates_message, row_id
from .read import CHUNK_ROWS, Chunk, check_columns, chunks, column_names
from .source import Dataset

OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".ndjson": "json",
                  ".json": "json"}
EMBEDDING_ROWS = 512  # rows per chunk when answers are embeddings (a chunk's vectors are held as Python floats)
_ROW_GROUP_ROWS = 65_536
_ROW_GROUP_BYTES = 64 << 20


class MergeReport(TypedDict):
    object: str
    data: str
    split: str | None
    output: str
    format: str
    rows: int
    answered: int  # rows with a 2xx answer
    failed: int  # rows whose answer is an error line
    missing: int  # rows with no line at all
    answers: int  # distinct custom_ids in the answer files
    unmatched_answers: int  # answers whose custom_id is no row's
    unmatched_examples: list[str]
    columns: list[str]
    models: list[str]


def output_format(path: str) -> str:
    fmt = OUTPUT_FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise UsageError(f"-o {path}: name a .parquet, .csv, .tsv or .jsonl file (its suffix picks the format)")
    return fmt


def new_columns(loaded: Loaded) -> list[str]:
    """The columns merge adds: a text answer's or an embedding's (both when the files hold both)."""
    cols: list[str] = []
    if loaded.text or not loaded.embedding:
        cols.append("response")
    if loaded.embedding:
        cols.append("embedding")
    if loaded.text or not loaded.embedding:
        cols.append("finish_reason")
    cols.append("prompt_tokens")
    if loaded.text or not loaded.embedding:
        cols.append("completion_tokens")
    cols.append("error")
    return cols


def merge(ds: Dataset, answer_files: list[str], dest: str, *, id_column: str | None = None, prefix: str = "",
          progress: Callable[[int], None] | None = None) -> MergeReport:
    fmt = output_format(dest)
    if id_column is not None:
        check_columns(ds, [("--id-column", id_column)])
    folder = tempfile.mkdtemp(prefix=".hfbatch-merge-", dir=os.path.dirname(os.path.abspath(dest)))
    store = AnswerStore(folder)
    try:
        for path in answer_files:
            store.load(path)
        store.index()
        loaded = store.loaded
        cols = new_columns(loaded)
        taken = [prefix + c for c in cols if prefix + c in column_names(ds)]
        if taken:
            raise UsageError(f"{ds.label} already has the column(s) {', '.join(taken)}: pass --prefix (e.g. --prefix "
                             f"batch_) to name the new ones {', '.join('batch_' + c for c in cols)}")
        tmp = os.path.join(folder, "result" + os.path.splitext(dest)[1])
        sink: _Sink = (_JsonSink(tmp) if fmt == "json"
                       else _ArrowSink(tmp, fmt, "\t" if dest.endswith(".tsv") else ",", _json_schema(ds)
                                       if ds.format == "json" else None))
        report = _join(ds, store, sink, cols, prefix, id_column, loaded, progress)
        sink.close()
        if report["rows"] == 0:
            raise UsageError(f"{ds.label} has no rows")
        report["output"], report["format"], report["models"] = dest, fmt, loaded.models
        if loaded.answers and report["answered"] + report["failed"] == 0:
            raise UsageError(_no_match(ds, store, id_column))
        if report["unmatched_answers"]:
            report["unmatched_examples"] = store.unmatched(_all_ids(ds, id_column))
        os.replace(tmp, dest)
        return report
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)


def _join(ds: Dataset, store: AnswerStore, sink: _Sink, cols: list[str], prefix: str, id_column: str | None,
          loaded: Loaded, progress: Callable[[int], None] | None) -> MergeReport:
    rows = answered = failed = missing = 0
    ids = FingerprintIds() if id_column is not None else None
    per_chunk = EMBEDDING_ROWS if loaded.embedding else CHUNK_ROWS
    for chunk in chunks(ds, None, per_chunk):
        cids = _chunk_ids(chunk, id_column)
        if ids is not None:
            for cid in cids:
                ids.add(cid)
        found = store.lookup(cids)
        hits = [found.get(cid) for cid in cids]
        values: dict[str, list[Any]] = {}
        for col in cols:
            if col == "error":
                values[col] = [hit[6] if hit is not None else
                               f"no_answer: no line for custom_id {cid!r} in the output or error file"
                               for cid, hit in zip(cids, hits, strict=True)]
            else:
                i = _INDEX[col]
                values[col] = [hit[i] if hit is not None else None for hit in hits]
        n_ok = sum(1 for hit in hits if hit is not None and hit[0])
        n_found = len(cids) - hits.count(None)
        answered += n_ok
        failed += n_found - n_ok
        missing += len(cids) - n_found
        sink.write(chunk, {prefix + c: v for c, v in values.items()})
        rows += chunk.length
        if progress is not None:
            progress(rows)
    if ids is not None:
        repeats = ids.repeats()
        if repeats:
            raise UsageError(duplicates_message(ds, id_column, repeats))
    matched = answered + failed
    return {"object": "hfbatch.merge", "data": ds.label, "split": ds.split, "output": "", "format": "", "rows": rows,
            "answered": answered, "failed": failed, "missing": missing, "answers": loaded.answers,
            "unmatched_answers": max(0, loaded.answers - matched), "unmatched_examples": [],
            "columns": [prefix + c for c in cols], "models": []}


_INDEX = {"response": 1, "embedding": 2, "finish_reason": 3, "prompt_tokens": 4, "completion_tokens": 5}


def _chunk_ids(chunk: Chunk, id_column: str | None) -> list[str]:
    if id_column is None:
        return [row_id(chunk.start + i) for i in range(chunk.length)]
    return ["" if v is None else _text(v) for v in chunk.values(id_column)]


def _all_ids(ds: Dataset, id_column: str | None) -> Iterator[list[str]]:
    """Every row's custom_id, a chunk at a time (only the id column is read)."""
    for chunk in chunks(ds, [id_column] if id_column else []):
        yield _chunk_ids(chunk, id_column)


def _no_match(ds: Dataset, store: AnswerStore, id_column: str | None) -> str:
    theirs = ", ".join(repr(c) for c in store.sample_ids())
    ours = ", ".join(repr(c) for c in next(_all_ids(ds, id_column), [])[:3])
    how = (f"with --id-column {id_column}" if id_column else "without --id-column (custom_id row-<index>)")
    return (f"none of the {store.loaded.answers:,} answers' custom_ids is a row of {ds.label} read {how}: the "
            f"answers' look like {theirs}, the rows' like {ours}. Pass the same DATA, --split and --id-column as "
            "to `hfbatch prepare`")


# ------------------------------------------------------------------ writers


class _Sink:
    def write(self, chunk: Chunk, new: dict[str, list[Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _json_default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        import base64

        return base64.b64encode(bytes(v)).decode()
    return str(v)


class _JsonSink(_Sink):
    """JSON Lines: each row as it was read (a JSON row keeps its keys and values exactly), then the new keys;
    an embedding is written as the provider's numbers."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "wb")

    def write(self, chunk: Chunk, new: dict[str, list[Any]]) -> None:
        records = chunk.records()
        items = list(new.items())
        out = []
        for i, rec in enumerate(records):
            for name, vals in items:
                v = vals[i]
                rec[name] = orjson.Fragment(v) if name.endswith("embedding") and v is not None else v
            out.append(escape_separators(orjson.dumps(rec, default=_json_default)))
        self.f.write(b"\n".join(out) + b"\n" if out else b"")

    def close(self) -> None:
        self.f.close()


class _ArrowSink(_Sink):
    """Parquet (row groups of ~64k rows or 64 MB) or CSV (nested values as JSON text), in the first chunk's
    schema; a JSON dataset's rows are converted with the schema inferred over all of them."""

    def __init__(self, path: str, fmt: str, delimiter: str, json_schema: Any) -> None:
        self.pa = pyarrow()
        self.path, self.fmt, self.delimiter, self.json_schema = path, fmt, delimiter, json_schema
        self.writer: Any = None
        self.schema: Any = None
        self.pending: list[Any] = []
        self.pending_rows = self.pending_bytes = 0

    def write(self, chunk: Chunk, new: dict[str, list[Any]]) -> None:
        pa = self.pa
        if chunk.rows is not None:
            try:
                base = pa.RecordBatch.from_pylist(chunk.rows, schema=self.json_schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise UsageError(f"rows {chunk.start}-{chunk.start + chunk.length - 1} do not fit one table ({e}); "
                                 "write JSON Lines instead (-o result.jsonl)") from None
        else:
            base = chunk.batch
        arrays, names = list(base.columns), list(base.schema.names)
        for name, vals in new.items():
            arrays.append(self._array(name, vals))
            names.append(name)
        if self.fmt == "csv":
            arrays = [self._flat(a) for a in arrays]
        batch = pa.RecordBatch.from_arrays(arrays, names=names)
        if self.schema is None:
            meta = {k: v for k, v in (base.schema.metadata or {}).items() if k != b"huggingface"}
            self.schema = batch.schema.with_metadata(meta or None)
            self._open()
        if not batch.schema.equals(self.schema, check_metadata=False):
            try:
                batch = pa.Table.from_batches([batch]).cast(self.schema).to_batches()[0]
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError, IndexError) as e:
                raise UsageError(f"rows from {chunk.start} on do not have the first rows' columns and types ({e})") \
                    from None
        else:
            batch = pa.RecordBatch.from_arrays(batch.columns, schema=self.schema)
        if self.fmt == "csv":
            self.writer.write_batch(batch)
            return
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        self.pending_bytes += batch.nbytes
        if self.pending_rows >= _ROW_GROUP_ROWS or self.pending_bytes >= _ROW_GROUP_BYTES:
            self._flush()

    def _array(self, name: str, vals: list[Any]) -> Any:
        pa = self.pa
        if name.endswith("embedding"):
            if self.fmt == "csv":
                return pa.array(vals, pa.string())
            return pa.array([orjson.loads(v) if v is not None else None for v in vals], pa.list_(pa.float32()))
        if name.endswith(("prompt_tokens", "completion_tokens")):
            return pa.array(vals, pa.int64())
        return pa.array(vals, pa.string())

    def _flat(self, array: Any) -> Any:
        """CSV holds no lists or structs: those values become JSON text."""
        pa = self.pa
        t = array.type
        if pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return pa.array([None if v is None else orjson.dumps(v, default=_json_default).decode()
                             for v in array.to_pylist()], pa.string())
        return array

    def _open(self) -> None:
        if self.fmt == "csv":
            csv = pyarrow("csv")
            options = csv.WriteOptions(delimiter=self.delimiter)
            self.writer = csv.CSVWriter(self.path, self.schema, write_options=options)
        else:
            pq = pyarrow("parquet")
            self.writer = pq.ParquetWriter(self.path, self.schema)

    def _flush(self) -> None:
        if self.pending:
            table = self.pa.Table.from_batches(self.pending)
            self.writer.write_table(table, row_group_size=table.num_rows)
            self.pending, self.pending_rows, self.pending_bytes = [], 0, 0

    def close(self) -> None:
        if self.writer is None:  # no rows: an empty file with no columns still says so
            return
        self._flush()
        self.writer.close()


def _json_schema(ds: Dataset) -> Any:
    """The schema of a JSON dataset's rows, unified over all of them (one pass before writing Parquet or CSV:
    a column null in the first rows and text later is text)."""
    pa = pyarrow()
    schema = None
    for chunk in chunks(ds, None, CHUNK_ROWS):
        try:
            s = pa.Table.from_pylist(chunk.rows).schema
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise UsageError(f"{ds.label}: rows {chunk.start}-{chunk.start + chunk.length - 1} mix types in a column "
                             f"({e}); write JSON Lines instead (-o result.jsonl)") from None
        try:
            schema = s if schema is None else pa.unify_schemas([schema, s], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise UsageError(f"{ds.label}: a column changes type from row {chunk.start} on ({e}); write JSON Lines "
                             "instead (-o result.jsonl)") from None
    return schema
