#!/usr/bin/env python3
"""Adaptive concurrency against hidden limits, simulated: the real executor on the virtual-time loop with the
in-memory transport's scripted providers (hfbatch.testing). Exact and repeatable, and it runs in seconds;
bench/hidden_cap.py measures the same cases end to end against the referee's mock.

Each case mirrors the referee's behaviour (shared/referee/mock_provider.js): a concurrency cap answers 429
at arrival (Retry-After: 1), MAX_RPS answers 429 at arrival (no Retry-After), FAIL_429 answers 429 after
the latency (Retry-After: 1).

    .venv/bin/python bench/adaptive.py [case ...]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hfbatch.executor import Limits
from hfbatch.retry import RetryPolicy
from hfbatch.testing.clock import run_virtual
from hfbatch.testing.harness import Result, chat_requests, execute
from hfbatch.testing.transport import Faults, HiddenCap, MemoryTransport, RateCap, Steady

DOOR = 0.002  # seconds a refusal at the door takes to come back (loopback measured ~1 ms, up to ~15 under load)


@dataclass
class Case:
    name: str
    n: int
    concurrency: int
    start: int  # -c with --base-url (your server); 64 on the router
    provider: Callable[[], Any]
    ideal: float | None  # seconds, from the limit; None: compared with --no-adapt instead
    timeout: float = 300.0


CASES = [
    Case("cap40", 4000, 200, 200, lambda: HiddenCap(limit=40, latency=0.1, retry_after=1.0, door=DOOR), 10.0),
    Case("cap40-router", 4000, 200, 64, lambda: HiddenCap(limit=40, latency=0.1, retry_after=1.0, door=DOOR),
         10.0),
    Case("moving", 6000, 200, 200,
         lambda: HiddenCap(limit=40, latency=0.1, retry_after=1.0, schedule=[(0, 40), (4, 80), (8, 20)], door=DOOR),
         14.0),
    Case("rps300", 4000, 200, 200, lambda: RateCap(rps=300, latency=0.1, door=DOOR), 4000 / 300),
    Case("blind429", 4000, 128, 128, lambda: Faults(latency=0.02, fail_429=0.15, retry_after=1.0), None),
    Case("faultmix", 4000, 128, 128, lambda: Faults(latency=0.02, fail_429=0.15, fail_500=0.03, hang=0.01,
                                                       reset=0.02, garbage=0.02, retry_after=1.0, timeout=5.0),
         None, timeout=5.0),
    Case("nolimit", 20000, 512, 64, lambda: Steady(latency=0.2), 20000 * 0.2 / 512),
]


def simulate(case: Case, adapt: bool = True, seed: int = 0) -> tuple[Result, MemoryTransport]:
    transport = MemoryTransport(case.provider())
    limits = Limits(concurrency=case.concurrency, start=case.start, adapt=adapt)
    result = run_virtual(execute(chat_requests(case.n), transport, limits, policy=RetryPolicy(), seed=seed))
    return result, transport


def report(case: Case) -> dict[str, Any]:
    t0 = time.perf_counter()
    result, transport = simulate(case)
    answered = len(result.lines) + len(result.errors)
    row: dict[str, Any] = {"case": case.name, "elapsed": round(result.elapsed, 2), "answered": answered,
                           "extra": round(transport.posts / case.n - 1, 3),
                           "limit": result.executor.concurrency_now()}
    if case.ideal is not None:
        row["share_of_ideal"] = round(case.ideal / result.elapsed, 3)
    else:
        fixed, _ = simulate(case, adapt=False)
        row["no_adapt_elapsed"] = round(fixed.elapsed, 2)
        row["vs_no_adapt"] = round(result.elapsed / fixed.elapsed, 2)
    row["sim_seconds"] = round(time.perf_counter() - t0, 2)
    return row


def main(argv: list[str]) -> None:
    names = set(argv) or {c.name for c in CASES}
    for case in CASES:
        if case.name in names:
            print(report(case), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
