"""Resume ledger: the output and error files say which custom_ids are done; read them back.

A torn last line (a crash mid-write) is cut off first. Error lines that record a rejected input
line (`--skip-invalid`: message "line N: ...", validation code) are not answers: they are keyed
by line number, so a resume never mistakes a rejected duplicate for the answer to the valid line
that carries the same custom_id.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import orjson

from ..retry import retryable
from ..summary import Stats
from ..validate import IdSet

VALIDATION_CODES = frozenset(
    {"invalid_json_line", "invalid_request", "duplicate_custom_id", "url_mismatch", "empty_file"}
)
_LINE_RE = re.compile(r"^line (\d+): ")


@dataclass
class Ledger:
    done: IdSet = field(default_factory=IdSet)  # custom_ids with a line in either file
    rejected: set[int] = field(default_factory=set)  # input line numbers rejected as invalid
    retried: int = 0  # error lines dropped for --retry-failed


def repair(path: str) -> int:
    """Cut a torn last line (no trailing newline); returns the bytes removed."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        os.lseek(fd, size - 1, os.SEEK_SET)
        if os.read(fd, 1) == b"\n":
            return 0
        pos, keep = size, 0
        while pos > 0:
            start = max(0, pos - (1 << 16))
            os.lseek(fd, start, os.SEEK_SET)
            chunk = os.read(fd, pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        os.ftruncate(fd, keep)
        os.fsync(fd)
        return size - keep
    finally:
        os.close(fd)


def is_retryable_line(obj: dict[str, object]) -> bool:
    """Would --retry-failed re-send this error line? Exactly when the run would have retried what it
    records (retry.retryable): the HTTP answer's status, else the no-answer `error.code`."""
    resp, err = obj.get("response"), obj.get("error")
    if isinstance(resp, dict):
        status = resp.get("status_code")
        return isinstance(status, int) and not isinstance(status, bool) and retryable(status)
    return isinstance(err, dict) and retryable(None, err.get("code"))


def scan(out_path: str | None, err_path: str, stats: Stats, retry_failed: bool = False) -> Ledger:
    """Read both files back into `stats` (counts, usage, providers) and the ledger.

    With `retry_failed`, retryable error lines are removed from the error file (atomically
    rewritten) so that their requests are sent again."""
    ledger = Ledger()
    if out_path is not None and os.path.exists(out_path):
        repair(out_path)
        with open(out_path, "rb") as f:
            for raw in f:
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                ledger.done.add(obj["custom_id"])
                stats.completed += 1
                body = (obj.get("response") or {}).get("body")
                stats.add_usage(body)
    if not os.path.exists(err_path):
        return ledger
    repair(err_path)
    tmp = err_path + ".retry.tmp"
    keep = open(tmp, "wb") if retry_failed else None  # noqa: SIM115 - closed below
    try:
        with open(err_path, "rb") as f:
            for raw in f:
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if keep is not None:
                    if is_retryable_line(obj):
                        ledger.retried += 1
                        continue
                    keep.write(raw)
                stats.failed += 1
                err = obj.get("error")
                m = _LINE_RE.match(err.get("message", "")) if isinstance(err, dict) else None
                if m and err.get("code") in VALIDATION_CODES:
                    ledger.rejected.add(int(m.group(1)))
                elif isinstance(obj.get("custom_id"), str):
                    ledger.done.add(obj["custom_id"])
    finally:
        if keep is not None:
            keep.flush()
            os.fsync(keep.fileno())
            keep.close()
            if ledger.retried:
                os.replace(tmp, err_path)
            else:
                os.unlink(tmp)
    return ledger
