"""kill -9 re-sends at most -c requests: at every moment, requests answered by the provider whose line has
not reached the file, plus requests in flight, are at most -c.

The executor runs against an in-memory transport (answers after one loop iteration) and sinks whose
target records what reached the "disk"; the invariant is checked at every send."""

from __future__ import annotations

import asyncio

import orjson

from hfbatch.executor import Executor, Limits
from hfbatch.limits import StopControl
from hfbatch.models import Outcome, Request
from hfbatch.retry import RetryPolicy
from hfbatch.routing import Router
from hfbatch.summary import Stats
from hfbatch.writer import Answers, JsonlSink

BODY = orjson.dumps({"object": "chat.completion", "usage": {"prompt_tokens": 1, "completion_tokens": 1}})


class Disk:
    name = "out.jsonl"

    def __init__(self) -> None:
        self.lines = 0

    def write(self, data: memoryview) -> int:
        self.lines += bytes(data).count(b"\n")
        return len(data)

    def sync(self) -> None:
        pass

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


class Provider:
    """Answers every POST after a loop iteration or two; counts what a crash right now would re-send."""

    def __init__(self, disk: Disk, limit: int) -> None:
        self.disk, self.limit = disk, limit
        self.answered = self.in_flight = self.worst = 0

    async def post(self, url: str, data: bytes) -> Outcome:
        unsaved = self.answered - self.disk.lines  # answered, but no line on disk: a kill -9 re-sends them
        self.worst = max(self.worst, unsaved + self.in_flight + 1)
        self.in_flight += 1
        for _ in range(1 + len(data) % 2):
            await asyncio.sleep(0)
        self.in_flight -= 1
        self.answered += 1
        return Outcome(200, BODY, orjson.loads(BODY), "req", "p")


def test_answers_reach_the_file_before_their_slot_is_reused() -> None:
    c = 8
    disk = Disk()
    provider = Provider(disk, c)

    async def run() -> None:
        out = JsonlSink(disk)
        err = JsonlSink(Disk())
        stats = Stats()
        ex = Executor(transport=provider, router=Router("http://x/v1"), policy=RetryPolicy(),
                      answers=Answers(out, err, stats), stats=stats, stop=StopControl(),
                      limits=Limits(concurrency=c, adapt=False))
        reqs = [Request(i, f"r{i}", "/v1/chat/completions", {"model": "m", "n": i}, "m") for i in range(500)]
        await ex.run(reqs)
        out.close()

    asyncio.run(run())
    assert disk.lines == 500
    assert provider.worst <= c, f"a kill -9 at the worst moment would re-send {provider.worst} requests (-c {c})"
