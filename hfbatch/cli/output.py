"""What the CLI prints as data: the Batch object as one JSON line (stdout unless stdout carries output lines)."""

from __future__ import annotations

import sys
from typing import Any

import orjson


def emit_json(batch: dict[str, Any], *, to_stderr: bool, path: str | None, stream: bool = True) -> None:
    """The Batch object as one JSON line: stdout is data, unless stdout carries the output lines. `path`
    (--summary) gets it too; `stream` False: only there (a person reads a table instead)."""
    from ..writer import escape_separators

    data = escape_separators(orjson.dumps(batch)) + b"\n"
    if stream:
        out = sys.stderr.buffer if to_stderr else sys.stdout.buffer
        out.write(data)
        out.flush()
    if path:
        write_summary(path, data, batch)


def write_summary(path: str, data: bytes, batch: dict[str, Any]) -> None:
    """--summary FILE, replaced atomically. A failure (a full disk) is a WriteError (exit 5) naming the file;
    the batch itself is as its Batch object says, and the rerun (a replay when it has ended) writes it."""
    from pathlib import Path

    from ..errors import WriteError
    from ..storage import replace_file

    try:
        replace_file(Path(path), data, private=False)
    except OSError as e:
        raise WriteError(f"cannot write --summary {path}: {e.strerror or e}; the batch is "
                         f"{batch.get('status')} (its Batch object was printed). Fix that, then rerun the same "
                         "command to write it") from None


def wants_json(json: bool, *, to_stderr: bool = False) -> bool:
    """JSON for programs: asked for (--json), or the stream it goes to is not a terminal (pipes, cron, scripts)."""
    return json or not (sys.stderr if to_stderr else sys.stdout).isatty()
