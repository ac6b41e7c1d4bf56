"""Prepare: a dataset's rows -> an OpenAI batch input file, one request per row, streamed (memory flat in the
dataset's size). custom_id is a column's value (checked unique: the duplicates are named with their rows) or
`row-<index>`; rows whose prompt is empty are skipped and listed."""

from __future__ import annotations

import os
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypedDict

import orjson

from ..errors import UsageError
from ..fingerprints import FingerprintIds
from ..writer import escape_separators
from .read import Chunk, check_columns, chunks
from .source import Dataset

ENDPOINTS = {"chat": "/v1/chat/completions", "embeddings": "/v1/embeddings", "responses": "/v1/responses"}
ROW_ID_PREFIX = "row-"
_SHOWN = 10  # rows or ids named in a message


def row_id(index: int) -> str:
    """The custom_id of row `index` when no --id-column is given (merge reads it back)."""
    return f"{ROW_ID_PREFIX}{index}"


def unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` typed in a shell argument -> a newline, a tab, a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


@dataclass(frozen=True)
class Prompt:
    """What each row becomes: --column or --template, the endpoint and the body's other fields."""

    model: str
    endpoint: str = "chat"
    column: str | None = None
    template: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise UsageError(f"--endpoint {self.endpoint!r}: use one of {', '.join(ENDPOINTS)}")
        if (self.column is None) == (self.template is None):
            raise UsageError("give the prompt with one of --column NAME or --template TEXT")
        if self.endpoint == "embeddings" and (self.system is not None or self.max_tokens is not None):
            raise UsageError("--system and --max-tokens do not apply to --endpoint embeddings")
        reserved = {"model", "messages", "input"} & set(self.params)
        if reserved:
            raise UsageError(f"--param {', '.join(sorted(reserved))}: set by prepare from --model and the prompt")

    @property
    def url(self) -> str:
        return ENDPOINTS[self.endpoint]

    def fields(self) -> list[str]:
        """The columns the prompt reads."""
        if self.column is not None:
            return [self.column]
        assert self.template is not None
        names: list[str] = []
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as e:
            raise UsageError(f"--template: {e} (write a literal brace as {{{{ or }}}})") from None
        for _, name, _, _ in parsed:
            if name is None:
                continue
            top = re.split(r"[.\[]", name, maxsplit=1)[0]
            if top == "" or top.isdigit():
                raise UsageError("--template: name a column in each {…}, e.g. {title}")
            if top not in names:
                names.append(top)
        if not names:
            raise UsageError("--template names no column: use {column} for a row's value")
        return names

    def body(self, value: Any) -> dict[str, Any] | None:
        """A request body for one row's prompt (a text, or a column of chat messages); None when the prompt is
        empty (the row is skipped)."""
        messages = list(value) if _is_messages(value) and self.endpoint != "embeddings" else None
        text = "" if messages is not None else _text(value)
        if messages is None and not text.strip():
            return None
        body: dict[str, Any] = {"model": self.model}
        if self.endpoint == "chat":
            system = [{"role": "system", "content": self.system}] if self.system else []
            body["messages"] = system + (messages or [{"role": "user", "content": text}])
            if self.max_tokens is not None:
                body["max_tokens"] = self.max_tokens
        elif self.endpoint == "responses":
            body["input"] = messages if messages is not None else text
            if self.system:
                body["instructions"] = self.system
            if self.max_tokens is not None:
                body["max_output_tokens"] = self.max_tokens
        else:
            body["input"] = text
        body.update(self.params)
        return body


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | dict):
        return orjson.dumps(value, default=str).decode()
    return str(value)


class _Blank(dict[str, Any]):
    """A row for str.format_map: null values render as ""."""

    def __missing__(self, key: str) -> str:
        return ""


def _render(template: str, row: dict[str, Any], index: int) -> str:
    values = _Blank({k: ("" if v is None else v if isinstance(v, int | float) else _text(v)) for k, v in row.items()})
    try:
        return template.format_map(values)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise UsageError(f"--template could not be filled for row {index}: {e}") from None


class PrepareReport(TypedDict):
    object: str
    data: str
    split: str | None
    output: str
    rows: int
    requests: int
    skipped: int
    skipped_rows: list[int]
    model: str
    endpoint: str
    id_column: str | None


def prepare(ds: Dataset, prompt: Prompt, out: IO[bytes], out_name: str, *, id_column: str | None = None,
            progress: Callable[[int], None] | None = None) -> PrepareReport:
    """Write one batch line per row of `ds` to `out`. Raises UsageError, with nothing usable written, when a
    column is missing, the ids are not unique, or no row has a prompt."""
    wanted = [("--column" if prompt.column else "--template", c) for c in prompt.fields()]
    if id_column is not None:
        wanted.append(("--id-column", id_column))
    check_columns(ds, wanted)
    columns = list(dict.fromkeys(c for _, c in wanted))
    url = prompt.url
    ids = FingerprintIds()
    rows = requests = skipped = 0
    skipped_rows: list[int] = []
    null_ids: list[int] = []
    write = out.write
    for chunk in chunks(ds, columns):
        cids = _ids(chunk, id_column, null_ids)
        for i, value in enumerate(_prompts(chunk, prompt)):
            index = chunk.start + i
            body = prompt.body(value)
            if body is None:
                skipped += 1
                if len(skipped_rows) < _SHOWN:
                    skipped_rows.append(index)
                continue
            cid = cids[i]
            if id_column is not None:
                ids.add(cid)
            write(escape_separators(orjson.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body},
                                                 default=str)) + b"\n")
            requests += 1
        rows += chunk.length
        if progress is not None:
            progress(rows)
    if null_ids:
        raise UsageError(f"--id-column {id_column}: empty in row(s) {_rows(null_ids)}; every row needs an id")
    repeats = ids.repeats()
    if repeats:
        raise UsageError(duplicates_message(ds, id_column, repeats))
    if requests == 0:
        raise UsageError(f"{ds.label}: no request to write: " + (
            f"all {rows} rows have an empty prompt" if rows else "it has no rows"))
    return {"object": "hfbatch.prepare", "data": ds.label, "split": ds.split, "output": out_name, "rows": rows,
            "requests": requests, "skipped": skipped, "skipped_rows": skipped_rows, "model": prompt.model,
            "endpoint": url, "id_column": id_column}


def write_batch(ds: Dataset, prompt: Prompt, out: str, *, stdout: IO[bytes], id_column: str | None = None,
                progress: Callable[[int], None] | None = None) -> PrepareReport:
    """prepare() into the file `out` (written beside it, then renamed: a failed prepare leaves nothing half
    written) or, for "-", into `stdout`."""
    if out == "-":
        report = prepare(ds, prompt, stdout, "-", id_column=id_column, progress=progress)
        stdout.flush()
        return report
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            report = prepare(ds, prompt, f, out, id_column=id_column, progress=progress)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return report


def _prompts(chunk: Chunk, prompt: Prompt) -> Iterator[Any]:
    if prompt.column is not None:
        return iter(chunk.values(prompt.column))
    assert prompt.template is not None
    template, fields = prompt.template, prompt.fields()
    columns = [chunk.values(c) for c in fields]
    return (_render(template, dict(zip(fields, vals, strict=True)), chunk.start + i)
            for i, vals in enumerate(zip(*columns, strict=True)))


def _ids(chunk: Chunk, id_column: str | None, null_ids: list[int]) -> list[str]:
    if id_column is None:
        return [row_id(chunk.start + i) for i in range(chunk.length)]
    out = []
    for i, v in enumerate(chunk.values(id_column)):
        cid = "" if v is None else _text(v)
        if not cid and len(null_ids) < _SHOWN:
            null_ids.append(chunk.start + i)
        out.append(cid)
    return out


def _rows(indexes: list[int]) -> str:
    return ", ".join(str(i) for i in indexes[:_SHOWN]) + (" ..." if len(indexes) > _SHOWN else "")


def duplicates_message(ds: Dataset, id_column: str | None, repeats: set[int]) -> str:
    """Name the duplicated ids and their rows: one more pass over the id column, keeping only the candidates
    (fingerprints that repeat), so memory stays flat however many rows there are."""
    from ..fingerprints import MASK64

    found: dict[str, list[int]] = {}
    assert id_column is not None
    for chunk in chunks(ds, [id_column]):
        for i, v in enumerate(chunk.values(id_column)):
            cid = "" if v is None else _text(v)
            if (hash(cid) & MASK64) in repeats:
                found.setdefault(cid, []).append(chunk.start + i)
    dupes = {cid: rows for cid, rows in found.items() if len(rows) > 1}
    shown = [f"{cid!r} at rows {_rows(rows)}" for cid, rows in list(dupes.items())[:_SHOWN]]
    more = f" (and {len(dupes) - _SHOWN} more ids)" if len(dupes) > _SHOWN else ""
    return (f"--id-column {id_column} is not unique: {'; '.join(shown)}{more}. custom_ids must be unique in a "
            "batch: choose another column, or leave out --id-column to use the row number")


def default_output(ds: Dataset) -> str:
    """<file stem>.batch.jsonl beside a local file; <name>[-<split>].batch.jsonl here for a folder or the Hub."""
    if ds.repo_id is None and len(ds.files) == 1 and os.path.isfile(ds.label):
        return os.path.splitext(ds.label)[0] + ".batch.jsonl"
    return f"{ds.name}.batch.jsonl"
