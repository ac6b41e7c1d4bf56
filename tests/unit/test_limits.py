"""limits: RateBucket (RPM/TPM pacing), Gate (a semaphore whose limit moves, fair between tenants).

Pure and clock-injected: no test here sleeps; time is a number the test advances.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from hfbatch.limits import Gate, RateBucket


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


def test_the_pace_never_asks_for_a_wait_shorter_than_a_microsecond() -> None:
    """Seen on the virtual clock: a wait of 1e-17 s (a rounding error between the bucket's booking and the
    clock) is shorter than the loop's timer resolution, so sleeping it did not move the clock and the pacer
    asked again for ever (on a real clock: a busy loop until time moved). Such a wait is none."""
    from hfbatch.limits import ProviderLimit

    clock = Clock(5.0)
    provider = ProviderLimit(10, adapt=True, start=10, clock=clock)
    assert provider.adaptive is not None
    provider.adaptive.rate = 10.0
    assert provider.pace() == 0.0
    provider.paced_send()  # the next unit is free at 5.1
    clock.t = 5.1 - 1e-12
    assert provider.pace() == 0.0
    clock.t = 5.05
    assert provider.pace() == pytest.approx(0.05)
