"""Sets of custom_ids and request fingerprints, in memory that does not grow (or grows by 16 bytes) per line.

IdSet: the ids already answered (a resume's ledger, `estimate`). RepeatFinder / FingerprintIds / ExactIds:
which 64-bit fingerprints occur more than once in a stream of millions, in memory that does not grow
with the stream: an external sort (sorted runs of RUN values spilled to an unnamed temp file, then
merged).

The input pre-scan feeds it the custom_id fingerprints (duplicate custom_ids) and the request-key
fingerprints (dedupe). A repeat is only a candidate: callers confirm with the exact value (ExactIds
keeps the ids whose fingerprint repeats; the executor matches full request keys), so a fingerprint
collision costs a little memory, never a wrong answer.
"""

from __future__ import annotations

import heapq
import tempfile
from array import array
from collections.abc import Iterator
from typing import IO, Any

import orjson

MASK64 = (1 << 64) - 1
RUN = 1 << 16  # values per sorted run: 0.5 MB of array, ~2.6 MB while sorting
_BLOCK = 1 << 13  # values read per run at a time while merging


def canonical_request(url: str, body: dict[str, Any]) -> tuple[str, bytes]:
    """What makes two requests the same for dedupe: the endpoint and the body's JSON with sorted keys
    (the model, with its :provider suffix, is in the body)."""
    return url, orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def request_fingerprint(canonical: tuple[str, bytes]) -> int:
    """64 bits of the process's SipHash of a canonical request (2.5x cheaper than a blake2b key; only
    compared within this process)."""
    return hash(canonical) & MASK64


class RepeatFinder:
    """add() values; repeats() -> {value: count} for the values added at least twice."""

    def __init__(self, run: int = RUN) -> None:
        self._run = run
        self._buf = array("Q")
        self._file: IO[bytes] | None = None
        self._runs: list[tuple[int, int]] = []  # (offset in values, length) of each spilled run

    def add(self, value: int) -> None:
        self._buf.append(value)
        if len(self._buf) >= self._run:
            self._spill()

    def _spill(self) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="hfbatch-scan-")
        start = sum(n for _, n in self._runs)
        array("Q", sorted(self._buf)).tofile(self._file)
        self._runs.append((start, len(self._buf)))
        self._buf = array("Q")

    def repeats(self) -> dict[int, int]:
        tail = sorted(self._buf)
        self._buf = array("Q")
        if self._file is None:
            merged: Iterator[int] = iter(tail)
        else:
            self._file.flush()
            merged = heapq.merge(*(self._read_run(o, n) for o, n in self._runs), tail)
        found: dict[int, int] = {}
        try:
            prev = next(merged)
        except StopIteration:
            return found
        count = 1
        for v in merged:
            if v == prev:
                count += 1
                continue
            if count > 1:
                found[prev] = count
            prev, count = v, 1
        if count > 1:
            found[prev] = count
        self.close()
        return found

    def _read_run(self, offset: int, length: int) -> Iterator[int]:
        f = self._file
        assert f is not None
        pos, end = offset, offset + length
        while pos < end:
            n = min(_BLOCK, end - pos)
            f.seek(pos * 8)
            block = array("Q")
            block.frombytes(f.read(n * 8))
            yield from block
            pos += n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._runs = []


class FingerprintIds:
    """The scan's custom_id check: records every id's fingerprint (the process's randomized SipHash of
    the string, 64 bits) and defers the verdict to repeats()."""

    __slots__ = ("finder",)

    def __init__(self, run: int = RUN) -> None:
        self.finder = RepeatFinder(run)

    def add(self, custom_id: str) -> bool:
        self.finder.add(hash(custom_id) & MASK64)
        return True

    def repeats(self) -> set[int]:
        return set(self.finder.repeats())


class ExactIds:
    """custom_id uniqueness in file order, exactly, remembering only the ids whose fingerprint repeats."""

    __slots__ = ("repeated", "seen")

    def __init__(self, repeated: set[int]) -> None:
        self.repeated = repeated
        self.seen: set[str] = set()

    def add(self, custom_id: str) -> bool:
        if not self.repeated or (hash(custom_id) & MASK64) not in self.repeated:
            return True
        if custom_id in self.seen:
            return False
        self.seen.add(custom_id)
        return True


class IdSet:
    """A set of custom_ids in 16 bytes per id (1M ids: 16 MB), not the ~90 of a set of str.

    It stores 64-bit fingerprints (the process's randomized string hash) in an open-addressing
    table: two different ids are confused with probability about n^2 / 2^65 (3e-8 for a million
    lines). Used where a set of ids must be kept (the ids already answered, on resume; `estimate`);
    a run's own uniqueness check needs no such table (RepeatFinder, above).
    """

    __slots__ = ("_table", "_mask", "_count")

    def __init__(self) -> None:
        self._table = array("Q", bytes(8 * 1024))
        self._mask = 1023
        self._count = 0

    def add(self, custom_id: str | bytes) -> bool:
        """Record `custom_id`; False if it was already there."""
        h = (hash(custom_id) & MASK64) | 1  # 0 marks an empty slot
        table, mask = self._table, self._mask
        i = h & mask
        while True:
            v = table[i]
            if v == 0:
                table[i] = h
                self._count += 1
                if self._count * 2 > mask:
                    self._grow()
                return True
            if v == h:
                return False
            i = (i + 1) & mask

    def __contains__(self, custom_id: object) -> bool:
        h = (hash(custom_id) & MASK64) | 1
        table, mask = self._table, self._mask
        i = h & mask
        while True:
            v = table[i]
            if v == h:
                return True
            if v == 0:
                return False
            i = (i + 1) & mask

    def __len__(self) -> int:
        return self._count

    def _grow(self) -> None:
        old = self._table
        self._table = table = array(old.typecode, bytes(2 * old.itemsize * len(old)))
        self._mask = mask = len(table) - 1
        for h in old:
            if h:
                i = h & mask
                while table[i]:
                    i = (i + 1) & mask
                table[i] = h
