"""fingerprints.RepeatFinder: the external-sort repeat finder behind duplicate custom_ids and dedupe (flat memory)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from hfbatch.fingerprints import MASK64, ExactIds, FingerprintIds, RepeatFinder


@pytest.mark.parametrize("run", [7, 64, 1 << 17])  # many spilled runs, a few, none (all in memory)
def test_repeats_match_a_counter(run: int) -> None:
    rng = random.Random(run)
    values = [rng.randrange(1 << 64) for _ in range(600)]
    values += [values[i] for i in rng.sample(range(600), 80)]  # some twice
    values += [values[3]] * 4 + [0, 0, MASK64, MASK64]  # one five times; the extremes of the range
    rng.shuffle(values)
    f = RepeatFinder(run)
    for v in values:
        f.add(v)
    expected = {v: n for v, n in Counter(values).items() if n > 1}
    assert f.repeats() == expected
    assert f._file is None  # the temp file is gone once the answer is known


def test_no_values_and_no_repeats() -> None:
    assert RepeatFinder(4).repeats() == {}
    f = RepeatFinder(4)
    for v in range(10):
        f.add(v)
    assert f.repeats() == {}


def test_ids_fingerprints_then_exact_check_in_file_order() -> None:
    ids = [f"req-{i}" for i in range(300)] + ["req-5", "req-299", "req-5"]
    fp = FingerprintIds(run=50)
    assert all(fp.add(i) for i in ids)  # the scan defers the verdict
    repeated = fp.repeats()
    assert len(repeated) == 2
    exact = ExactIds(repeated)
    verdicts = [exact.add(i) for i in ids]
    assert verdicts.count(False) == 3 and verdicts[-3:] == [False, False, False]
    assert exact.seen == {"req-5", "req-299"}  # only the suspects are remembered


def test_a_fingerprint_collision_is_not_a_duplicate() -> None:
    exact = ExactIds({hash("a") & MASK64, hash("b") & MASK64})  # pretend both collided with something
    assert exact.add("a") and exact.add("b") and not exact.add("a")


def test_canonical_requests_ignore_key_order_but_not_values() -> None:
    from hfbatch.fingerprints import canonical_request, request_fingerprint

    a = canonical_request("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    b = canonical_request("/v1/chat/completions", {"messages": [{"content": "hi", "role": "user"}], "model": "m"})
    c = canonical_request("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi!"}]})
    d = canonical_request("/v1/embeddings", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert a == b and request_fingerprint(a) == request_fingerprint(b)
    assert len({a, c, d}) == 3 and len({request_fingerprint(x) for x in (a, c, d)}) == 3
