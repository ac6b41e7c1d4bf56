"""Adaptive concurrency against hidden limits (issue: within 10% of a provider's hidden limit, and no collapse
when 429s are not about us), through the seams: the real executor on the virtual-time loop with scripted
in-memory providers that behave as the referee's mock does. Every figure is exact and repeatable; none
depends on this machine's speed. bench/adaptive.py prints the same cases; bench/hidden_cap.py measures them
end to end.

Then the controller's rules one by one, with a hand-driven clock."""

from __future__ import annotations

from typing import Any

import pytest

from hfbatch.adaptive import AdaptiveLimit
from hfbatch.executor import Limits
from hfbatch.retry import RetryPolicy
from hfbatch.testing.clock import run_virtual
from hfbatch.testing.harness import Result, chat_requests, execute
from hfbatch.testing.transport import DoorFaults, Faults, HiddenCap, MemoryTransport, RateCap, Steady


def simulate(provider: Any, n: int, concurrency: int, start: int, adapt: bool = True,
             seed: int = 0) -> tuple[Result, MemoryTransport]:
    transport = MemoryTransport(provider)
    result = run_virtual(execute(chat_requests(n), transport, Limits(concurrency=concurrency, start=start,
                                                                     adapt=adapt),
                                 policy=RetryPolicy(), seed=seed))
    assert len(result.lines) + len(result.errors) == n  # every request ended, once
    return result, transport


# ------------------------------------------------------------------ the cases


@pytest.mark.simulation
@pytest.mark.parametrize(("where", "start"), [("your server (starts at -c)", 200), ("the router (slow start)", 64)])
def test_a_hidden_in_flight_cap(where: str, start: int) -> None:
    """At most 40 in flight, 429 at arrival above it (Retry-After: 1); 100 ms; -c 200: ideal 10.0 s."""
    cap = HiddenCap(limit=40, latency=0.1, retry_after=1.0)
    result, transport = simulate(cap, 4000, 200, start)
    assert 10.0 / result.elapsed >= 0.9, result.elapsed
    assert transport.posts <= 1.3 * 4000, transport.posts
    assert result.executor.concurrency_now() == {"fake": 40}  # converged on the cap, exactly
    assert result.executor.pace_now() == {}  # a cap, not a rate
    assert transport.max_in_flight <= 200


@pytest.mark.simulation
def test_a_cap_that_moves() -> None:
    """40 in flight, then 80 after 4 s, then 20 after 8 s: ideal 14.0 s for 6,000 requests."""
    cap = HiddenCap(limit=40, latency=0.1, retry_after=1.0, schedule=[(0, 40), (4, 80), (8, 20)])
    result, transport = simulate(cap, 6000, 200, 200)
    assert 14.0 / result.elapsed >= 0.9, result.elapsed
    assert transport.posts <= 1.3 * 6000
    assert result.executor.concurrency_now() == {"fake": 20}
    # it found the move up: some second between 5 and 8 s was served at about 80 in flight
    per_second = [sum(1 for c in transport.calls if s <= c.at < s + 1) for s in range(16)]
    assert max(per_second[5:8]) >= 0.9 * 800, per_second


@pytest.mark.simulation
@pytest.mark.parametrize(("schedule", "n", "start"), [([], 4000, 200), ([], 4000, 64),
                                                       ([(0, 40), (4, 80), (8, 20)], 6000, 200)])
def test_a_hidden_cap_over_a_network(schedule: list[tuple[float, int]], n: int, start: int) -> None:
    """The same caps with up to 2 ms each way (requests overtake each other, answers are on their way back after
    the provider counted them done): what it holds and what we count out differ by a few. Seen end to end, a
    limit that trusted one request's count took the noise for a rate (and paced at the cap's throughput, so a
    cap lifted to 80 was never found) or for the cap moving up (a storm at each false probe): 0.63 of the ideal."""
    cap = HiddenCap(limit=40, latency=0.1, retry_after=1.0, schedule=schedule, door=0.002, trip=0.002)
    result, transport = simulate(cap, n, 200, start)
    ideal = 14.0 if schedule else 10.0
    # (The moving cap loses a little more here: each move is found a round trip or two later through the noise.)
    assert ideal / result.elapsed >= (0.85 if schedule else 0.9), result.elapsed
    assert transport.posts <= 1.3 * n, transport.posts
    assert result.executor.concurrency_now() == {"fake": schedule[-1][1] if schedule else 40}


@pytest.mark.simulation
def test_a_cap_over_a_slower_network_is_not_taken_for_a_rate() -> None:
    """Seen end to end (one run in three, -c 200 against a cap of 40): the first refusals come before a whole round
    trip was served, so what the provider serves at once is not known yet and they could not be told to be at the
    top; in the first second every send leaves with more accepted than any before (the run is starting), so they
    looked like a rate's refusals, and a round trip later sends were paced at ~120-180/s for the rest of the run
    (0.5-0.65 of the ideal). Judged a round trip later, a refusal that left with what the provider serves at once
    out is a cap's, whatever the trailing count said. Here: up to 10 ms each way, refusals in up to 10 ms."""
    cap = HiddenCap(limit=40, latency=0.1, retry_after=1.0, door=0.01, trip=0.01, seed=3)
    result, transport = simulate(cap, 4000, 200, 200)
    assert result.executor.pace_now() == {}  # a cap, not a rate
    assert result.executor.concurrency_now() == {"fake": 40}
    assert 10.0 / result.elapsed >= 0.85, result.elapsed  # (10 ms each way costs what it costs: see above 0.9)
    assert transport.posts <= 1.3 * 4000, transport.posts


@pytest.mark.simulation
@pytest.mark.parametrize("door", [0.0005, 0.002])
def test_a_hidden_rate_limit_is_paced_not_hammered(door: float) -> None:
    """At most 300 requests per second (429 at arrival, no Retry-After): a rate, not a concurrency. The
    answers show it (refused when more had been sent in the last second than before any success) and sends
    are paced under it: ideal 13.3 s, few refusals. (With refusals that take 2 ms, as on loopback: refused at
    every level once the second's budget is spent, which once cut the limit to 1, a cap's remedy.)"""
    provider = RateCap(rps=300, latency=0.1, door=door)
    result, transport = simulate(provider, 4000, 200, 200)
    assert (4000 / 300) / result.elapsed >= 0.9, result.elapsed
    assert transport.posts <= 1.3 * 4000, provider.throttled
    adaptive = result.executor.capacity.providers["fake"].adaptive
    assert adaptive is not None and adaptive.rate is not None and 250 <= adaptive.rate <= 310, adaptive.rate
    assert result.executor.pace_now() == {"fake": round(adaptive.rate, 1)}  # the Batch object's pace_rps


@pytest.mark.simulation
def test_a_rate_limit_is_not_taken_for_background_refusals_when_refusals_take_time_to_come_back() -> None:
    """Seen end to end (2 runs in 5): with refusals taking 10-30 ms to come back (loopback under load), a cut on
    a rate limit's storm was judged on the next few answers, which the provider still refused (it counts the
    last second, sends from before the cut included), so backing off "did not help": the refusals were learned
    as background, nothing moved again, and the run sent 2-3x its lines (one run 7x). A verdict of "backing off
    did not help" is given again on the requests sent a second after the cut."""
    provider = RateCap(rps=300, latency=0.1, door=0.01)
    result, transport = simulate(provider, 4000, 200, 200)
    adaptive = result.executor.capacity.providers["fake"].adaptive
    assert adaptive is not None and adaptive.background == 0.0
    assert transport.posts <= 1.3 * 4000, transport.posts
    assert 0.9 * 300 <= result.executor.pace_now()["fake"] <= 300  # paced just under the rate
    assert (4000 / 300) / result.elapsed >= 0.9, result.elapsed


@pytest.mark.simulation
def test_load_blind_429s_do_not_shrink_the_limit() -> None:
    """15% of answers a 429 after the work (Retry-After: 1), whatever our load: backing off would not lower
    that rate. As fast as a fixed pool (--no-adapt), and the limit stays at -c."""
    adaptive, _ = simulate(Faults(latency=0.02, fail_429=0.15, retry_after=1.0), 2000, 128, 128)
    fixed, _ = simulate(Faults(latency=0.02, fail_429=0.15, retry_after=1.0), 2000, 128, 128, adapt=False)
    assert adaptive.elapsed <= 1.2 * fixed.elapsed, (adaptive.elapsed, fixed.elapsed)
    assert adaptive.executor.concurrency_now() == {"fake": 128}


@pytest.mark.simulation
def test_the_fault_mix_the_readme_promises_to_survive() -> None:
    """15% 429, 3% 500, 1% hang (5 s timeout), 2% reset, 2% garbage: no collapse (was 13.6x --no-adapt)."""

    def faults() -> Faults:
        return Faults(latency=0.02, fail_429=0.15, fail_500=0.03, hang=0.01, reset=0.02, garbage=0.02,
                      retry_after=1.0, timeout=5.0)

    adaptive, _ = simulate(faults(), 2000, 128, 128)
    fixed, _ = simulate(faults(), 2000, 128, 128, adapt=False)
    assert adaptive.elapsed <= 1.2 * fixed.elapsed, (adaptive.elapsed, fixed.elapsed)
    # (Both runs end on Retry-After and timeout tails: the limit itself says there was no collapse.)
    assert adaptive.executor.concurrency_now()["fake"] >= 0.8 * 128


@pytest.mark.simulation
def test_without_a_limit_slow_start_reaches_c() -> None:
    """No limit at all: 5,000 requests at 200 ms and -c 512 from the router's start (64). Slow start doubles
    each round trip, so 64 -> 512 costs three round trips at most (0.6 s) over n x 0.2 / 512 at -c all along
    (at 20,000 requests that is 0.93 of the ideal; bench (a) measures it end to end)."""
    result, transport = simulate(Steady(latency=0.2), 5000, 512, 64)
    assert result.elapsed - 5000 * 0.2 / 512 <= 3 * 0.2, result.elapsed
    assert transport.max_in_flight == 512 and transport.posts == 5000


def test_one_throttling_provider_does_not_slow_another() -> None:
    """Per provider: a cap on provider a (pinned by suffix) leaves provider b at -c."""
    import asyncio

    from hfbatch.models import Request
    from hfbatch.testing.transport import Call, Reply

    a_cap = HiddenCap(limit=5, latency=0.1)

    async def two(call: Call) -> Reply:
        if call.body["model"].endswith(":a"):
            reply = await a_cap(call)
            return Reply(reply.status, reply.body, provider="a", retry_after=reply.retry_after)
        await asyncio.sleep(0.1)
        return Reply.ok(provider="b")

    reqs = [Request(i, f"r{i}", "/v1/chat/completions", {"model": f"m:{'a' if i % 2 else 'b'}",
                                                         "messages": [{"role": "user", "content": str(i)}]},
                    f"m:{'a' if i % 2 else 'b'}") for i in range(600)]
    transport = MemoryTransport(two)
    result = run_virtual(execute(reqs, transport, Limits(concurrency=32, start=32), policy=RetryPolicy()))
    assert result.executor.concurrency_now() == {"a": 5, "b": 32}


# ------------------------------------------------------------------ the rules, one by one


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def served(a: AdaptiveLimit, clock: Clock, level: int, latency: float = 0.1, **kw: Any) -> bool:
    ticket = a.sent(clock.t - latency, level)
    return a.served(ticket, latency=latency, limited=kw.get("limited", True), growing=kw.get("growing", True))


def warm(a: AdaptiveLimit, clock: Clock, n: int) -> None:
    """A round trip of n answers served before clock.t = 0.1 (what the provider serves at once is known only
    after a whole round trip of answers)."""
    clock.t = 0.0
    for level in range(n):
        served(a, clock, level)
    clock.t = 0.1


def refused(a: AdaptiveLimit, clock: Clock, level: int, in_flight: int, latency: float = 0.0) -> bool:
    ticket = a.sent(clock.t - latency, level)
    return a.throttled(ticket, latency=latency, in_flight=in_flight, limited=True)


def test_a_refusal_at_the_door_at_the_top_cuts_to_what_the_provider_serves_at_once() -> None:
    """40 served in the last round trip; one refused at once with 40 of ours out: a cap of 40."""
    clock = Clock()
    a = AdaptiveLimit(200, initial=200, clock=clock)
    warm(a, clock, 40)
    for level in range(40):
        served(a, clock, level)
    assert refused(a, clock, level=40, in_flight=40)  # the 41st in flight: refused at once
    assert a.value == 40 and a.ceiling == 40


def test_a_refusal_after_the_work_never_shrinks_the_limit() -> None:
    clock = Clock()
    a = AdaptiveLimit(128, initial=128, clock=clock)
    clock.t = 1.0
    served(a, clock, level=10, latency=0.02)
    for level in range(200):  # as slow as a served request: the provider worked on it
        assert not refused(a, clock, level=level, in_flight=level, latency=0.02)
    assert a.value == 128 and a.later_refusals == 200 and a.door_refusals == 0


@pytest.mark.simulation
def test_refusals_at_the_door_that_do_not_track_our_load_do_not_collapse_the_limit() -> None:
    """15% refused at once (as a provider's other tenants would cause), at any load: neither our
    concurrency nor our rate explains them. No collapse: within 1.2x a fixed pool, the limit near -c. (A refusal
    takes 2 ms to come back, as on loopback under load.)"""
    adaptive, _ = simulate(DoorFaults(share=0.15, latency=0.1, door=0.002), 2000, 128, 128)
    fixed, _ = simulate(DoorFaults(share=0.15, latency=0.1, door=0.002), 2000, 128, 128, adapt=False)
    assert adaptive.elapsed <= 1.2 * fixed.elapsed, (adaptive.elapsed, fixed.elapsed)
    assert adaptive.executor.concurrency_now()["fake"] >= 0.8 * 128


def test_a_refused_probe_is_not_a_storm_a_cut_on_it_is_never_undone() -> None:
    """Seen end to end against the referee's mock: a probe refused (one refusal among 40 answers) made a trial of
    the cut; one more refusal among the next few answers (a request that left at 39 but reached the provider
    after others sent later, on another connection) "undid" it: the limit went back above the cap and the
    refusals were taken for background noise, so a storm of them went unchecked (3,700 extra requests)."""
    clock = Clock()
    a = AdaptiveLimit(200, initial=200, clock=clock)
    warm(a, clock, 40)
    for level in range(40):
        served(a, clock, level)
    assert refused(a, clock, level=40, in_flight=40) and a.value == 40
    clock.t = 0.2  # the next round trip: 40 served, and one that left at 39 refused (overtaken on the way)
    for level in range(40):
        served(a, clock, level)
    refused(a, clock, level=39, in_flight=40)
    clock.t = 0.4
    for level in range(40):
        served(a, clock, level, latency=0.05, limited=False)
    assert a.background == 0.0 and a.value == 40, (a.background, a.value)


def test_a_provider_refusing_most_of_what_we_send_is_never_taken_for_background_noise() -> None:
    """Seen end to end (a rate limit): a cut that did not stop the refusals at once was undone and all of them
    (100 %) became the "background" share, below which nothing ever moved the limit again."""
    clock = Clock()
    a = AdaptiveLimit(200, initial=200, clock=clock)
    warm(a, clock, 50)
    for level in range(50):
        served(a, clock, level)
    for _ in range(10):  # refused at the top: cut to what it serves at once
        refused(a, clock, level=60, in_flight=49)
    assert a.limit == 50
    clock.t = 0.25
    for level in range(10, 40):  # sent since the cut, below it: nearly all refused even so
        if level % 10:
            refused(a, clock, level=level, in_flight=level)
        else:
            served(a, clock, level, latency=0.05)
    clock.t = 0.4
    served(a, clock, 10)
    assert a.background == 0.0, a.background


def test_the_storm_guard_lifts_at_the_first_answer_served() -> None:
    """Two refusals in a row hold the sends to what is out; the first answer served lifts the hold, and says
    so (the gate only moves when told: a lift unsaid within HOLD of a cut kept the gate at the held level)."""
    clock = Clock()
    a = AdaptiveLimit(200, initial=200, clock=clock)
    warm(a, clock, 40)
    for level in range(40):
        served(a, clock, level)
    refused(a, clock, level=40, in_flight=39)
    refused(a, clock, level=40, in_flight=30)
    assert a.limit == 40 and a.value == 30  # held at what is out
    clock.t = 0.2  # within HOLD of the cut: no probe, but the hold lifts
    assert served(a, clock, level=30) and a.value == 40


def test_probing_waits_for_hold_after_a_cut_and_only_while_requests_wait() -> None:
    clock = Clock()
    a = AdaptiveLimit(200, initial=200, clock=clock)
    warm(a, clock, 40)
    for level in range(40):
        served(a, clock, level)
    refused(a, clock, level=40, in_flight=40)
    assert a.value == 40
    clock.t = 0.3
    assert not served(a, clock, level=39)  # within HOLD of the cut: no probe
    clock.t = 0.7
    assert not served(a, clock, level=39, limited=False)  # nothing waits for the limit: no probe
    assert not served(a, clock, level=39, growing=False)  # the last requests drain: no probe
    assert served(a, clock, level=39) and a.value == 41  # a probe: one above the ceiling


def test_served_above_the_ceiling_forgets_it_and_grows_faster_each_round() -> None:
    clock = Clock()
    a = AdaptiveLimit(200, initial=200, clock=clock)
    warm(a, clock, 40)
    for level in range(40):
        served(a, clock, level)
    refused(a, clock, level=40, in_flight=40)
    clock.t = 1.0
    for level in range(40):  # a round trip at the cap; a probe to 41
        served(a, clock, level)
    assert a.value == 41
    served(a, clock, level=40)  # 41 served in a round trip: more than the ceiling, the cap moved up
    assert a.ceiling is None
    values = []
    for r in range(6):
        clock.t = 1.1 + 0.1 * r
        for level in range(a.value):
            served(a, clock, level)
        values.append(a.value)
    assert values[-1] >= 80, values  # from 41 past 80 in six round trips
