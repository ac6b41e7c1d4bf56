"""What the CLI prints as data: the Batch object as one JSON line (stdout unless stdout carries output lines)."""

from __future__ import annotations

import os
import sys
from typing import Any

import orjson


def emit_json(batch: dict[str, Any], *, to_stderr: bool, path: str | None) -> None:
    """The Batch object as one JSON line: stdout is data, unless stdout carries the output lines."""
    from ..writer import escape_separators

    data = escape_separators(orjson.dumps(batch)) + b"\n"
    if path:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    stream = sys.stderr.buffer if to_stderr else sys.stdout.buffer
    stream.write(data)
    stream.flush()
