"""The Ray engine's cluster-wide limits through their seams: the pure book (ray_limits.LimitsBook) and a worker's
Lease driven against a local book (no Ray, no clock: the lease's calls are plain coroutines)."""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

from pytest import approx

from hfbatch.config import RunConfig
from hfbatch.cost.pricing import Catalog
from hfbatch.cost.spend import CostLedger
from hfbatch.engines.ray_limits import LimitsBook, Pool, Report, fair
from hfbatch.engines.ray_shard import Lease, SharedBudget
from hfbatch.limits import StopControl
from hfbatch.models import StopReason
from hfbatch.summary import Stats


def test_fair_shares_are_max_min_by_demand_and_never_exceed_the_capacity() -> None:
    assert fair(8, {"a": 100, "b": 100}, whole=True) == {"a": 4, "b": 4}
    assert fair(8, {"a": 1, "b": 100, "c": 100}, whole=True) == {"a": 1, "b": 4, "c": 3}
    assert fair(8, {"a": 0, "b": 3}, whole=True) == {"a": 0, "b": 3}  # an idle worker gets nothing
    assert fair(1.0, {"a": math.inf, "b": math.inf}, whole=False) == {"a": 0.5, "b": 0.5}
    # a worker waiting for more budget than its share gets its need first
    assert fair(1.0, {"a": math.inf, "b": math.inf}, whole=False, first={"b": 0.8}) == {"b": 0.8, "a": approx(0.2)}


def test_the_sum_of_what_workers_may_hold_never_exceeds_c_whatever_the_order_of_syncs() -> None:
    rng = random.Random(7)
    pool = Pool(16, whole=True)
    limit = {w: 0 for w in "abcd"}  # each worker's gate limit
    busy = {w: 0 for w in "abcd"}  # slots in use (never above the limit it had when taking them)
    for _ in range(5000):
        w = rng.choice("abcd")
        busy[w] = rng.randint(0, max(busy[w], limit[w]))  # requests end; new ones take free slots
        held = max(limit[w], busy[w])
        limit[w] = int(pool.sync(w, held, busy[w] + rng.randint(0, 40)))
        # what each worker may have in flight: its new limit, or the slots it still uses above it
        assert sum(max(limit[v], busy[v]) for v in "abcd") <= 16
    # steady demand converges to equal shares within a few syncs each
    for _ in range(4):
        for w in "abcd":
            busy[w] = min(busy[w], limit[w])
            limit[w] = int(pool.sync(w, max(limit[w], busy[w]), 100))
            busy[w] = limit[w]
    assert limit == {"a": 4, "b": 4, "c": 4, "d": 4}


def test_a_newer_attempt_fences_the_older_and_stops_travel_both_ways() -> None:
    book = LimitsBook(concurrency=8, rpm=600, tpm=None)
    e1 = book.join("s1")
    assert book.sync(Report("s1", e1, held=0, want=10)).slots == 8
    e2 = book.join("s1")  # Ray ran the task again: the first attempt is fenced, its slots forgotten
    assert book.sync(Report("s1", e1, held=8, want=10)).fenced
    book.join("s2")
    r = book.sync(Report("s1", e2, held=0, want=10))
    assert not r.fenced and r.slots == 8 and r.rpm == 300  # --rpm split between the two shards running
    stopped = book.sync(Report("s2", 1, held=0, want=1, stop=None))
    assert stopped.slots == 0  # s1 holds all 8 until it reports a shrink
    book.stop(StopReason.CANCELLED.value, "cancelled", hard=False)
    assert book.sync(Report("s1", e2, held=8, want=10)).stop is not None
    book.leave("s1", e2)
    assert book.snapshot().running == 1 and book.snapshot().slots_held == 0


def test_the_budget_is_shared_and_a_request_bigger_than_a_share_is_served_first() -> None:
    book = LimitsBook(concurrency=4, budget=1.0, spent_before=0.2)
    for s in ("a", "b"):
        book.join(s)
    ra = book.sync(Report("a", 1, 0, 1, usd_held=0.0, usd_want=math.inf))
    rb = book.sync(Report("b", 1, 0, 1, usd_held=0.0, usd_want=math.inf))
    assert ra.usd == 0.8 and rb.usd == 0.0  # growth only from what nobody holds (earlier runs spent 0.2)
    ra = book.sync(Report("a", 1, 0, 1, usd_held=0.8, usd_want=math.inf))
    assert ra.usd == 0.4  # told to shrink to its share; b gets it once a reports the shrink
    rb = book.sync(Report("b", 1, 0, 1, usd_held=0.0, usd_want=math.inf, usd_blocked=0.6))
    assert rb.usd == 0.0 and rb.usd_left == 0.8
    ra = book.sync(Report("a", 1, 0, 1, usd_held=0.4, usd_want=math.inf, spent=0.1))
    assert ra.usd == approx(0.2)  # b waits for 0.6: it comes first
    rb = book.sync(Report("b", 1, 0, 1, usd_held=0.0, usd_want=math.inf, usd_blocked=0.6))
    assert rb.usd == approx(0.4)  # what is free now; the rest once a reports its shrink
    book.sync(Report("a", 1, 0, 1, usd_held=0.2, usd_want=math.inf, spent=0.1))
    rb = book.sync(Report("b", 1, 0, 1, usd_held=0.4, usd_want=math.inf, usd_blocked=0.6))
    assert rb.usd == approx(0.6)
    book.leave("a", 1, spent=0.15)
    assert book.usd is not None and math.isclose(book.usd.capacity, 0.65)  # what a spent stays spent


def test_a_lease_takes_its_share_obeys_a_fence_and_reports_its_stop() -> None:
    async def main() -> None:
        book = LimitsBook(concurrency=6, rpm=120)

        async def call(method: str, *args: Any) -> Any:
            return getattr(book, method)(*args)

        cfg = RunConfig(input_path="in", output_path="o", errors_path="e", concurrency=6, rpm=120)
        stats, stop = Stats(), StopControl()
        lease = Lease(call, "s1", book.join("s1"), cfg, stats, stop)
        assert lease.gate.limit == 0
        waiter = asyncio.create_task(lease.gate.acquire())
        await asyncio.sleep(0)
        assert lease.gate.hungry.is_set() and not waiter.done()  # no slot yet: the pump is woken
        assert await lease.sync() and lease.gate.limit == 1  # what it wants: one in use or waiting
        await waiter
        assert lease.capacity.rpm is not None and lease.capacity.rpm.rate == 2.0  # 120/min, all its own
        stop.stop(StopReason.AUTH, "401", hard=True)
        await lease.sync()
        assert book.stopped is not None and book.stopped.reason == "auth"  # every other worker hears it
        book.join("s1")  # a newer attempt
        await lease.sync()
        assert lease.gate.limit == 0

    asyncio.run(main())


def test_a_shared_budget_waits_for_room_rather_than_stopping_the_run() -> None:
    b = SharedBudget(CostLedger(Catalog({}, source="test")))
    assert not b.try_reserve(0.3) and b.need == 0.3  # nothing allotted yet
    b.left = 0.5
    assert b.can_ever_fit(0.3) and b.may_free()  # the rest of the cluster's budget could pay for it: wait
    b.limit = 0.3
    assert b.try_reserve(0.3) and b.need is None
    assert not b.can_ever_fit(0.6)
