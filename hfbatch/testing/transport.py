"""An in-memory Transport and scripted providers, for unit tests of the executor's policies (as httpx's
MockTransport): no socket, the answer built by a handler that may sleep on the loop's clock. With the
virtual-time loop (testing.clock) a scenario of thousands of requests at 100 ms each runs in milliseconds,
exactly the same way every time.

    provider = HiddenCap(limit=40, latency=0.1)
    transport = MemoryTransport(provider)
    ... Executor(transport=transport, ...)
    transport.max_in_flight, transport.posts, provider.throttled
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..http.base import Transport
from ..models import Outcome


@dataclass(frozen=True, slots=True)
class Call:
    """One POST as the provider sees it."""

    n: int  # 1-based arrival number
    url: str
    body: dict[str, Any]
    at: float  # loop time of arrival


@dataclass(frozen=True, slots=True)
class Reply:
    """What the provider answers: a status and a JSON body (or raw bytes), or no answer (`error`)."""

    status: int | None = 200
    body: Any = None
    raw: bytes | None = None
    provider: str | None = "fake"
    retry_after: float | None = None
    error: str | None = None  # request_timeout | connection_error: no HTTP answer

    @staticmethod
    def ok(body: dict[str, Any] | None = None, provider: str | None = "fake") -> Reply:
        return Reply(200, body if body is not None else chat_body(), provider=provider)

    @staticmethod
    def throttle(retry_after: float | None = None, provider: str | None = "fake") -> Reply:
        return Reply(429, {"error": {"message": "rate limited", "type": "rate_limit_error", "param": None,
                                     "code": "rate_limit_exceeded"}}, provider=provider, retry_after=retry_after)

    @staticmethod
    def status_only(status: int, provider: str | None = "fake") -> Reply:
        return Reply(status, {"error": {"message": f"HTTP {status}", "type": "server_error" if status >= 500
                                        else "invalid_request_error", "param": None, "code": None}},
                     provider=provider)


def chat_body(prompt_tokens: int = 10, completion_tokens: int = 5) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


Handler = Callable[[Call], Awaitable[Reply]]


class MemoryTransport:
    """A Transport whose POSTs are answered by `handler`; it counts what a provider would see."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __aenter__(self) -> MemoryTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    @property
    def posts(self) -> int:
        return len(self.calls)

    async def post(self, url: str, data: bytes) -> Outcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        call = Call(len(self.calls) + 1, url, orjson.loads(data), started)
        self.calls.append(call)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = await self.handler(call)
        finally:
            self.in_flight -= 1
        latency = loop.time() - started
        if reply.error is not None:
            return Outcome(None, latency=latency, error_code=reply.error, error_message=f"{reply.error} (scripted)")
        raw = reply.raw if reply.raw is not None else orjson.dumps(reply.body)
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        return Outcome(reply.status, raw, parsed, f"req_{call.n}", reply.provider,
                       reply.retry_after if reply.status is not None and reply.status >= 400 else None, latency)

    async def get_json(self, url: str) -> Any:
        raise OSError(f"no catalog in memory ({url})")

    async def prewarm(self, url: str, n: int) -> None:
        pass


# -- scripted providers -----------------------------------------------------------------------------------


@dataclass
class Steady:
    """Answers every request after `latency` seconds; never throttles."""

    latency: float = 0.1
    reply: Reply = field(default_factory=Reply.ok)

    async def __call__(self, call: Call) -> Reply:
        await asyncio.sleep(self.latency)
        return self.reply


@dataclass
class HiddenCap:
    """A provider with an unpublished limit on requests in flight: above it, 429 at arrival (no wait).
    `schedule` moves the limit: [(seconds since the first request, limit), ...]."""

    limit: int = 40
    latency: float = 0.1
    schedule: list[tuple[float, int]] = field(default_factory=list)
    retry_after: float | None = None
    door: float = 0.0  # seconds a refusal takes to come back (a loopback provider: about a millisecond)
    in_flight: int = 0
    throttled: int = 0
    served: int = 0
    _start: float | None = None

    def current_limit(self, now: float) -> int:
        if self._start is None:
            self._start = now
        limit = self.limit
        for at, value in self.schedule:
            if now - self._start >= at:
                limit = value
        return limit

    async def __call__(self, call: Call) -> Reply:
        if self.in_flight >= self.current_limit(call.at):
            self.throttled += 1
            if self.door:
                await asyncio.sleep(self.door)
            return Reply.throttle(self.retry_after)
        self.in_flight += 1
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        self.served += 1
        return Reply.ok()


@dataclass
class RateCap:
    """A provider with an unpublished requests-per-second budget: a request arriving when `rps` requests
    arrived (and were accepted) in the last second gets a 429 at once."""

    rps: float = 300.0
    latency: float = 0.1
    door: float = 0.0  # seconds a refusal takes to come back
    throttled: int = 0
    served: int = 0
    _accepted: list[float] = field(default_factory=list)

    async def __call__(self, call: Call) -> Reply:
        window = [t for t in self._accepted if t > call.at - 1.0]
        self._accepted = window
        if len(window) >= self.rps:
            self.throttled += 1
            if self.door:
                await asyncio.sleep(self.door)
            return Reply.throttle()
        window.append(call.at)
        await asyncio.sleep(self.latency)
        self.served += 1
        return Reply.ok()


@dataclass
class DoorFaults:
    """Refuses a seeded share of requests at once (429 at arrival, Retry-After `retry_after`), whatever our
    load (a provider's other tenants); serves the rest after `latency`."""

    share: float = 0.15
    latency: float = 0.1
    retry_after: float | None = 1.0
    door: float = 0.0  # seconds a refusal takes to come back
    seed: int = 99
    refused: int = 0
    _rng: random.Random | None = None

    async def __call__(self, call: Call) -> Reply:
        if self._rng is None:
            self._rng = random.Random(self.seed)
        if self._rng.random() < self.share:
            self.refused += 1
            if self.door:
                await asyncio.sleep(self.door)
            return Reply.throttle(self.retry_after)
        await asyncio.sleep(self.latency)
        return Reply.ok()


@dataclass
class Faults:
    """Answers after `latency`; a seeded share of answers are faults that do not depend on our load:
    429 (`fail_429`, with Retry-After `retry_after`), 500, a hang until `hang` seconds pass (the caller's
    timeout), a reset (connection_error), a non-JSON 200."""

    latency: float = 0.02
    fail_429: float = 0.0
    fail_500: float = 0.0
    hang: float = 0.0
    reset: float = 0.0
    garbage: float = 0.0
    retry_after: float | None = 1.0
    timeout: float = 5.0
    seed: int = 1234
    counts: dict[str, int] = field(default_factory=dict)
    _rng: random.Random | None = None

    async def __call__(self, call: Call) -> Reply:
        if self._rng is None:
            self._rng = random.Random(self.seed)
        r, acc, kind = self._rng.random(), 0.0, "ok"
        for name, share in (("429", self.fail_429), ("500", self.fail_500), ("hang", self.hang),
                            ("reset", self.reset), ("garbage", self.garbage)):
            acc += share
            if share > 0 and r < acc:
                kind = name
                break
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "hang":
            await asyncio.sleep(self.timeout)
            return Reply(None, error="request_timeout")
        await asyncio.sleep(self.latency)
        if kind == "429":
            return Reply.throttle(self.retry_after)
        if kind == "500":
            return Reply.status_only(500)
        if kind == "reset":
            return Reply(None, error="connection_error")
        if kind == "garbage":
            return Reply(200, raw=b"<html>bad gateway")
        return Reply.ok()


def _conforms(t: MemoryTransport) -> Transport:
    return t  # mypy: MemoryTransport implements the http Transport protocol
