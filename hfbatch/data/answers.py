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
    """One line of an output or error file (OpenAI's shape) -> its columns."""
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise ValueError("no custom_id")
    resp = obj.get("response")
    if not isinstance(resp, dict):
        err = obj.get("error") or {}
        code = err.get("code") if isinstance(err, dict) else None
        message = err.get("message") if isinstance(err, dict) else err
        return cid, 0, None, None, None, None, None, f"{code or 'error'}: {message or 'no answer'}"
    status, body = resp.get("status_code"), resp.get("body")
    if not isinstance(status, int) or not 200 <= status < 300:
        return cid, 0, None, None, None, None, None, f"http_{status}: {_error_message(body)}"
    if not isinstance(body, dict):
        return cid, 0, None, None, None, None, None, "invalid_response: the answer's body is not a JSON object"
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    assert isinstance(usage, dict)
    kind = body.get("object")
    if kind == "list" or (isinstance(body.get("data"), list) and "choices" not in body):
        data = body.get("data") or []
        first = data[0] if data and isinstance(data[0], dict) else {}
        emb = first.get("embedding")
        if isinstance(emb, str):  # encoding_format=base64: little-endian float32
            import base64
            from array import array

            floats = array("f")
            floats.frombytes(base64.b64decode(emb))
            emb = floats.tolist()
        text = orjson.dumps(emb).decode() if isinstance(emb, list) else None
        return cid, 1, None, text, None, _int(usage.get("prompt_tokens")), None, None
    if kind == "response" or "output" in body and "choices" not in body:
        out = [part.get("text", "") for item in body.get("output") or [] if isinstance(item, dict)
               for part in item.get("content") or [] if isinstance(part, dict) and part.get("type") == "output_text"]
        status_text = body.get("status")
        details = body.get("incomplete_details") if isinstance(body.get("incomplete_details"), dict) else {}
        assert isinstance(details, dict)
        finish = "stop" if status_text == "completed" else (details.get("reason") or status_text)
        return (cid, 1, "".join(out) if out else None, None, finish, _int(usage.get("input_tokens")),
                _int(usage.get("output_tokens")), None)
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        message = choice.get("message")
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            text = content if isinstance(content, str) else None
        else:
            text = choice.get("text") if isinstance(choice.get("text"), str) else None
        return (cid, 1, text, None, choice.get("finish_reason"), _int(usage.get("prompt_tokens")),
                _int(usage.get("completion_tokens")), None)
    return cid, 1, orjson.dumps(body).decode(), None, None, _int(usage.get("prompt_tokens")), None, None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


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
    lines: int = 0
    text: bool = False  # chat, completions or responses answers
    embedding: bool = False
    models: list[str] = field(default_factory=list)


class AnswerStore:
    """custom_id -> an answer's columns, in a SQLite file in `folder` (removed on close)."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, "answers.sqlite")
        self.db = sqlite3.connect(self.path)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-32000;"
            "CREATE TABLE answers (custom_id TEXT PRIMARY KEY, ok INTEGER, response TEXT, embedding TEXT,"
            " finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, error TEXT) WITHOUT ROWID;")
        self.loaded = Loaded()

    def load(self, path: str) -> None:
        """Add a file's lines; a success replaces an earlier error line for the same custom_id."""
        loaded = self.loaded
        models = set(loaded.models)

        def rows() -> Iterator[Row]:
            for line_no, obj in _lines(path):
                try:
                    row = parse_line(obj)
                except ValueError as e:
                    raise UsageError(f"{path}:{line_no}: not an output or error line of a batch ({e})") from None
                loaded.lines += 1
                if row[1]:
                    loaded.text |= row[3] is None
                    loaded.embedding |= row[3] is not None
                resp = obj.get("response")
                body = resp.get("body") if isinstance(resp, dict) else None
                model = body.get("model") if isinstance(body, dict) else None
                if isinstance(model, str) and len(models) < _MAX_MODELS:
                    models.add(model)
                yield row

        with self.db:
            self.db.executemany("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (custom_id) DO "
                                "UPDATE SET ok=excluded.ok, response=excluded.response, embedding=excluded.embedding, "
                                "finish_reason=excluded.finish_reason, prompt_tokens=excluded.prompt_tokens, "
                                "completion_tokens=excluded.completion_tokens, error=excluded.error "
                                "WHERE excluded.ok >= answers.ok", rows())
        loaded.models = sorted(models)
        loaded.answers = self.db.execute("SELECT count(*) FROM answers").fetchone()[0]

    def lookup(self, ids: list[str]) -> dict[str, Found]:
        found: dict[str, Found] = {}
        for i in range(0, len(ids), _VARS):
            part = ids[i:i + _VARS]
            q = ("SELECT custom_id, ok, response, embedding, finish_reason, prompt_tokens, completion_tokens, error "
                 f"FROM answers WHERE custom_id IN ({','.join('?' * len(part))})")
            for row in self.db.execute(q, part):
                found[row[0]] = row[1:]
        return found

    def sample_ids(self, n: int = 3) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT custom_id FROM answers LIMIT ?", (n,))]

    def unmatched(self, seen: Iterator[list[str]], n: int = 5) -> list[str]:
        """Up to n answers' custom_ids that are in none of the `seen` id lists (the dataset's ids)."""
        with self.db:
            self.db.execute("CREATE TEMP TABLE seen (cid TEXT PRIMARY KEY) WITHOUT ROWID")
            for ids in seen:
                self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((c,) for c in ids))
        return [r[0] for r in self.db.execute(
            "SELECT custom_id FROM answers WHERE custom_id NOT IN (SELECT cid FROM seen) LIMIT ?", (n,))]

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
