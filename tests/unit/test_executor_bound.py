"""kill -9 re-sends at most -c requests: at every moment, requests answered by the provider whose line has
not reached the file, plus requests in flight, are at most -c.

The executor runs against the in-memory transport (answers after one or two loop steps) and a sink whose
target records what reached the "disk"; the invariant is checked at every send."""

from __future__ import annotations

import asyncio

from hfbatch.executor import Executor, Limits
from hfbatch.limits import StopControl
from hfbatch.retry import RetryPolicy
from hfbatch.routing import Router
from hfbatch.summary import Stats
from hfbatch.testing.harness import MemoryTarget, chat_requests
from hfbatch.testing.transport import Call, MemoryTransport, Reply
from hfbatch.writer import Answers, JsonlSink


def test_answers_reach_the_file_before_their_slot_is_reused() -> None:
    c = 8
    disk = MemoryTarget()
    answered = worst = 0

    async def provider(call: Call) -> Reply:
        nonlocal answered, worst
        unsaved = answered - bytes(disk.data).count(b"\n")  # answered, no line on disk: a kill -9 re-sends them
        worst = max(worst, unsaved + transport.in_flight)
        for _ in range(1 + call.n % 2):
            await asyncio.sleep(0)
        answered += 1
        return Reply.ok()

    transport = MemoryTransport(provider)

    async def run() -> None:
        out, stats = JsonlSink(disk), Stats()
        ex = Executor(transport=transport, router=Router("http://x/v1"), policy=RetryPolicy(),
                      answers=Answers(out, JsonlSink(MemoryTarget()), stats), stats=stats, stop=StopControl(),
                      limits=Limits(concurrency=c, adapt=False))
        await ex.run(chat_requests(500))
        out.close()

    asyncio.run(run())
    assert len(disk.lines()) == 500
    assert worst <= c, f"a kill -9 at the worst moment would re-send {worst} requests (-c {c})"
