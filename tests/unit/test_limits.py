"""limits: RateBucket (RPM/TPM pacing), AIMD (per-provider concurrency), Gate (a semaphore whose limit moves).

Pure and clock-injected: no test here sleeps; time is a number the test advances.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from hfbatch.limits import AIMD, Gate, RateBucket


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------- RateBucket


def test_rate_bucket_rejects_a_non_positive_rate() -> None:
    for rate in (0, -1.0):
        with pytest.raises(ValueError):
            RateBucket(rate)


def test_200_reservations_at_3000_per_minute_spread_over_4_seconds_without_burst() -> None:
    clock = Clock(1000.0)
    bucket = RateBucket(3000 / 60.0, clock=clock)  # 50/s, burst allowance max(1, 5) = 5 units
    waits = [bucket.reserve(1) for _ in range(200)]  # all booked at the same instant
    starts = [1000.0 + w for w in waits]
    assert waits[0] == 0.0
    assert waits == sorted(waits), "served in booking order"
    assert waits[-1] == pytest.approx(199 / 50)  # ~4 s for 200 at 50/s
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) == pytest.approx(0.02) and max(gaps) == pytest.approx(0.02)  # evenly spread
    # No window of one second holds more than the rate (+1 for the window's edge).
    for s in starts:
        assert sum(1 for x in starts if s <= x < s + 1.0) <= 51


def test_callers_that_sleep_their_waits_never_exceed_rate_plus_burst() -> None:
    """Simulated callers: each books, sleeps what it was told, books again (a steady stream)."""
    clock = Clock(0.0)
    rate = 3000 / 60.0
    bucket = RateBucket(rate, clock=clock)
    events: list[float] = []
    # 20 concurrent callers, each running 10 requests back to back: a discrete-event loop.
    ready = [(0.0, i) for i in range(20)]
    remaining = dict.fromkeys(range(20), 10)
    while ready:
        ready.sort()
        t, who = ready.pop(0)
        clock.t = t
        start = t + bucket.reserve(1)
        events.append(start)
        remaining[who] -= 1
        if remaining[who]:
            ready.append((start + 0.001, who))  # the request itself takes 1 ms
    assert len(events) == 200
    assert max(events) - min(events) == pytest.approx(199 / rate, abs=0.05)
    events.sort()
    for s in events:
        assert sum(1 for x in events if s <= x < s + 1.0) <= rate + 1


def test_after_idle_only_the_small_burst_goes_at_once() -> None:
    clock = Clock(0.0)
    bucket = RateBucket(50.0, clock=clock)
    for _ in range(10):
        bucket.reserve(1)
    clock.t = 60.0  # a minute of silence: no minute-sized burst is saved up
    waits = [bucket.reserve(1) for _ in range(60)]
    immediate = sum(1 for w in waits if w == 0.0)
    assert 1 <= immediate <= bucket.burst + 1  # burst = 5 units (0.1 s worth)
    assert waits[-1] == pytest.approx((60 - bucket.burst - 1) / 50.0, abs=0.021)


def test_tpm_booking_and_refund() -> None:
    clock = Clock(0.0)
    tpm = RateBucket(6000 / 60.0, burst=6000 / 60.0, clock=clock)  # 100 tokens/s, as the executor builds it
    assert tpm.reserve(500) == 0.0  # a request larger than the burst still runs at once...
    assert tpm.reserve(100) == pytest.approx(5.0)  # ...but its tokens delay the next one
    # The first request used 100 of its 500 booked tokens: the 400 come back.
    tpm.refund(400)
    assert tpm.reserve(1) == pytest.approx(2.0)  # 100 + 100 tokens booked at 100/s
    clock.t = 10.0  # idle since 2.01 s: at most the burst (1 s = 100 tokens) is saved up
    assert tpm.reserve(150) == 0.0  # booked from 9.0 s on
    assert tpm.reserve(1) == pytest.approx(0.5)  # 9.0 + 1.5 = 10.5


# --------------------------------------------------------------------------- AIMD


def test_aimd_starts_at_min_of_maximum_and_initial() -> None:
    a = AIMD(200, clock=Clock())
    assert a.value == 64 and a.slow_start
    b = AIMD(10, clock=Clock())
    assert b.value == 10 and not b.slow_start  # already at its maximum: nothing to probe
    assert AIMD(100, initial=4, clock=Clock()).value == 4


def test_aimd_slow_start_doubles_per_round_trip() -> None:
    a = AIMD(1000, initial=4, clock=Clock())
    for expected in (8, 16, 32, 64):
        for _ in range(a.value):  # one round trip: `value` requests succeed
            a.on_success()
        assert a.value == expected and a.slow_start


def test_aimd_throttle_ends_slow_start_then_additive_increase() -> None:
    clock = Clock(10.0)
    a = AIMD(1000, initial=40, clock=clock)
    assert a.on_throttle(started_at=9.0)
    assert not a.slow_start and a.limit == pytest.approx(28.0) and a.value == 28 and a.decreases == 1
    before = a.limit
    for _ in range(29):  # one round trip of successes adds about 1
        a.on_success()
    assert a.limit == pytest.approx(before + 1.0, abs=0.05) and a.value == 29
    for _ in range(10):  # each round trip (`value` successes) adds about 1, never a jump
        before = a.limit
        for _ in range(a.value):
            a.on_success()
        assert 0.9 <= a.limit - before <= 1.05
    assert 38 <= a.value <= 39


def test_aimd_one_decrease_per_window() -> None:
    clock = Clock(100.0)
    a = AIMD(200, initial=64, clock=clock)
    # 20 requests started at t=99 all come back 429 at t=100: one decrease only.
    results = [a.on_throttle(started_at=99.0) for _ in range(20)]
    assert results == [True] + [False] * 19
    assert a.decreases == 1 and a.limit == pytest.approx(64 * 0.7)
    clock.t = 101.0
    assert not a.on_throttle(started_at=99.99)  # started before the decrease: ignored
    assert a.decreases == 1
    assert a.on_throttle(started_at=100.5)  # started after it: a new window of overload
    assert a.decreases == 2 and a.limit == pytest.approx(64 * 0.7 * 0.7)


def test_aimd_bounds_are_1_and_maximum() -> None:
    clock = Clock(0.0)
    a = AIMD(50, initial=8, clock=clock)
    for i in range(100):
        clock.t = float(i + 1)
        a.on_throttle(started_at=float(i) + 0.5)  # each started after the previous decrease
    assert a.limit == 1.0 and a.value == 1 and a.decreases == 100
    for _ in range(100_000):
        a.on_success()
    assert a.limit == 50.0 and a.value == 50
    b = AIMD(5, initial=2, clock=Clock())
    for _ in range(100):
        b.on_success()
    assert b.value == 5  # slow start stops at the maximum too


# --------------------------------------------------------------------------- Gate


def test_gate_limit_changes_while_waiters_wait() -> None:
    async def scenario() -> None:
        gate = Gate(2)
        order: list[int] = []

        async def worker(i: int) -> None:
            await gate.acquire()
            order.append(i)

        tasks = [asyncio.create_task(worker(i)) for i in range(6)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == [0, 1] and gate.active == 2 and gate.waiting == 4

        gate.set_limit(4)  # raised: two waiters start at once, in arrival order
        await asyncio.sleep(0)
        assert order == [0, 1, 2, 3] and gate.active == 4

        gate.set_limit(2)  # lowered: nobody is preempted, but nobody new starts...
        gate.release()
        await asyncio.sleep(0)
        assert order == [0, 1, 2, 3] and gate.active == 3
        gate.release()
        gate.release()
        await asyncio.sleep(0)
        assert order == [0, 1, 2, 3, 4] and gate.active == 2  # ...until active < limit

        gate.set_limit(0)  # clamped to 1
        assert gate.limit == 1
        gate.release()
        await asyncio.sleep(0)
        assert order == [0, 1, 2, 3, 4] and gate.active == 1
        gate.release()
        await asyncio.sleep(0)
        assert order == [0, 1, 2, 3, 4, 5] and gate.active == 1
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_gate_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    async def scenario() -> None:
        gate = Gate(1)
        await gate.acquire()
        waiter = asyncio.create_task(gate.acquire())
        other = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert gate.waiting == 2
        waiter.cancel()
        await asyncio.sleep(0)
        assert waiter.cancelled() and gate.waiting == 1
        gate.release()
        await asyncio.sleep(0)
        assert other.done() and gate.active == 1
        # Woken and cancelled in the same tick: the slot is passed on, not leaked.
        third = asyncio.create_task(gate.acquire())
        fourth = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        gate.release()  # wakes `third`...
        third.cancel()  # ...which is cancelled before it runs
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert third.cancelled() and fourth.done() and gate.active == 1

    asyncio.run(scenario())


def test_aimd_ignores_throttles_within_one_round_trip_of_a_decrease() -> None:
    # A 429 comes back at once while the requests that caused it are still in flight: requests
    # started just after a decrease must not cut the limit again within one smoothed round trip.
    clock = Clock(100.0)
    a = AIMD(200, initial=64, clock=clock)
    for _ in range(5):
        a.on_success(latency=0.2)
    assert a.srtt == pytest.approx(0.2)
    assert a.on_throttle(started_at=99.9)
    clock.t = 100.05
    assert not a.on_throttle(started_at=100.01)  # started after the cut, but within 0.2 s of it
    clock.t = 100.3
    assert a.on_throttle(started_at=100.25)  # a round trip later: a new window of overload
    assert a.decreases == 2


def test_aimd_clamp_brings_the_limit_to_what_the_provider_kept() -> None:
    a = AIMD(200, initial=200)
    assert a.on_throttle(started_at=-1.0)  # the first 429 of a burst: x0.7
    assert a.value == 140
    # the other rejections stream back while the accepted requests stay out
    for still_out in range(150, 39, -1):
        a.clamp(still_out)
    assert a.value == 40 and not a.slow_start
    assert not a.clamp(45)  # never raises the limit
    a.clamp(0)
    assert a.value == 1  # never below 1


def test_gate_hands_freed_slots_round_robin_between_tenants() -> None:
    """Two batches share one gate (hfbatch serve): A queued 6 waiters first, B 2; slots alternate A, B, A, B,
    then A's rest, instead of B waiting behind all of A."""
    order: list[str] = []

    async def scenario() -> None:
        gate = Gate(1)
        await gate.acquire("holder")

        async def one(tenant: str) -> None:
            await gate.acquire(tenant)
            order.append(tenant)
            gate.release()

        tasks = [asyncio.create_task(one("A")) for _ in range(6)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(one("B")) for _ in range(2)]
        await asyncio.sleep(0)
        assert gate.waiting == 8
        gate.release()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert order == ["A", "B", "A", "B", "A", "A", "A", "A"]


def test_a_cancelled_waiter_leaves_no_empty_tenant_queue() -> None:
    async def scenario() -> None:
        gate = Gate(1)
        await gate.acquire()
        t = asyncio.create_task(gate.acquire("X"))
        await asyncio.sleep(0)
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        assert gate.waiting == 0
        gate.release()
        await gate.acquire("Y")  # the fast path again: nothing queued
        assert gate.active == 1

    asyncio.run(scenario())
