"""cache.AsyncCache: the run's cache never blocks the event loop, even while another process holds the
database's write lock; and it keeps ResponseCache's semantics (buffered puts visible at once, hits counted,
non-2xx never stored, a locked database keeps rows for later and drops them past the cap).

No test reads the clock: the loop's progress is counted in `await asyncio.sleep(0)` turns of a second
coroutine, and "still waiting" is observed as a task not done while the other connection holds the lock."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hfbatch.cache import AsyncCache, ResponseCache
from hfbatch.errors import UsageError

URL = "/v1/chat/completions"
FOREVER = 3600.0  # a flush interval or busy timeout no test waits for


def put(c: AsyncCache | ResponseCache, key: bytes, body: bytes = b'{"ok":1}', status: int = 200) -> None:
    c.put(key, URL, "m", status, body, 3, 4)


def stored(p: Path) -> dict[bytes, tuple[bytes, int]]:
    """{key: (body, hits)} as committed, read with a plain connection."""
    db = sqlite3.connect(p)
    try:
        return {k: (b, h) for k, b, h in db.execute("SELECT key, body, hits FROM responses")}
    finally:
        db.close()


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())  # type: ignore[arg-type]


class Ticker:
    """A coroutine that counts its turns on the loop: it only counts while the loop is free."""

    def __init__(self) -> None:
        self.turns = 0
        self._task = asyncio.get_running_loop().create_task(self._spin())

    async def _spin(self) -> None:
        while True:
            self.turns += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])


def hold_write_lock(p: Path) -> sqlite3.Connection:
    """Another process's view: a connection that holds the write lock (BEGIN IMMEDIATE) until released."""
    other = sqlite3.connect(p, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_the_loop_keeps_running_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    p = tmp_path / "c.sqlite3"
    with ResponseCache(p) as seed:
        put(seed, b"old", body=b"OLD")

    async def scenario() -> None:
        cache = await AsyncCache.open(p, flush_interval=FOREVER, busy_timeout=FOREVER)
        other = hold_write_lock(p)
        ticker = Ticker()
        put(cache, b"new", body=b"NEW")  # buffered: returns without touching the file
        flushing = asyncio.ensure_future(cache.flush())  # the writer thread now waits for the lock
        while not cache._inflight:  # until the writer has taken the rows and is waiting
            await asyncio.sleep(0)

        turns = ticker.turns
        got = await cache.get(b"old")  # from SQLite, in the reader thread
        assert got is not None and got.body == b"OLD"
        assert ticker.turns > turns, "the loop was blocked while get() read the database"
        turns = ticker.turns
        assert await cache.get(b"missing") is None
        assert ticker.turns > turns
        assert not flushing.done(), "the commit cannot have happened: the other connection holds the lock"

        # puts keep being taken, and every buffered answer is visible at once (even the one being committed)
        put(cache, b"newer", body=b"NEWER")
        got = await cache.get(b"new")
        assert got is not None and got.body == b"NEW"
        got = await cache.get(b"newer")
        assert got is not None and got.body == b"NEWER"
        assert b"new" not in stored(p)

        other.execute("COMMIT")  # the other process lets go: the buffered rows land
        other.close()
        assert await flushing is True
        assert stored(p)[b"new"] == (b"NEW", 0)
        await cache.aclose()
        await ticker.stop()
        assert cache.dropped == 0

    run(scenario)
    assert stored(p) == {b"old": (b"OLD", 1), b"new": (b"NEW", 1), b"newer": (b"NEWER", 1)}


def test_round_trip_hits_and_non_2xx(tmp_path: Path) -> None:
    p = tmp_path / "c.sqlite3"

    async def scenario() -> None:
        cache = await AsyncCache.open(p, flush_interval=FOREVER)
        assert await cache.get(b"k") is None
        put(cache, b"k", body=b'{"answer":42}')
        for status in (302, 400, 429, 500):
            put(cache, status.to_bytes(2, "big"), status=status)
            assert await cache.get(status.to_bytes(2, "big")) is None
        got = await cache.get(b"k")  # from the buffer
        assert got is not None and (got.status, got.body, got.input_tokens, got.output_tokens, got.model) == (
            200, b'{"answer":42}', 3, 4, "m")
        assert await cache.flush() is True
        assert await cache.get(b"k") == got  # from the file
        put(cache, b"k", body=b"replaced")  # replaces, keeps the hits already stored
        got = await cache.get(b"k")
        assert got is not None and got.body == b"replaced"
        await cache.aclose()
        await cache.aclose()  # idempotent
        with pytest.raises(ValueError, match="closed"):
            await cache.get(b"k")
        with pytest.raises(ValueError, match="closed"):
            put(cache, b"k")

    run(scenario)
    assert stored(p) == {b"k": (b"replaced", 3)}


def test_rows_flush_in_the_background(tmp_path: Path) -> None:
    p = tmp_path / "c.sqlite3"

    async def scenario() -> None:
        cache = await AsyncCache.open(p, flush_interval=FOREVER, flush_rows=3)
        put(cache, b"a")
        put(cache, b"b")
        await asyncio.sleep(0)
        assert stored(p) == {}
        put(cache, b"c")  # flush_rows reached: the background task commits without being asked
        while len(stored(p)) < 3:
            await asyncio.sleep(0.01)
        await cache.aclose()

    run(scenario)
    assert set(stored(p)) == {b"a", b"b", b"c"}


def test_a_locked_database_keeps_rows_for_later_and_drops_them_past_the_cap(tmp_path: Path) -> None:
    p = tmp_path / "c.sqlite3"
    ResponseCache(p).close()

    async def scenario() -> None:
        cache = await AsyncCache.open(p, flush_interval=FOREVER, flush_rows=2, busy_timeout=0.01)
        other = hold_write_lock(p)
        put(cache, b"kept")
        assert await cache.get(b"kept") is not None
        assert await cache.flush() is False  # locked: kept in memory
        got = await cache.get(b"kept")
        assert got is not None
        other.execute("COMMIT")
        assert await cache.flush() is True
        assert stored(p)[b"kept"] == (b'{"ok":1}', 2)

        other.execute("BEGIN IMMEDIATE")
        for i in range(101):  # past 50 x flush_rows
            put(cache, f"k{i}".encode())
        await cache.flush()  # (the background task may have tried first: either way, past the cap)
        assert cache.dropped == 101
        assert await cache.get(b"k0") is None
        other.execute("COMMIT")
        other.close()
        await cache.aclose()

    run(scenario)
    assert set(stored(p)) == {b"kept"}


def test_close_drops_what_a_locked_database_still_refuses(tmp_path: Path) -> None:
    p = tmp_path / "c.sqlite3"
    ResponseCache(p).close()

    async def scenario() -> None:
        cache = await AsyncCache.open(p, flush_interval=FOREVER, busy_timeout=0.01)
        other = hold_write_lock(p)
        put(cache, b"a")
        await cache.aclose()  # does not fail the run over a cache
        assert cache.dropped == 1
        other.execute("ROLLBACK")
        other.close()

    run(scenario)
    assert stored(p) == {}


def test_open_refuses_a_newer_file(tmp_path: Path) -> None:
    p = tmp_path / "c.sqlite3"
    ResponseCache(p).close()
    db = sqlite3.connect(p)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()

    async def scenario() -> None:
        with pytest.raises(UsageError, match="newer hfbatch"):
            await AsyncCache.open(p)

    run(scenario)
    db = sqlite3.connect(p)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 99
    db.close()


def test_shares_the_file_with_the_sync_cache(tmp_path: Path) -> None:
    p = tmp_path / "c.sqlite3"

    async def scenario() -> None:
        cache = await AsyncCache.open(p)
        put(cache, b"from-async")
        await cache.aclose()
        with ResponseCache(p) as sync:
            assert sync.get(b"from-async") is not None
            put(sync, b"from-sync")
        cache = await AsyncCache.open(p)
        assert await cache.get(b"from-sync") is not None
        await cache.aclose()

    run(scenario)
    assert stored(p)[b"from-async"][1] == 1 and stored(p)[b"from-sync"][1] == 1
