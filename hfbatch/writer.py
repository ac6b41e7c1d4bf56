"""Write stage: finished requests -> output / error JSONL lines in OpenAI's batch shape, appended as they finish.

Inside the event loop, lines written during one loop iteration are handed to the OS in one write
at the end of that iteration (call_soon), so a kill -9 loses no answer that was received: a rerun
re-sends at most what was in flight. Files are fsync'ed every `fsync_interval` seconds and at
close, so a machine crash loses at most the last few seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any, BinaryIO

import orjson

_FLUSH_BYTES = 1 << 20


_ID_PREFIX = "batch_req_" + os.urandom(6).hex()  # random per process ...
_ID_COUNTER = itertools.count()  # ... + a counter: unique, and far cheaper than 12 random bytes a line


def new_line_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


class JsonlSink:
    """An append-only JSONL file (or stdout) with batched writes."""

    def __init__(
        self, path: str | None, stream: BinaryIO | None = None, *, append: bool = False,
        fsync_interval: float = 2.0,
    ) -> None:
        self.path = path
        self.lines = 0
        self._buf: list[bytes] = []
        self._size = 0
        self._stream = stream
        self._fd: int | None = None
        if path is not None and stream is None:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
            self._fd = os.open(path, flags, 0o666)
        self._fsync_interval = fsync_interval
        self._last_sync = time.monotonic()
        self._dirty = False
        self._scheduled = False

    def write(self, line: bytes) -> None:
        """Queue one serialized line (without its newline); it reaches the OS at the end of this
        event-loop iteration (or at once outside a loop)."""
        self._buf.append(line)
        self._size += len(line) + 1
        self.lines += 1
        if self._size >= _FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self._flush_soon)
                self._scheduled = True
            except RuntimeError:
                self.flush()

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Hand buffered lines to the OS; fsync when the interval has passed."""
        if self._buf:
            data = b"\n".join(self._buf) + b"\n"
            self._buf.clear()
            self._size = 0
            if self._fd is not None:
                _write_all(self._fd, data)
                self._dirty = True
            elif self._stream is not None:
                self._stream.write(data)
                self._stream.flush()
        if self._dirty and self._fd is not None:
            now = time.monotonic()
            if now - self._last_sync >= self._fsync_interval:
                os.fsync(self._fd)
                self._last_sync = now
                self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            if self._dirty:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def success_line(custom_id: str, status: int, request_id: str, body: Any) -> bytes:
    """An output-file line; `body` is an orjson.Fragment of the provider's bytes or a JSON value."""
    return orjson.dumps(
        {
            "id": new_line_id(),
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
    )


def error_line(
    custom_id: str | None, code: str, message: str, response: dict[str, Any] | None = None
) -> bytes:
    """An error-file line: an HTTP answer that was not 2xx (response set, error null, as OpenAI
    writes them) or a request with no usable answer (response null, error {code, message})."""
    if response is not None:
        return orjson.dumps(
            {"id": new_line_id(), "custom_id": custom_id, "response": response, "error": None}
        )
    return orjson.dumps(
        {
            "id": new_line_id(),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )
