"""Run the executor on requests in memory: in-memory files (MemoryTarget), an in-memory transport, and on
the virtual-time loop the whole run takes no wall time. For unit tests of the executor's policies and for
simulations (bench/hidden_cap.py's in-memory mode).

    result = run_virtual(execute(requests(100), MemoryTransport(Steady(0.1)), Limits(concurrency=8)))
    result.elapsed, result.lines, result.stats.retries
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from ..executor import Executor, Limits, RunHooks
from ..fingerprints import RepeatFinder, canonical_request, request_fingerprint
from ..http.base import Transport
from ..limits import Capacity, StopControl
from ..models import Request
from ..retry import RetryPolicy
from ..routing import Router
from ..summary import Stats
from ..writer import Answers, JsonlSink


class MemoryTarget:
    """A JsonlSink target that keeps the lines in memory."""

    name = "memory"

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: memoryview) -> int:
        self.data += data
        return len(data)

    def sync(self) -> None:
        pass

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(raw) for raw in bytes(self.data).splitlines()]


def chat_requests(n: int, model: str = "org/model", prefix: str = "r", url: str = "/v1/chat/completions",
                  **body: Any) -> list[Request]:
    """n distinct chat requests (custom_ids r0, r1, ...)."""
    return [Request(i + 1, f"{prefix}{i}", url, {"model": model, "messages": [{"role": "user", "content": f"m{i}"}],
                                                  **body}, model) for i in range(n)]


def duplicates(requests: Iterable[Request]) -> dict[int, int]:
    """The dedupe groups of these requests, as the input scan finds them (plan.scan_input)."""
    finder = RepeatFinder()
    for r in requests:
        finder.add(request_fingerprint(canonical_request(r.url, r.body)))
    return finder.repeats()


@dataclass
class Result:
    lines: list[dict[str, Any]]  # the output file
    errors: list[dict[str, Any]]  # the error file
    stats: Stats
    stop: StopControl
    executor: Executor
    elapsed: float  # loop seconds (virtual on the virtual-time loop)

    def answered(self) -> list[str]:
        return [o["custom_id"] for o in self.lines + self.errors]


async def execute(requests: list[Request], transport: Transport, limits: Limits, *,
                  hooks: RunHooks | None = None, policy: RetryPolicy | None = None, router: Router | None = None,
                  dedupe: bool = False, capacity: Capacity | None = None,
                  stop: StopControl | None = None, seed: int = 0) -> Result:
    """Run the executor over `requests` to the end (or its stop) and read back what it wrote."""
    out, err = MemoryTarget(), MemoryTarget()
    stats = Stats(total=len(requests))
    stop = stop or StopControl()
    sink_out, sink_err = JsonlSink(out), JsonlSink(err)
    loop = asyncio.get_running_loop()
    executor = Executor(
        transport=transport, router=router or Router("http://provider.test/v1"),
        answers=Answers(sink_out, sink_err, stats),
        stats=stats, stop=stop, limits=limits, policy=policy or RetryPolicy(base=0.5), capacity=capacity,
        dedupe_keys=duplicates(requests) if dedupe else None, hooks=hooks, rand=random.Random(seed).random,
    )
    started = loop.time()
    await executor.run(requests)
    elapsed = loop.time() - started
    sink_out.close()
    sink_err.close()
    return Result(out.lines(), err.lines(), stats, stop, executor, elapsed)
