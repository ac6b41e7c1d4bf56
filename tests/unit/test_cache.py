"""cache: request_key canonical form; ResponseCache round trip, hits, stats, clear, batching, file modes, sharing;
the file's version (user_version + MIGRATIONS) both ways."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from hfbatch import cache as cache_module
from hfbatch.__main__ import main
from hfbatch.cache import CachedAnswer, ResponseCache, cache_schema, default_path, request_key
from hfbatch.errors import UsageError

URL = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ResponseCache]:
    c = ResponseCache(tmp_path / "cache.sqlite3")
    yield c
    c.close()


def put(c: ResponseCache, key: bytes, model: str = "m", body: bytes = b'{"ok":1}', tokens: tuple[int, int] = (3, 4),
        status: int = 200) -> None:
    c.put(key, URL, model, status, body, *tokens)


# ------------------------------------------------------------------ request_key


def test_key_is_32_bytes_and_ignores_key_order_and_whitespace() -> None:
    k = request_key(URL, BODY)
    assert isinstance(k, bytes) and len(k) == 32
    text = '{ "temperature" : 0.5,\n  "messages": [{"content": "hi", "role": "user"}], "model": "m" }'
    assert request_key(URL, orjson.loads(text)) == k
    assert request_key(URL, {"temperature": 0.5, "messages": [{"content": "hi", "role": "user"}], "model": "m"}) == k


def test_key_sorts_nested_keys() -> None:
    a = {"model": "m", "x": {"b": {"d": 1, "c": [{"f": 1, "e": 2}]}, "a": 0}}
    b = {"x": {"a": 0, "b": {"c": [{"e": 2, "f": 1}], "d": 1}}, "model": "m"}
    assert request_key(URL, a) == request_key(URL, b)


def test_key_differs_for_different_bodies_and_urls() -> None:
    k = request_key(URL, BODY)
    assert request_key(URL, {**BODY, "temperature": 0.6}) != k
    assert request_key(URL, {**BODY, "messages": [{"role": "user", "content": "hi!"}]}) != k
    assert request_key("/v1/responses", BODY) != k
    # list order is meaningful; floats follow orjson (1 and 1.0 are different requests)
    assert request_key(URL, {"a": [1, 2]}) != request_key(URL, {"a": [2, 1]})
    assert request_key(URL, {"a": 1}) != request_key(URL, {"a": 1.0})
    # the separator keeps url and body apart
    assert request_key("/v1/x", {}) != request_key("/v1/x{", {})


def test_default_path_is_under_hfbatch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFBATCH_HOME", str(tmp_path / "home"))
    assert default_path() == tmp_path / "home" / "cache.sqlite3"
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700


# ------------------------------------------------------------------ ResponseCache


def test_round_trip_and_hits(cache: ResponseCache) -> None:
    k = request_key(URL, BODY)
    assert cache.get(k) is None
    put(cache, k, body=b'{"answer":42}', tokens=(10, 5))
    got = cache.get(k)  # served from the not-yet-committed buffer
    assert isinstance(got, CachedAnswer)
    assert (got.status, got.body, got.input_tokens, got.output_tokens, got.model) == (200, b'{"answer":42}', 10, 5, "m")
    assert abs(got.created_at - int(time.time())) <= 5
    cache.flush()
    assert cache.get(k) == got
    assert cache.get(k) == got
    s = cache.stats()
    assert s["entries"] == 1 and s["hits"] == 3
    assert (s["saved_input_tokens"], s["saved_output_tokens"]) == (30, 15)


def test_non_2xx_is_never_stored(cache: ResponseCache) -> None:
    for status in (400, 429, 500, 302):
        k = request_key(URL, {"s": status})
        put(cache, k, status=status)
        assert cache.get(k) is None
    assert cache.stats()["entries"] == 0


def test_put_replaces_and_keeps_hits(cache: ResponseCache) -> None:
    k = request_key(URL, BODY)
    put(cache, k, body=b"1")
    cache.flush()
    assert cache.get(k) is not None
    put(cache, k, body=b"2")
    got = cache.get(k)
    assert got is not None and got.body == b"2"
    cache.flush()
    assert cache.stats()["hits"] == 2 and cache.stats()["entries"] == 1


def test_stats(tmp_path: Path) -> None:
    clock = Clock()
    c = ResponseCache(tmp_path / "c.sqlite3", now=clock)
    empty = c.stats()
    assert empty["entries"] == 0 and empty["hits"] == 0 and empty["oldest"] is None and empty["by_model"] == {}
    for i in range(3):
        put(c, request_key(URL, {"i": i}), model="a")
        clock.t += 10
    put(c, request_key(URL, {"i": "b"}), model="b")
    s = c.stats()
    assert s["path"] == str(tmp_path / "c.sqlite3")
    assert s["entries"] == 4 and s["by_model"] == {"a": 3, "b": 1}
    assert (s["oldest"], s["newest"]) == (1_700_000_000, 1_700_000_030)
    assert s["bytes"] > 0
    c.close()


def test_clear_by_model_by_age_and_all(tmp_path: Path) -> None:
    clock = Clock()
    c = ResponseCache(tmp_path / "c.sqlite3", now=clock)
    put(c, request_key(URL, {"i": 1}), model="a")  # t0
    put(c, request_key(URL, {"i": 2}), model="b")  # t0
    clock.t += 100
    put(c, request_key(URL, {"i": 3}), model="a")  # t0 + 100
    put(c, request_key(URL, {"i": 4}), model="b")  # t0 + 100
    clock.t += 100
    assert c.clear(older_than=150, model="a") == 1  # only the old "a"
    assert c.get(request_key(URL, {"i": 1})) is None
    assert c.clear(older_than=150) == 1  # the old "b"
    assert c.clear(older_than=150) == 0
    assert c.clear(model="b") == 1
    assert c.stats()["by_model"] == {"a": 1}
    assert c.clear() == 1
    assert c.stats()["entries"] == 0
    c.close()


def test_writes_are_batched_by_rows_and_time(tmp_path: Path) -> None:
    mono = Clock(0.0)
    p = tmp_path / "c.sqlite3"
    writer = ResponseCache(p, flush_rows=3, flush_interval=0.5, monotonic=mono)
    reader = ResponseCache(p)
    put(writer, b"k1")
    put(writer, b"k2")
    assert reader.get(b"k1") is None  # still buffered in the writer
    put(writer, b"k3")  # 3 rows: committed
    assert reader.get(b"k1") is not None
    put(writer, b"k4")
    mono.t += 0.2
    assert writer.get(b"nothing") is None
    assert reader.get(b"k4") is None
    mono.t += 0.4  # 0.6 s since the last commit
    assert writer.get(b"nothing") is None
    assert reader.get(b"k4") is not None
    put(writer, b"k5")
    writer.close()  # close commits the rest
    assert reader.get(b"k5") is not None
    writer.close()  # idempotent
    with pytest.raises(ValueError):
        writer.get(b"k5")
    reader.close()


def test_file_modes_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        d = tmp_path / "new" / "dir"
        c = ResponseCache(d / "cache.sqlite3")
        put(c, b"k")
        c.flush()
        assert stat.S_IMODE((d / "cache.sqlite3").stat().st_mode) == 0o600
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        for extra in ("cache.sqlite3-wal", "cache.sqlite3-shm"):
            if (d / extra).exists():
                assert stat.S_IMODE((d / extra).stat().st_mode) == 0o600, extra
        c.close()
        loose = tmp_path / "loose.sqlite3"
        loose.touch(mode=0o644)
        ResponseCache(loose).close()
        assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_two_objects_on_one_file_see_each_others_commits(tmp_path: Path) -> None:
    p = tmp_path / "shared.sqlite3"
    a, b = ResponseCache(p), ResponseCache(p)
    put(a, b"from-a", body=b"A")
    a.flush()
    put(b, b"from-b", body=b"B")
    b.flush()
    got_a, got_b = b.get(b"from-a"), a.get(b"from-b")
    assert got_a is not None and got_a.body == b"A"
    assert got_b is not None and got_b.body == b"B"
    assert a.stats()["entries"] == 2
    assert b.clear(model="m") == 2  # VACUUM works with another connection open
    assert a.get(b"from-a") is None
    a.close()
    b.close()


_WRITER = """
import sys
from pathlib import Path
from hfbatch.cache import ResponseCache
c = ResponseCache(Path(sys.argv[1]), flush_rows=25)
for i in range(300):
    c.put(f"{sys.argv[2]}-{i}".encode(), "/v1/embeddings", "m", 200, b"{}", 1, 0)
    c.get(f"{sys.argv[2]}-{i // 2}".encode())
c.close()
"""


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    p = tmp_path / "shared.sqlite3"
    ResponseCache(p).close()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(p), name]) for name in ("x", "y")]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
    with ResponseCache(p) as c:
        s = c.stats()
        assert s["entries"] == 600 and s["hits"] == 600


# ------------------------------------------------------------------ versions (user_version + MIGRATIONS)

# What hfbatch wrote before the cache had a version (user_version 0): kept here verbatim, it is history.
_UNVERSIONED = ["""CREATE TABLE IF NOT EXISTS responses (
    key BLOB PRIMARY KEY, url TEXT NOT NULL, model TEXT NOT NULL, status INTEGER NOT NULL, body BLOB NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, created_at INTEGER NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0)""", "CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at)"]


def unversioned_file(p: Path, rows: int = 2) -> None:
    db = sqlite3.connect(p, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    for ddl in _UNVERSIONED:
        db.execute(ddl)
    for i in range(rows):
        db.execute("INSERT INTO responses VALUES (?, ?, 'm', 200, ?, 1, 2, 1700000000, 3)",
                   (f"k{i}".encode(), URL, f'{{"i":{i}}}'.encode()))
    db.close()


def inspect(p: Path) -> tuple[int, list[tuple[str, str]], list[tuple[bytes, bytes, int]]]:
    """(user_version, the schema's objects, the rows) read with a plain connection."""
    db = sqlite3.connect(p)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        objects = db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
        rows = db.execute("SELECT key, body, hits FROM responses ORDER BY key").fetchall()
    finally:
        db.close()
    return version, objects, rows


def test_a_new_file_is_version_1(tmp_path: Path) -> None:
    ResponseCache(tmp_path / "c.sqlite3").close()
    version, objects, _ = inspect(tmp_path / "c.sqlite3")
    assert version == 1 == cache_schema()
    assert [name for name, _ in objects] == ["responses", "responses_created", "sqlite_autoindex_responses_1"]


def test_a_file_from_before_versions_is_version_1_and_left_as_it_is(tmp_path: Path) -> None:
    p = tmp_path / "c.sqlite3"
    unversioned_file(p)
    before = inspect(p)
    with ResponseCache(p) as c:
        got = c.get(b"k1")
        assert got is not None and got.body == b'{"i":1}'
    version, objects, rows = inspect(p)
    assert (version, objects) == before[:2] == (0, before[1]), "no write just to record the version"
    assert rows == [(b"k0", b'{"i":0}', 3), (b"k1", b'{"i":1}', 4)]


def _v2_add_provider(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE responses ADD COLUMN provider TEXT")
    db.execute("UPDATE responses SET provider = 'unknown'")


def _v3_needs_v2(db: sqlite3.Connection) -> None:
    db.execute("CREATE INDEX responses_provider ON responses (provider)")  # fails unless v2 ran first


@pytest.mark.parametrize("start", ["unversioned", "version-1"])
def test_a_newer_hfbatch_migrates_an_older_file_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         start: str) -> None:
    p = tmp_path / "c.sqlite3"
    if start == "unversioned":
        unversioned_file(p)
    else:
        with ResponseCache(p) as c:  # as this hfbatch writes it
            for i in range(2):
                put(c, f"k{i}".encode(), body=f'{{"i":{i}}}'.encode())
    assert inspect(p)[0] == (0 if start == "unversioned" else 1)
    # the seam: version 2 and 3 are appended functions
    monkeypatch.setattr(cache_module, "MIGRATIONS", [*cache_module.MIGRATIONS, _v2_add_provider, _v3_needs_v2])
    assert cache_schema() == 3
    with ResponseCache(p) as c:
        assert c.get(b"k0") is not None  # rows kept
    version, objects, rows = inspect(p)
    assert version == 3
    assert "responses_provider" in [name for name, _ in objects]
    assert [k for k, _, _ in rows] == [b"k0", b"k1"]
    ResponseCache(p).close()  # already current: nothing runs twice (v3's CREATE INDEX would fail)
    assert inspect(p)[0] == 3


def test_a_failing_migration_leaves_the_file_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "c.sqlite3"
    unversioned_file(p)
    before = inspect(p)

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("disk on fire")

    monkeypatch.setattr(cache_module, "MIGRATIONS", [*cache_module.MIGRATIONS, _v2_add_provider, broken])
    with pytest.raises(sqlite3.OperationalError, match="disk on fire"):
        ResponseCache(p)
    assert inspect(p) == before, "migrations run in one transaction: all or nothing"


NEWER_CACHE = ("the response cache {p} was written by a newer hfbatch (cache schema 99, this one reads up to 1): "
               "upgrade hfbatch (pip install -U hfbatch), or delete the file to start an empty cache")


def newer_file(p: Path) -> None:
    unversioned_file(p)
    db = sqlite3.connect(p, isolation_level=None)
    db.execute("PRAGMA user_version = 99")
    db.execute("CREATE TABLE from_the_future (x)")
    db.close()


def test_an_older_hfbatch_refuses_a_newer_file_untouched(tmp_path: Path) -> None:
    p = tmp_path / "c.sqlite3"
    newer_file(p)
    before, raw = inspect(p), p.read_bytes()
    with pytest.raises(UsageError) as e:
        ResponseCache(p)
    assert e.value.exit_code == 2 and str(e.value) == NEWER_CACHE.format(p=p)
    assert inspect(p) == before and p.read_bytes() == raw


@pytest.mark.parametrize("command", [["cache", "stats"], ["cache", "clear"]])
def test_cache_commands_refuse_a_newer_file_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capfd: pytest.CaptureFixture[str], command: list[str]) -> None:
    monkeypatch.setenv("HFBATCH_HOME", str(tmp_path / "home"))
    p = default_path()
    newer_file(p)
    before = inspect(p)
    assert main(command) == 2
    out, err = capfd.readouterr()
    assert out == "" and err == f"hfbatch: {NEWER_CACHE.format(p=p)}\n"
    assert inspect(p) == before, "clear must not delete rows of a file it cannot read"
