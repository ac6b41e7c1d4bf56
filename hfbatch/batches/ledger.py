"""Resume ledger: the output and error files say which custom_ids are done; read them back.

A torn last line (a crash mid-write) is cut off first. Any other line that is not a batch line (not
JSON, not an object, no custom_id) stops the run before anything is sent (UsageError, naming the file
and the line): skipping it would send its request again, paid twice. Error lines that record a
rejected input line (`--skip-invalid`: custom_id maybe null, message "line N: ...", validation code)
are not answers: they are keyed by line number, so a resume never mistakes a rejected duplicate for
the answer to the valid line that carries the same custom_id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import UsageError
from ..fingerprints import IdSet
from ..retry import retryable
from ..summary import Stats
from ..writer import repair

VALIDATION_CODES = frozenset(
    {"invalid_json_line", "invalid_request", "duplicate_custom_id", "url_mismatch", "empty_file"}
)
_LINE_RE = re.compile(r"^line (\d+): ")


@dataclass
class Ledger:
    done: IdSet = field(default_factory=IdSet)  # custom_ids with a line in either file
    rejected: set[int] = field(default_factory=set)  # input line numbers rejected as invalid
    retried: int = 0  # error lines dropped for --retry-failed


def is_retryable_line(obj: dict[str, object]) -> bool:
    """Would --retry-failed re-send this error line? Exactly when the run would have retried what it
    records (retry.retryable): the HTTP answer's status, else the no-answer `error.code`."""
    resp, err = obj.get("response"), obj.get("error")
    if isinstance(resp, dict):
        status = resp.get("status_code")
        return isinstance(status, int) and not isinstance(status, bool) and retryable(status)
    return isinstance(err, dict) and retryable(None, err.get("code"))


def _rejected_line(obj: dict[str, Any]) -> int | None:
    """The input line number an error line records as rejected by validation, else None."""
    err = obj.get("error")
    if not isinstance(err, dict) or err.get("code") not in VALIDATION_CODES:
        return None
    message = err.get("message")
    m = _LINE_RE.match(message) if isinstance(message, str) else None
    return int(m.group(1)) if m else None


def _damaged(path: str, line_no: int, what: str) -> UsageError:
    return UsageError(f"{path}:{line_no}: not a batch output line ({what}); the file was edited or damaged: "
                      "fix or delete that line, then rerun")


def _lines(path: str, errors_file: bool) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Each line of a repaired output or error file with its object; raises UsageError at the first line
    that is not a batch line. Only the error file may hold lines without a custom_id: rejected input."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                what = "a blank line" if not raw.strip() else f"not JSON: {str(e.msg).split(': line ', 1)[0]}"
                raise _damaged(path, line_no, what) from None
            if not isinstance(obj, dict):
                raise _damaged(path, line_no, f"a JSON {_kind(obj)}, not an object")
            cid = obj.get("custom_id")
            rejected = errors_file and cid is None and _rejected_line(obj) is not None
            if not (isinstance(cid, str) and cid) and not rejected:
                what = "no custom_id" if cid is None else "custom_id is not a non-empty string"
                raise _damaged(path, line_no, what)
            if not errors_file and not isinstance(obj.get("response"), dict):
                raise _damaged(path, line_no, "no response object")
            yield raw, obj


def _kind(v: object) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def scan(out_path: str | None, err_path: str, stats: Stats, retry_failed: bool = False) -> Ledger:
    """Read both files back into `stats` (counts, usage, providers) and the ledger.

    With `retry_failed`, retryable error lines are removed from the error file (atomically
    rewritten) so that their requests are sent again. A line that is not a batch line raises
    UsageError (nothing is rewritten)."""
    ledger = Ledger()
    if out_path is not None and os.path.exists(out_path):
        repair(out_path)
        for _, obj in _lines(out_path, errors_file=False):
            ledger.done.add(obj["custom_id"])
            stats.completed += 1
            stats.add_usage(obj["response"].get("body"))
    if not os.path.exists(err_path):
        return ledger
    repair(err_path)
    tmp = err_path + ".retry.tmp"
    keep = open(tmp, "wb") if retry_failed else None  # noqa: SIM115 - closed below
    ok = False
    try:
        for raw, obj in _lines(err_path, errors_file=True):
            if keep is not None:
                if is_retryable_line(obj):
                    ledger.retried += 1
                    continue
                keep.write(raw)
            stats.failed += 1
            rejected = _rejected_line(obj)
            if rejected is not None:
                ledger.rejected.add(rejected)
            else:
                ledger.done.add(obj["custom_id"])
        ok = True
    finally:
        if keep is not None:
            keep.flush()
            os.fsync(keep.fileno())
            keep.close()
            if ok and ledger.retried:
                os.replace(tmp, err_path)
            else:
                os.unlink(tmp)
    return ledger
