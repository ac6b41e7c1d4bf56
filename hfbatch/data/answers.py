"""Answers: output and error lines -> the columns merge adds (the text or embedding, finish_reason, token counts,
error), kept in a SQLite file keyed by custom_id: the disk side of merge's join, so answers larger than memory
are joined without being held."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import UsageError

# One answer: (custom_id, ok, response, embedding (JSON text), finish_reason, prompt_tokens, completion_tokens, error)
Row = tuple[str, int, str | None, str | None, str | None, int | None, int | None, str | None]
Found = tuple[int, str | None, str | None, str | None, int | None, int | None, str | None]
_VARS = 999 if sqlite3.sqlite_version_info < (3, 32) else 8192  # bound parameters per lookup query
_BLOCK = 1 << 20
_MAX_MODELS = 20


def parse_line(obj: dict[str, Any]) -> Row:
    """One line of an output or error file (OpenAI's shape) -> its columns. Chat answers (the common case, a
    million times in a row) are read first and with the fewest steps."""
    cid = obj.get("custom_id")
    if type(cid) is not str or not cid:
        raise ValueError("no custom_id")
    resp = obj.get("response")
    if type(resp) is not dict:
        err = obj.get("error") or {}
        code = err.get("code") if isinstance(err, dict) else None
        message = err.get("message") if isinstance(err, dict) else err
        return cid, 0, None, None, None, None, None, f"{code or 'error'}: {message or 'no answer'}"
    status, body = resp.get("status_code"), resp.get("body")
    if type(status) is not int or not 200 <= status < 300:
        return cid, 0, None, None, None, None, None, f"http_{status}: {_error_message(body)}"
    if type(body) is not dict:
        return cid, 0, None, None, None, None, None, "invalid_response: the answer's body is not a JSON object"
    usage = body.get("usage")
    if type(usage) is not dict:
        usage = {}
    choices = body.get("choices")
    if type(choices) is list and choices and type(choices[0]) is dict:
        choice = choices[0]
        message = choice.get("message")
        if type(message) is dict:
            text = message.get("content")
            if type(text) is list:
                text = "".join(str(p.get("text", "")) for p in text if isinstance(p, dict))
        else:
            text = choice.get("text")  # /v1/completions
        return (cid, 1, text if type(text) is str else None, None, choice.get("finish_reason"),
                _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), None)
    kind = body.get("object")
    if kind == "list" or (isinstance(body.get("data"), list) and "output" not in body):
        data = body.get("data") or []
        first = data[0] if data and isinstance(data[0], dict) else {}
        emb = first.get("embedding")
        if isinstance(emb, str):  # encoding_format=base64: little-endian float32
            import base64
            from array import array

            floats = array("f")
            floats.frombytes(base64.b64decode(emb))
            emb = floats.tolist()
        return (cid, 1, None, orjson.dumps(emb).decode() if isinstance(emb, list) else None, None,
                _int(usage.get("prompt_tokens")), None, None)
    if kind == "response" or "output" in body:
        out = [part.get("text", "") for item in body.get("output") or [] if isinstance(item, dict)
               for part in item.get("content") or [] if isinstance(part, dict) and part.get("type") == "output_text"]
        status_text = body.get("status")
        details = body.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        finish = "stop" if status_text == "completed" else (reason or status_text)
        return (cid, 1, "".join(out) if out else None, None, finish, _int(usage.get("input_tokens")),
                _int(usage.get("output_tokens")), None)
    return cid, 1, orjson.dumps(body).decode(), None, None, _int(usage.get("prompt_tokens")), None, None


def model_of(obj: dict[str, Any]) -> str | None:
    resp = obj.get("response")
    body = resp.get("body") if type(resp) is dict else None
    model = body.get("model") if type(body) is dict else None
    return model if type(model) is str else None


def _int(v: Any) -> int | None:
    return v if type(v) is int else None


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return orjson.dumps(body).decode()[:500]


@dataclass
class Loaded:
    """What the answer files held."""

    answers: int = 0  # distinct custom_ids
    text: bool = False  # chat, completions or responses answers
    embedding: bool = False
    models: list[str] = field(default_factory=list)


class AnswerStore:
    """custom_id -> an answer's columns, in a SQLite file in `folder` (removed on close)."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, "answers.sqlite")
        self.db = sqlite3.connect(self.path)
        # Appended as read (no index to keep sorted while loading: 5x faster on a million answers), indexed once.
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000; PRAGMA temp_store=FILE;"
            "CREATE TABLE answers (custom_id TEXT, ok INTEGER, response TEXT, embedding TEXT, finish_reason TEXT,"
            " prompt_tokens INTEGER, completion_tokens INTEGER, error TEXT);")
        self.loaded = Loaded()
        self.indexed = False

    def load(self, path: str) -> None:
        """Add a file's lines. A custom_id with several lines (a failure, then a success on a rerun) is answered
        by its best: a success over an error, the later of equals."""
        loaded = self.loaded
        models = set(loaded.models)

        def rows() -> Iterator[Row]:
            for line_no, obj in _lines(path):
                try:
                    row = parse_line(obj)
                except ValueError as e:
                    raise UsageError(f"{path}:{line_no}: not an output or error line of a batch ({e})") from None
                if row[1]:
                    kinds.add(row[3] is None)
                if len(models) < _MAX_MODELS and (model := model_of(obj)) is not None:
                    models.add(model)
                yield row

        kinds: set[bool] = set()  # True: a text answer, False: an embedding
        with self.db:
            self.db.executemany("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows())
        loaded.models = sorted(models)
        loaded.text |= True in kinds
        loaded.embedding |= False in kinds

    def index(self) -> None:
        """After the last load: the index the lookups use, and the number of distinct custom_ids."""
        if not self.indexed:
            with self.db:
                self.db.execute("CREATE INDEX answers_id ON answers (custom_id, ok)")
            self.loaded.answers = self.db.execute("SELECT count(DISTINCT custom_id) FROM answers").fetchone()[0]
            self.indexed = True

    def lookup(self, ids: list[str]) -> dict[str, Found]:
        """The answers of these custom_ids. In the index's order (custom_id, ok, rowid), so of several lines for
        one custom_id the best comes last and stays."""
        self.index()
        found: dict[str, Found] = {}
        for i in range(0, len(ids), _VARS):
            part = ids[i:i + _VARS]
            q = ("SELECT custom_id, ok, response, embedding, finish_reason, prompt_tokens, completion_tokens, error "
                 f"FROM answers WHERE custom_id IN ({','.join('?' * len(part))}) ORDER BY custom_id, ok, rowid")
            for row in self.db.execute(q, part):
                found[row[0]] = row[1:]
        return found

    def sample_ids(self, n: int = 3) -> list[str]:
        self.index()
        return [r[0] for r in self.db.execute("SELECT custom_id FROM answers LIMIT ?", (n,))]

    def unmatched(self, seen: Iterator[list[str]], n: int = 5) -> list[str]:
        """Up to n answers' custom_ids that are in none of the `seen` id lists (the dataset's ids)."""
        self.index()
        with self.db:
            self.db.execute("CREATE TEMP TABLE seen (cid TEXT PRIMARY KEY) WITHOUT ROWID")
            for ids in seen:
                self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((c,) for c in ids))
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT custom_id FROM answers WHERE custom_id NOT IN (SELECT cid FROM seen) LIMIT ?", (n,))]

    def close(self) -> None:
        self.db.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _lines(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as f:
        buf, line_no = b"", 0
        while block := f.read(_BLOCK):
            *lines, buf = (buf + block).split(b"\n")
            for raw in lines:
                line_no += 1
                if raw.strip():
                    yield line_no, _obj(raw, path, line_no)
        if buf.strip():
            try:
                obj = _obj(buf, path, line_no + 1)
            except UsageError:
                return  # a torn last line (a run killed mid-write): that request has no answer yet
            yield line_no + 1, obj


def _obj(raw: bytes, path: str, line_no: int) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UsageError(f"{path}:{line_no}: not a JSON line") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}:{line_no}: not an output or error line of a batch")
    return obj
