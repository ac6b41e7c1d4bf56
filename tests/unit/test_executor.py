"""The executor's policies through its seams: an in-memory Transport (scripted providers) on the virtual-time
loop (hfbatch.testing). No socket, no sleeping, no wall clock: every figure below is exact and repeatable.

AIMD (decrease, clamp, slow start, where it starts), dedupe, fallback, budget, 401/402 stops, Retry-After,
--rpm pacing, coalescing, timeouts, and a bug in a request's handling."""

from __future__ import annotations

import asyncio
from typing import Any

from hfbatch.cost.pricing import Catalog, Price, ProviderInfo
from hfbatch.cost.spend import Budget, CostLedger
from hfbatch.engines.http import Accounting
from hfbatch.executor import Limits
from hfbatch.limits import StopControl
from hfbatch.models import Request, StopReason
from hfbatch.retry import RetryPolicy
from hfbatch.routing import Router
from hfbatch.testing.clock import run_virtual
from hfbatch.testing.harness import Result, chat_requests, execute
from hfbatch.testing.transport import Call, HiddenCap, MemoryTransport, Reply, Steady


def run(requests: list[Request], handler: Any, limits: Limits, **kw: Any) -> tuple[Result, MemoryTransport]:
    transport = MemoryTransport(handler)
    return run_virtual(execute(requests, transport, limits, **kw)), transport


# ------------------------------------------------------------------ adaptive concurrency


def test_aimd_settles_at_a_hidden_in_flight_cap() -> None:
    """A provider that 429s above 40 in flight; -c 200 on your server (AIMD starts at -c): every request
    ends answered, the limit ends near the cap, and the wasted (429) requests stay few."""
    cap = HiddenCap(limit=40, latency=0.1)
    result, transport = run(chat_requests(4000), cap, Limits(concurrency=200, start=200),
                            policy=RetryPolicy(max_attempts=20, base=0.05))
    assert len(result.lines) == 4000 and not result.errors
    limit = result.executor.concurrency_now()["fake"]
    assert 20 <= limit <= 45, limit
    assert cap.throttled <= 0.3 * 4000, cap.throttled
    ideal = 4000 * 0.1 / 40
    assert result.elapsed <= 1.6 * ideal, (result.elapsed, ideal)  # issue 16 raises this bar


def test_the_clamp_drops_the_limit_to_what_the_provider_kept_in_flight() -> None:
    """The first wave of 200 meets a cap of 40: one round of 429s brings the limit to the cap, not to
    200 x 0.7^k after k rounds."""
    cap = HiddenCap(limit=40, latency=1.0)
    result, _ = run(chat_requests(400), cap, Limits(concurrency=200, start=200),
                    policy=RetryPolicy(max_attempts=50, base=0.01))
    p = result.executor.capacity.providers["auto:org/model"]
    assert p.adaptive is not None and p.adaptive.decreases <= 3
    assert len(result.lines) == 400


def test_slow_start_on_the_router_and_full_concurrency_on_your_own_server() -> None:
    """Router: the first round trip sends at most 64 (providers are shared, their limits unknown), then it
    doubles up to -c. --base-url (start = -c): the first wave is -c."""
    slow = Steady(latency=1.0)
    routed, transport = run(chat_requests(3000), slow, Limits(concurrency=512, start=64))
    first_trip = [c for c in transport.calls if c.at < 1.0]
    assert len(first_trip) == 64
    assert transport.max_in_flight == 512
    assert len(routed.lines) == 3000
    own, transport = run(chat_requests(1000), Steady(latency=1.0), Limits(concurrency=128, start=128))
    assert len([c for c in transport.calls if c.at == 0.0]) == 128


def test_without_adapt_the_limit_is_c() -> None:
    cap = HiddenCap(limit=10, latency=0.1)
    result, _ = run(chat_requests(200), cap, Limits(concurrency=32, adapt=False),
                    policy=RetryPolicy(max_attempts=100, base=0.01))
    assert result.executor.concurrency_now()["fake"] == 32 and len(result.lines) == 200
    _, transport = run(chat_requests(200), Steady(0.1), Limits(concurrency=32, adapt=False, start=4))
    assert transport.max_in_flight == 32


# ------------------------------------------------------------------ fewer requests


def test_identical_requests_are_sent_once_and_every_copy_gets_the_answer() -> None:
    same = [Request(i + 1, f"same{i}", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user",
                                                                  "content": "x"}]}, "m") for i in range(10)]
    other = chat_requests(5, prefix="other")
    result, transport = run(same + other, Steady(0.1), Limits(concurrency=4), dedupe=True)
    assert transport.posts == 6
    assert sorted(result.answered()) == sorted(r.custom_id for r in same + other)
    assert result.stats.deduped == 9 and result.stats.saved_input_tokens == 9 * 10
    bodies = {o["response"]["body"]["id"] for o in result.lines if o["custom_id"].startswith("same")}
    assert len(bodies) == 1


def test_coalesce_packs_single_input_embeddings() -> None:
    async def embed(call: Call) -> Reply:
        inputs = call.body["input"]
        n = len(inputs) if isinstance(inputs, list) else 1
        await asyncio.sleep(0.05)
        return Reply.ok({"object": "list", "model": "e", "usage": {"prompt_tokens": 5 * n, "total_tokens": 5 * n},
                         "data": [{"object": "embedding", "index": i, "embedding": [float(i)]} for i in range(n)]})

    reqs = [Request(i + 1, f"e{i}", "/v1/embeddings", {"model": "e", "input": f"text {i}"}, "e") for i in range(100)]
    result, transport = run(reqs, embed, Limits(concurrency=8, coalesce=16))
    assert transport.posts == 7  # 6 x 16 + 4
    assert len(result.lines) == 100 and result.stats.coalesced == 93
    for o in result.lines:
        body = o["response"]["body"]
        assert [d["index"] for d in body["data"]] == [0] and body["usage"]["prompt_tokens"] == 5


# ------------------------------------------------------------------ retries, fallback, stops


def test_retry_after_is_honoured() -> None:
    tries: dict[str, int] = {}

    async def once_throttled(call: Call) -> Reply:
        cid = call.body["messages"][0]["content"]
        tries[cid] = tries.get(cid, 0) + 1
        return Reply.throttle(retry_after=7.0) if tries[cid] == 1 else Reply.ok()

    result, transport = run(chat_requests(3), once_throttled, Limits(concurrency=3))
    assert len(result.lines) == 3
    firsts = [c.at for c in transport.calls[:3]]
    retries = [c.at for c in transport.calls[3:]]
    assert firsts == [0.0, 0.0, 0.0] and all(t >= 7.0 for t in retries), retries


def test_timeouts_are_retried_then_written_as_request_timeout() -> None:
    async def hang(call: Call) -> Reply:
        await asyncio.sleep(5)
        return Reply(None, error="request_timeout")

    result, transport = run(chat_requests(2), hang, Limits(concurrency=2), policy=RetryPolicy(max_attempts=3))
    assert transport.posts == 6
    assert [e["error"]["code"] for e in result.errors] == ["request_timeout"] * 2


def test_fallback_sends_provider_side_failures_to_the_next_provider() -> None:
    async def a_is_down(call: Call) -> Reply:
        await asyncio.sleep(0.1)
        provider = call.body["model"].rpartition(":")[2]
        return Reply.status_only(503, provider) if provider == "a" else Reply.ok(provider=provider)

    reqs = chat_requests(5, model="org/m:a")
    result, transport = run(reqs, a_is_down, Limits(concurrency=5, fallback=("b",)),
                            policy=RetryPolicy(max_attempts=2, base=0.01))
    assert len(result.lines) == 5 and result.stats.fallbacks == 5
    assert result.stats.providers == {"b": 5}
    assert transport.posts == 15  # two attempts on a, one on b


def test_401_stops_everything_at_once_and_writes_no_line_for_the_rest() -> None:
    async def revoked(call: Call) -> Reply:
        await asyncio.sleep(0.1)
        return Reply.ok() if call.n <= 10 else Reply.status_only(401)

    result, transport = run(chat_requests(100), revoked, Limits(concurrency=4))
    assert result.stop.reason == StopReason.AUTH and result.stop.hard
    assert len(result.lines) == 10 and not result.errors  # no line for a request stopped: a rerun sends it
    assert transport.posts <= 10 + 4


def test_402_stops_dispatching_and_lets_in_flight_requests_finish() -> None:
    async def credits(call: Call) -> Reply:
        await asyncio.sleep(0.1 if call.n != 21 else 0.01)
        return Reply.status_only(402) if call.n == 21 else Reply.ok()

    result, transport = run(chat_requests(100), credits, Limits(concurrency=8))
    assert result.stop.reason == StopReason.CREDITS and not result.stop.hard
    assert transport.posts <= 21 + 8
    assert len(result.lines) == transport.posts - 1  # every other request in flight finished with its line
    assert not result.errors


def test_a_bug_stops_the_run_and_writes_no_line() -> None:
    class Broken(Router):
        async def route(self, req: Request) -> Any:
            if req.custom_id == "r7":
                raise KeyError("boom")
            return await super().route(req)

    result, _ = run(chat_requests(50), Steady(0.1), Limits(concurrency=4), router=Broken("http://x/v1"))
    assert result.stop.reason == StopReason.INTERNAL_ERROR
    assert "r7" not in result.answered() and not result.errors
    assert isinstance(result.executor.internal_errors[0], KeyError)


# ------------------------------------------------------------------ rate limits and budget


def test_rpm_spreads_requests_evenly() -> None:
    """--rpm 600: one request every 0.1 s from the start, no burst at a minute boundary."""
    result, transport = run(chat_requests(30), Steady(0.01), Limits(concurrency=64, rpm=600))
    times = [c.at for c in transport.calls]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(abs(g - 0.1) < 1e-6 for g in gaps[1:]), gaps
    assert len(result.lines) == 30


def test_budget_stops_before_the_spend_could_pass_it() -> None:
    """Each request costs at most 10 input + 512 output tokens at $1/$2 per 1M: the worst case is booked
    before it starts, so the budget is never passed, and the run stops as soon as none fits."""
    catalog = Catalog({"org/model": [ProviderInfo("fake", Price(1.0, 2.0), None, None, "live")]}, "file")
    ledger = CostLedger(catalog)
    stop = StopControl()
    limit = 0.002  # two worst cases do not fit at once; 200 real costs ($0.00002 each) do not fit either
    hooks = Accounting(ledger, stop, server="test", budget=Budget(limit, ledger))
    result, transport = run(chat_requests(200, max_tokens=512), Steady(0.1), Limits(concurrency=8),
                            hooks=hooks, stop=stop)
    assert stop.reason == StopReason.BUDGET
    assert 0 < ledger.spent <= limit
    assert transport.posts == len(result.lines) < 200


def test_a_throttled_provider_does_not_slow_the_others() -> None:
    """Every request pinned to provider a is throttled three times after the work (Retry-After 0.3 s); b never
    is: b keeps -c and finishes first. Those 429s are not about our load (every request meets three, however
    few are out): a's limit does not shrink either, its requests wait their Retry-After."""
    tries: dict[str, int] = {}

    async def two_providers(call: Call) -> Reply:
        provider = call.body["model"].rpartition(":")[2]
        await asyncio.sleep(0.05)
        if provider == "a":
            cid = call.body["messages"][0]["content"]
            tries[cid] = tries.get(cid, 0) + 1
            if tries[cid] <= 3:
                return Reply.throttle(retry_after=0.3, provider="a")
        return Reply.ok(provider=provider)

    reqs = [r for i, r in enumerate(chat_requests(120)) if i % 3]  # 80 for b
    reqs = [Request(r.line_no, "b" + r.custom_id, r.url, {**r.body, "model": "org/m:b"}, "org/m:b") for r in reqs]
    reqs += [Request(i, f"a{i}", "/v1/chat/completions", {"model": "org/m:a", "messages": [{"role": "user",
                                                          "content": f"a{i}"}]}, "org/m:a") for i in range(40)]
    result, _ = run(reqs, two_providers, Limits(concurrency=32), policy=RetryPolicy(max_attempts=6, base=0.01))
    conc = result.executor.concurrency_now()
    assert conc == {"a": 32, "b": 32}, conc
    order = [o["custom_id"][0] for o in result.lines]
    assert order.index("a") == 80, "".join(order)  # every b line is written before the first a line
    assert len(result.lines) == 120


def test_where_the_limit_starts() -> None:
    from hfbatch.engines.http import first_limit

    assert first_limit(512, None) == 64  # the router: shared providers, unknown limits
    assert first_limit(32, None) == 32
    assert first_limit(512, "http://localhost:8000/v1") == 512  # your server: -c is your number


def test_a_bug_while_sending_a_pack_stops_the_run() -> None:
    """The coalescing flush callback used to drop its task's exception: now it is an internal error."""

    class BreaksOnPacks(Router):
        async def route(self, req: Request) -> Any:
            if isinstance(req.body.get("input"), list):
                raise RuntimeError("pack bug")
            return await super().route(req)

    reqs = [Request(i + 1, f"e{i}", "/v1/embeddings", {"model": "e", "input": f"t{i}"}, "e") for i in range(8)]
    result, transport = run(reqs, Steady(0.01), Limits(concurrency=8, coalesce=4), router=BreaksOnPacks("http://x/v1"))
    assert result.stop.reason == StopReason.INTERNAL_ERROR and transport.posts == 0
    assert isinstance(result.executor.internal_errors[0], RuntimeError)
