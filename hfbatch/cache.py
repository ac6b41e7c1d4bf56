"""Cache stage: (endpoint, request body) -> a stored 2xx answer, in a SQLite file shared by runs and processes.

The key is `request_key(url, body)`: a 32-byte blake2b digest of the endpoint and the canonical JSON body
(`orjson.dumps(body, option=OPT_SORT_KEYS)`: keys sorted at every depth, no whitespace), so the same request
written with another key order or spacing maps to the same entry. Numbers are formatted the way orjson
formats them: `1` and `1.0` are different requests (as they are on the wire), `1e2` and `100.0` the same.

The file (default `$HFBATCH_HOME/cache.sqlite3`) is 0600 whatever the umask (it holds prompts and answers;
SQLite gives its -wal/-shm files the mode of the database). It runs in WAL mode with a 5 s busy timeout, so
several hfbatch processes can share it. Writes are batched: put() and hit counts are buffered and committed
in one transaction; this process's get() sees its own buffered puts at once.

Two faces on the same file. `AsyncCache` is the run's: no SQLite call on the event loop (reads in a reader
thread, commits every `flush_interval` in a writer thread, so a process holding the write lock delays no
request). `ResponseCache` is synchronous, for `hfbatch cache stats|clear`: it commits when `flush_rows` rows
are pending or `flush_interval` seconds have passed (checked on each put/get), and on flush(), stats(),
clear() and close().

Versioned (DESIGN rule 16): `PRAGMA user_version` and MIGRATIONS, applied in order in one transaction when
the file is opened. A file newer than this hfbatch knows is refused (UsageError, exit 2), never changed.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

from .errors import UsageError

if TYPE_CHECKING:  # sqlite3 is imported when a cache is opened: request_key alone (dedupe) does not need it
    import sqlite3

CACHE_FILE = "cache.sqlite3"


def _v1_responses(db: sqlite3.Connection) -> None:
    """Version 1: the responses table and its created_at index (what hfbatch made before user_version)."""
    db.execute("""CREATE TABLE IF NOT EXISTS responses (
    key BLOB PRIMARY KEY, url TEXT NOT NULL, model TEXT NOT NULL, status INTEGER NOT NULL, body BLOB NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, created_at INTEGER NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0)""")
    db.execute("CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at)")


# MIGRATIONS[i] brings a database from user_version i to i + 1 (inside the opening transaction, user_version
# set after each). A new schema is one appended function (and its test); never edit a released one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1_responses]


def cache_schema() -> int:
    """The cache schema (user_version) this hfbatch writes, and the newest it reads."""
    return len(MIGRATIONS)


_UPSERT = """INSERT INTO responses (key, url, model, status, body, input_tokens, output_tokens, created_at, hits)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT(key) DO UPDATE SET url = excluded.url, model = excluded.model, status = excluded.status,
    body = excluded.body, input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens,
    created_at = excluded.created_at, hits = responses.hits + excluded.hits"""
_MAX_PENDING_FACTOR = 50  # a database locked for good: drop buffered rows past 50 x flush_rows (it is a cache)


_SELECT = ("SELECT url, model, status, body, input_tokens, output_tokens, created_at, 0 FROM responses "
           "WHERE key = ? AND status BETWEEN 200 AND 299")
_ADD_HITS = "UPDATE responses SET hits = hits + ? WHERE key = ?"


def request_key(url: str, body: dict[str, Any]) -> bytes:
    """32-byte blake2b digest of `url` + the canonical JSON of `body` (sorted keys at every depth, orjson floats).

    Pass whatever identifies "the same request" for your run: the endpoint path (`/v1/embeddings`), or base URL
    + path to keep answers of different servers apart (the model, with its `:provider` suffix, is in the body)."""
    h = blake2b(digest_size=32)
    h.update(url.encode())
    h.update(b"\0")
    h.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return h.digest()


def default_path() -> Path:
    """$HFBATCH_HOME/cache.sqlite3 (the home directory is created 0700)."""
    from hfbatch.storage import home

    return home() / CACHE_FILE


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A stored answer: HTTP status (always 2xx), the body bytes as written to the output file, its token usage."""

    status: int
    body: bytes
    input_tokens: int
    output_tokens: int
    model: str
    created_at: int


# (url, model, status, body, input_tokens, output_tokens, created_at, hits)
_Row = tuple[str, str, int, bytes, int, int, int, int]


def _stored_version(db: sqlite3.Connection) -> int:
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 and db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'responses'").fetchone() is not None:
        return 1  # made before user_version was set: today's table and index, left as it is
    return version


def _refuse_newer(path: Path, found: int) -> None:
    known = cache_schema()
    if found > known:
        raise UsageError(f"the response cache {path} was written by a newer hfbatch (cache schema {found}, this "
                         f"one reads up to {known}): upgrade hfbatch (pip install -U hfbatch), or delete the file "
                         "to start an empty cache")


def _connect(path: Path, busy_timeout: float, *, reader: bool = False) -> sqlite3.Connection:
    """A connection to the cache file, created 0600 if missing and migrated to cache_schema() (UsageError if a
    newer hfbatch wrote it). `reader`: a read-only connection to a file already opened by a writer."""
    import sqlite3

    if not path.parent.exists():
        from hfbatch.storage import private_dir

        private_dir(path.parent)
    # SQLite would create the file 0644 & ~umask: create it ourselves, then force 0600.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        found = _stored_version(db)
        _refuse_newer(path, found)  # before anything writes to the file
        if reader:
            db.execute("PRAGMA query_only = ON")
            return db
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        if found < cache_schema():
            _migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        found = _stored_version(db)  # again, under the write lock: another process may have just done it
        _refuse_newer(path, found)
        for version in range(found, cache_schema()):
            MIGRATIONS[version](db)
            db.execute(f"PRAGMA user_version = {version + 1}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _select(db: sqlite3.Connection, key: bytes) -> _Row | None:
    row: _Row | None = db.execute(_SELECT, (key,)).fetchone()
    return row


def _select_or_miss(db: sqlite3.Connection, key: bytes) -> _Row | None:
    import sqlite3

    try:
        return _select(db, key)
    except sqlite3.OperationalError:  # locked past the busy timeout for reading: a miss, not a failed run
        return None


def _commit(db: sqlite3.Connection, rows: dict[bytes, _Row], hits: dict[bytes, int]) -> None:
    """Upsert `rows` and add `hits` in one transaction (sqlite3.OperationalError if locked past the busy timeout)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(_UPSERT, [(k, *row) for k, row in rows.items()])
        db.executemany(_ADD_HITS, [(n, k) for k, n in hits.items()])
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled back already (a full disk)
            db.execute("ROLLBACK")
        raise


def _answer(row: _Row) -> CachedAnswer:
    _, model, status, body, inp, out, created, _ = row
    return CachedAnswer(status, bytes(body), inp, out, model, created)


class ResponseCache:
    """A response cache in one SQLite file; safe to share between processes, and between threads of one process.
    Synchronous: for the CLI's `cache stats|clear` (a run uses AsyncCache)."""

    def __init__(
        self, path: Path, *, flush_interval: float = 0.5, flush_rows: int = 200,
        now: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._flush_interval = flush_interval
        self._flush_rows = max(1, flush_rows)
        self._now = now
        self._mono = monotonic
        self._lock = threading.RLock()
        self._pending: dict[bytes, _Row] = {}
        self._hits: dict[bytes, int] = {}
        self._last_flush = monotonic()
        self._db: sqlite3.Connection | None = _connect(self.path, 5.0)

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError("the cache is closed")
        return self._db

    def get(self, key: bytes) -> CachedAnswer | None:
        """The stored 2xx answer for `key` (buffered puts of this process included), counting a hit; else None."""
        with self._lock:
            row = self._pending.get(key)
            if row is not None:
                self._pending[key] = (*row[:7], row[7] + 1)
            else:
                found = _select(self._conn, key)
                if found is None:
                    self._maybe_flush()
                    return None
                row = found
                self._hits[key] = self._hits.get(key, 0) + 1
            self._maybe_flush()
        return _answer(row)

    def put(
        self, key: bytes, url: str, model: str, status: int, body: bytes, input_tokens: int, output_tokens: int,
    ) -> None:
        """Store an answer (replacing an older one for the same key). Non-2xx answers are ignored: never cached."""
        if not 200 <= status < 300:
            return
        with self._lock:
            old = self._pending.get(key)
            hits = old[7] if old is not None else 0
            self._pending[key] = (url, model, status, bytes(body), input_tokens, output_tokens, int(self._now()), hits)
            self._maybe_flush()

    def _maybe_flush(self) -> None:
        if not self._pending and not self._hits:
            self._last_flush = self._mono()
            return
        waiting = len(self._pending) + len(self._hits)
        if waiting < self._flush_rows and self._mono() - self._last_flush < self._flush_interval:
            return
        import sqlite3

        try:
            self.flush()
        except sqlite3.OperationalError:  # locked past the busy timeout: keep the rows, try again later
            self._last_flush = self._mono()
            if len(self._pending) > _MAX_PENDING_FACTOR * self._flush_rows:
                self._pending.clear()
                self._hits.clear()

    def flush(self) -> None:
        """Commit buffered puts and hit counts in one transaction (raises sqlite3.OperationalError if locked)."""
        with self._lock:
            if not self._pending and not self._hits:
                return
            _commit(self._conn, self._pending, self._hits)
            self._pending.clear()
            self._hits.clear()
            self._last_flush = self._mono()

    def stats(self) -> dict[str, Any]:
        """{path, entries, bytes (database + WAL on disk), hits, by_model {model: entries}, oldest, newest
        (created_at, None when empty), saved_input_tokens, saved_output_tokens (tokens x hits)}."""
        with self._lock:
            self.flush()
            db = self._conn
            entries, hits, oldest, newest, saved_in, saved_out = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(hits), 0), MIN(created_at), MAX(created_at), "
                "COALESCE(SUM(hits * input_tokens), 0), COALESCE(SUM(hits * output_tokens), 0) FROM responses"
            ).fetchone()
            by_model = dict(db.execute("SELECT model, COUNT(*) FROM responses GROUP BY model ORDER BY model"))
        size = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                size += p.stat().st_size
            except FileNotFoundError:
                pass
        return {"path": str(self.path), "entries": entries, "bytes": size, "hits": hits, "by_model": by_model,
                "oldest": oldest, "newest": newest, "saved_input_tokens": saved_in, "saved_output_tokens": saved_out}

    def clear(self, older_than: int | None = None, model: str | None = None) -> int:
        """Delete entries (all of them by default; `older_than`: only those created more than that many
        seconds ago; `model`: only that model's), then VACUUM. Returns the number of entries deleted."""
        where: list[str] = []
        args: list[Any] = []
        if older_than is not None:
            where.append("created_at < ?")
            args.append(int(self._now()) - older_than)
        if model is not None:
            where.append("model = ?")
            args.append(model)
        sql = "DELETE FROM responses" + (" WHERE " + " AND ".join(where) if where else "")
        import sqlite3

        with self._lock:
            self.flush()
            db = self._conn
            deleted = db.execute(sql, args).rowcount
            try:
                db.execute("VACUUM")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:  # another process is busy with the file: the space comes back later
                pass
        return deleted

    def close(self) -> None:
        """Commit what is buffered and close the connection (idempotent)."""
        with self._lock:
            if self._db is None:
                return
            try:
                self.flush()
            finally:
                self._db.close()
                self._db = None


class AsyncCache:
    """The response cache as a run uses it, from its event loop: no SQLite call ever runs on the loop.

    get() answers from this process's buffer, else reads SQLite in the cache's reader thread; put() only
    buffers. A background task commits the buffer every `flush_interval` seconds (sooner once `flush_rows`
    rows wait) in the writer thread, so another process holding the write lock holds up that thread only:
    gets keep being answered (a WAL reader does not wait for writers) and requests keep flowing. A commit
    that finds the database locked past `busy_timeout` keeps the rows for the next one, dropping them past
    50 x flush_rows (it is a cache; `dropped` counts them). Each connection is used by its own thread only.

        cache = await AsyncCache.open(path)      # UsageError if a newer hfbatch wrote the file
        hit = await cache.get(key)               # CachedAnswer | None, counting a hit
        cache.put(key, url, model, status, body, input_tokens, output_tokens)   # never waits
        await cache.aclose()                     # commits what is buffered
    """

    def __init__(self, path: Path, *, flush_interval: float = 0.5, flush_rows: int = 200, busy_timeout: float = 5.0,
                 now: Callable[[], float] = time.time) -> None:
        """Use `await AsyncCache.open(...)`: it connects (in a thread) and starts the background flush."""
        self.path = Path(path)
        self.dropped = 0  # rows given up on: the database stayed locked (or full) past the cap, or at close
        self._interval = flush_interval
        self._flush_rows = max(1, flush_rows)
        self._now = now
        self._lock = threading.Lock()  # guards the dicts below; never held during I/O
        self._pending: dict[bytes, _Row] = {}
        self._hits: dict[bytes, int] = {}
        self._inflight: dict[bytes, _Row] = {}  # being committed by the writer: still answered from memory
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="hfbatch-cache-read")
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="hfbatch-cache-write")
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, flush_interval: float = 0.5, flush_rows: int = 200,
                   busy_timeout: float = 5.0, now: Callable[[], float] = time.time) -> AsyncCache:
        """Connect (creating and migrating the file as needed, in the writer thread) and start flushing."""
        cache = cls(path, flush_interval=flush_interval, flush_rows=flush_rows, busy_timeout=busy_timeout, now=now)
        loop = asyncio.get_running_loop()
        try:
            cache._writer = await loop.run_in_executor(cache._writes, _connect, cache.path, busy_timeout)
            cache._reader = await loop.run_in_executor(
                cache._reads, lambda: _connect(cache.path, busy_timeout, reader=True))
        except BaseException:
            await cache._disconnect()
            raise
        cache._task = loop.create_task(cache._flush_every(), name="hfbatch cache flush")
        return cache

    async def get(self, key: bytes) -> CachedAnswer | None:
        """The stored 2xx answer for `key` (this process's buffered puts included), counting a hit; else None.
        A database locked past the busy timeout for reading answers None (a miss)."""
        if self._closed or self._reader is None:
            raise ValueError("the cache is closed")
        with self._lock:
            row = self._pending.get(key)
            if row is not None:
                self._pending[key] = (*row[:7], row[7] + 1)
                return _answer(row)
            row = self._inflight.get(key)
            if row is not None:
                self._hits[key] = self._hits.get(key, 0) + 1
                return _answer(row)
        found = await asyncio.get_running_loop().run_in_executor(self._reads, _select_or_miss, self._reader, key)
        if found is None:
            return None
        with self._lock:
            self._hits[key] = self._hits.get(key, 0) + 1
        return _answer(found)

    def put(self, key: bytes, url: str, model: str, status: int, body: bytes, input_tokens: int,
            output_tokens: int) -> None:
        """Buffer an answer (replacing an older one for the same key); committed by the next flush. Non-2xx
        answers are ignored: never cached. Never does I/O: call it from the loop."""
        if self._closed:
            raise ValueError("the cache is closed")
        if not 200 <= status < 300:
            return
        with self._lock:
            old = self._pending.get(key)
            hits = old[7] if old is not None else 0
            self._pending[key] = (url, model, status, bytes(body), input_tokens, output_tokens, int(self._now()), hits)
            due = len(self._pending) + len(self._hits) >= self._flush_rows
        if due:
            self._due.set()

    async def flush(self) -> bool:
        """Commit what is buffered, in the writer thread. False: the database stayed locked past the busy
        timeout (or is full); the rows are kept for the next flush, or dropped past the cap."""
        if self._writer is None:
            raise ValueError("the cache is closed")
        return await asyncio.get_running_loop().run_in_executor(self._writes, self._flush_now)

    async def aclose(self) -> None:
        """Stop the background flush, commit what is buffered (rows the database still refuses after the busy
        timeout are dropped and counted in `dropped`), close both connections. Idempotent."""
        if self._closed:
            return
        self._closed = True  # no more put/get
        task, self._task = self._task, None
        failure: BaseException | None = None
        try:
            if task is not None:
                task.cancel()
                await asyncio.wait([task])  # our own cancellation still propagates
                if not task.cancelled():
                    failure = task.exception()  # the flusher died of a bug: loud, below
            if self._writer is not None and not await self.flush():
                with self._lock:
                    self.dropped += len(self._pending)
                    self._pending.clear()
                    self._hits.clear()
        finally:
            await self._disconnect()
        if failure is not None:
            raise failure

    async def _flush_every(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    await self._due.wait()
            except TimeoutError:
                pass
            self._due.clear()
            if not await self.flush():
                await asyncio.sleep(self._interval)  # locked: leave the other process be for a while

    def _flush_now(self) -> bool:
        """In the writer thread: commit a snapshot of the buffer; on a lock, put it back (newer puts win)."""
        import sqlite3

        db = self._writer
        if db is None:
            raise ValueError("the cache is closed")
        with self._lock:
            if not self._pending and not self._hits:
                return True
            rows, hits = self._pending, self._hits
            self._pending, self._hits, self._inflight = {}, {}, rows
        try:
            _commit(db, rows, hits)
        except sqlite3.OperationalError:  # locked past the busy timeout, or a full disk: keep them for later
            with self._lock:
                for k, row in rows.items():
                    newer = self._pending.get(k)
                    self._pending[k] = row if newer is None else (*newer[:7], newer[7] + row[7])
                for k, n in hits.items():
                    self._hits[k] = self._hits.get(k, 0) + n
                self._inflight = {}
                if len(self._pending) > _MAX_PENDING_FACTOR * self._flush_rows:
                    self.dropped += len(self._pending)
                    self._pending.clear()
                    self._hits.clear()
            return False
        except BaseException:
            with self._lock:
                self._inflight = {}
            raise
        with self._lock:
            self._inflight = {}
        return True

    async def _disconnect(self) -> None:
        loop = asyncio.get_running_loop()
        for pool, attr in ((self._reads, "_reader"), (self._writes, "_writer")):
            db: sqlite3.Connection | None = getattr(self, attr)
            setattr(self, attr, None)
            try:
                if db is not None:
                    await loop.run_in_executor(pool, db.close)
            finally:
                pool.shutdown(wait=False)
