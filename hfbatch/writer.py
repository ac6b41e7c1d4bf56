"""Write stage: finished requests -> output / error JSONL lines in OpenAI's batch shape, appended as they finish.

Inside the event loop, lines written during one loop iteration are handed to the OS in one write
at the end of that iteration (call_soon), so a kill -9 loses no answer that was received: a rerun
re-sends at most what was in flight. Files are fsync'ed every `fsync_interval` seconds and at
close, so a machine crash loses at most the last few seconds.

A write that fails (a full disk, EIO, a quota, the file removed, moved or truncated under the run)
never raises into the event loop and never loses a line silently: the sink keeps every byte it
could not write, retries on each flush, records the first error (`error`) and tells its owner
(`on_error`), which stops the run. What never reached the file is counted (`unwritten_lines`), so
a summary never claims it.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import stat
import time
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

import orjson

from .models import Answer, Body, Failure, Success
from .summary import Stats

_FLUSH_BYTES = 1 << 20


_ID_PREFIX = "batch_req_" + os.urandom(6).hex()  # random per process ...
_ID_COUNTER = itertools.count()  # ... + a counter: unique, and far cheaper than 12 random bytes a line


def new_line_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


class Target(Protocol):
    """Where a sink's bytes go (the seam tests use to inject a failing disk)."""

    name: str  # for messages: the path, or "stdout"

    def write(self, data: memoryview) -> int:
        """Write some of `data`; the number of bytes written. Raises OSError."""
        ...

    def sync(self) -> None:
        """Make what was written durable (fsync). Raises OSError."""
        ...

    def check(self) -> None:
        """Raise OSError if the file is no longer the one written to (removed, moved, truncated)."""
        ...

    def close(self) -> None:
        ...


class FileTarget:
    """A regular file (or a device/FIFO, unchecked), opened by path for appending or truncated."""

    def __init__(self, path: str, *, append: bool) -> None:
        self.name = path
        # O_APPEND in both modes: a file truncated under us then shows as shorter than what we wrote.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        self._fd: int | None = os.open(path, flags, 0o666)
        st = os.fstat(self._fd)
        self._regular = stat.S_ISREG(st.st_mode)
        self._inode = (st.st_dev, st.st_ino)
        self.size = st.st_size if append else 0  # what the file must hold: what was there + what we wrote

    def write(self, data: memoryview) -> int:
        assert self._fd is not None
        n = os.write(self._fd, data)
        self.size += n
        return n

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def check(self) -> None:
        if self._fd is None or not self._regular:
            return
        st = os.fstat(self._fd)
        try:
            here = os.stat(self.name)
        except FileNotFoundError:
            here = None
        if st.st_nlink == 0 or here is None or (here.st_dev, here.st_ino) != self._inode:
            raise OSError(errno.ENOENT, "it was removed or moved away while the batch was running", self.name)
        if st.st_size < self.size:
            raise OSError(errno.EIO, "it was truncated while the batch was running", self.name)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class StreamTarget:
    """A binary stream (stdout with `-o -`). A buffered one (sys.stdout.buffer) is written through to its
    file, as a FileTarget is: its buffer would hide how much of a failed write reached the file (a full
    disk under a redirected stdout), so that what the sink counts as written, and what it retries,
    would not be what is there."""

    def __init__(self, stream: BinaryIO, name: str = "stdout") -> None:
        self.name, self._stream = name, stream
        self._raw: Any = getattr(stream, "raw", None)

    def write(self, data: memoryview) -> int:
        if self._raw is not None:
            self._stream.flush()  # what others buffered there goes first
            n = self._raw.write(data)
        else:  # unbuffered (PYTHONUNBUFFERED=1: a FileIO, which may write part of it), or in memory
            n = self._stream.write(data)
            self._stream.flush()
        if n is None:  # a non-blocking stdout that is full
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return int(n)

    def sync(self) -> None:
        pass

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """An append-only JSONL file (or stdout) with batched writes; see the module docstring for failures."""

    def __init__(
        self, target: Target, *, fsync_interval: float = 2.0,
        on_error: Callable[[JsonlSink, OSError], None] | None = None,
    ) -> None:
        self.target = target
        self.lines = 0  # lines written by callers (queued or on disk)
        self.error: OSError | None = None  # the first failed write, sync or check
        self.on_error = on_error
        self._buf: list[bytes] = []
        self._size = 0
        self._pending = b""  # bytes a failed write left (a torn line's tail first)
        self._fsync_interval = fsync_interval
        self._last_sync = time.monotonic()
        self._dirty = False
        self._scheduled = False
        self._closed = False

    @classmethod
    def open(cls, path: str, *, append: bool = False, fsync_interval: float = 2.0,
             on_error: Callable[[JsonlSink, OSError], None] | None = None) -> JsonlSink:
        return cls(FileTarget(path, append=append), fsync_interval=fsync_interval, on_error=on_error)

    @classmethod
    def stream(cls, stream: BinaryIO, on_error: Callable[[JsonlSink, OSError], None] | None = None) -> JsonlSink:
        return cls(StreamTarget(stream), on_error=on_error)

    @property
    def name(self) -> str:
        return self.target.name

    def unwritten_lines(self) -> int:
        """Lines written by callers that did not reach the file (a torn last line counts)."""
        return len(self._buf) + self._pending.count(b"\n")

    def write(self, line: bytes) -> None:
        """Queue one serialized line (without its newline); it reaches the OS at the end of this
        event-loop iteration (or at once outside a loop). After a failure, lines wait for the next
        flush (the run's ticker retries them)."""
        self._buf.append(line)
        self._size += len(line) + 1
        self.lines += 1
        if self.error is not None:
            return
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
        """Hand buffered lines to the OS; fsync (and check the file is still ours) when the interval has
        passed. Never raises: a failure is recorded and the bytes kept for the next flush."""
        if self._buf:
            data = b"\n".join(self._buf) + b"\n"
            self._buf.clear()
            self._size = 0
            self._pending = self._pending + data if self._pending else data
        if self._pending:
            view = memoryview(self._pending)
            try:
                while view:
                    n = self.target.write(view)
                    view = view[n:]
            except OSError as e:
                self._pending = bytes(view)
                self._fail(e)
                return
            finally:
                view.release()
            self._pending = b""
            self._dirty = True
        if self._dirty:
            now = time.monotonic()
            if now - self._last_sync >= self._fsync_interval:
                self._sync()
                self._last_sync = now

    def _sync(self) -> None:
        try:
            self.target.sync()
            self.target.check()
        except OSError as e:
            self._fail(e)
            return
        self._dirty = False

    def _fail(self, e: OSError) -> None:
        if self.error is None:
            self.error = e
            if self.on_error is not None:
                self.on_error(self, e)

    def describe_error(self) -> str:
        """One line: which file and what the OS said (or what happened to the file)."""
        e = self.error
        if e is None:
            return ""
        return f"cannot write {self.name}: {e.strerror or e}"

    def close(self) -> None:
        """Last flush, fsync, close; failures are recorded (never raised)."""
        if self._closed:
            return
        self.flush()
        if self._dirty or self.error is None:
            self._sync()
        self._closed = True
        try:
            self.target.close()
        except OSError as e:
            self._fail(e)


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


def escape_separators(line: bytes) -> bytes:
    """U+2028, U+2029 and U+0085 escaped (`\\u2028`...): Python's splitlines() and older JavaScript split
    lines on them. In valid UTF-8 JSON these bytes can only be those characters, inside strings, where
    the escape means the same: every other byte stays as it was (a provider's body included)."""
    if b"\xe2\x80" in line or b"\xc2\x85" in line:
        line = (line.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")
                .replace(b"\xc2\x85", b"\\u0085"))
    return line


def success_line(custom_id: str, status: int, request_id: str, body: Body) -> bytes:
    """An output-file line; `body` is an orjson.Fragment of the provider's bytes or a JSON value."""
    return escape_separators(orjson.dumps(
        {
            "id": new_line_id(),
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
    ))


def error_line(
    custom_id: str | None, code: str, message: str, response: dict[str, Any] | None = None
) -> bytes:
    """An error-file line: an HTTP answer that was not 2xx (response set, error null, as OpenAI
    writes them) or a request with no usable answer (response null, error {code, message})."""
    if response is not None:
        return escape_separators(orjson.dumps(
            {"id": new_line_id(), "custom_id": custom_id, "response": response, "error": None}
        ))
    return escape_separators(orjson.dumps(
        {
            "id": new_line_id(),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    ))


class Answers:
    """Where a request's answer goes: exactly one line, in the output file (a 2xx) or the error file, counted."""

    __slots__ = ("out", "err", "stats")

    def __init__(self, out: JsonlSink, err: JsonlSink, stats: Stats) -> None:
        self.out, self.err, self.stats = out, err, stats

    def write(self, custom_id: str | None, answer: Answer) -> None:
        if isinstance(answer, Success):
            self.out.write(success_line(custom_id or "", answer.status, answer.request_id, answer.body))
            self.stats.completed += 1
            return
        if isinstance(answer, Failure):
            response = {"status_code": answer.status, "request_id": answer.request_id, "body": answer.body}
            self.err.write(error_line(custom_id, "", "", response))
        else:
            self.err.write(error_line(custom_id, answer.code, answer.message))
        self.stats.failed += 1

    @property
    def broken(self) -> bool:
        """A write failed (see JsonlSink.error)."""
        return self.out.error is not None or self.err.error is not None
