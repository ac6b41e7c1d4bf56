"""Limits (pure, clock injected): smooth rate buckets (RPM/TPM), AIMD concurrency per provider, slot gates,
and the run's stop control (why and how dispatching stops).

Nothing here sleeps: buckets return how long a caller must wait, AIMD returns the new limit, and
Gate is the only awaitable (a counting semaphore whose limit can change while it is in use).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .models import StopReason


class RateBucket:
    """A virtual-scheduling token bucket: `rate` units per second with a small burst allowance.

    reserve(n) books n units and returns the seconds to wait before using them; requests are
    served in booking order and spread evenly (no burst at minute boundaries). refund(n) gives
    units back (a request that used fewer tokens than booked)."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate * 0.1)
        self._clock = clock
        self._next = clock()  # when the next unit is free

    def reserve(self, amount: float) -> float:
        now = self._clock()
        start = max(self._next, now - self.burst / self.rate)
        self._next = start + amount / self.rate
        # A request may start once the units booked before it are paid for; its own units are
        # a debt that delays the next ones (so a request larger than the burst still runs).
        return max(0.0, start - now)

    def refund(self, amount: float) -> None:
        self._next -= amount / self.rate


class AIMD:
    """Additive-increase / multiplicative-decrease concurrency limit between 1 and `maximum`.

    Starts at min(maximum, `initial`) and doubles per round trip while nothing throttles (slow
    start); the first 429/503 ends slow start. A throttle multiplies the limit by `beta`, at most
    once per round trip: throttles of requests started before the last decrease, or arriving within
    one smoothed round-trip time of it (a 429 comes back at once, while the requests that caused it
    are still in flight), are ignored. After that, each success adds 1/limit (about +1 per round
    trip)."""

    def __init__(self, maximum: int, initial: int = 64, beta: float = 0.7,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = maximum
        self.limit = float(min(maximum, initial))
        self.beta = beta
        self.slow_start = self.limit < maximum
        self.decreases = 0
        self.srtt = 0.0  # smoothed latency of successful requests (seconds)
        self._clock = clock
        self._last_decrease = float("-inf")

    @property
    def value(self) -> int:
        return max(1, int(self.limit))

    def on_success(self, latency: float | None = None) -> None:
        if latency is not None:
            self.srtt = latency if self.srtt == 0.0 else 0.8 * self.srtt + 0.2 * latency
        if self.limit >= self.maximum:
            return
        self.limit = min(float(self.maximum), self.limit + (1.0 if self.slow_start else 1.0 / self.limit))

    def clamp(self, in_flight: int) -> bool:
        """A throttle arrived while `in_flight` other requests were still out: the provider is not
        taking more than those, so the limit need not exceed them. A concurrency cap shows this way:
        the rejections come back at once and the accepted requests stay, so after a burst of 429s
        the limit sits at the cap instead of at beta^k of the first wave. True if the limit went down."""
        self.slow_start = False
        if in_flight >= self.limit:
            return False
        self.limit = max(1.0, float(in_flight))
        return True

    def on_throttle(self, started_at: float) -> bool:
        """A request started at `started_at` was throttled; True if the limit went down."""
        self.slow_start = False
        if started_at < self._last_decrease or self._clock() - self._last_decrease < self.srtt:
            return False  # this window already paid for its overload
        self.limit = max(1.0, self.limit * self.beta)
        self._last_decrease = self._clock()
        self.decreases += 1
        return True


class Gate:
    """A counting semaphore whose limit may change while in use (AIMD moves it), fair between tenants.

    Waiters queue per tenant (a batch, in `hfbatch serve`) and freed slots go round-robin across the
    tenants that wait, so a batch with a long queue cannot starve a small one. With one tenant (a
    plain `submit`) it is a FIFO semaphore."""

    __slots__ = ("limit", "active", "_queues")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._queues: dict[object, deque[asyncio.Future[None]]] = {}  # insertion order = whose turn

    async def acquire(self, tenant: object = None) -> None:
        if self.active < self.limit and not self._queues:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
        q.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # woken and cancelled at once: pass the slot on
            else:
                q = self._queues.get(tenant)
                if q is not None:
                    try:
                        q.remove(fut)
                    except ValueError:
                        pass
                    if not q:
                        del self._queues[tenant]
            raise

    def release(self) -> None:
        self.active -= 1
        self.wake()

    def set_limit(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.wake()

    def wake(self) -> None:
        queues = self._queues
        while queues and self.active < self.limit:
            tenant = next(iter(queues))
            q = queues.pop(tenant)
            fut = q.popleft()
            if q:
                queues[tenant] = q  # to the back: the next slot goes to another tenant
            if not fut.done():
                self.active += 1
                fut.set_result(None)

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())


class ProviderLimit:
    """The gate and AIMD controller of one serving provider."""

    __slots__ = ("gate", "aimd")

    def __init__(self, concurrency: int, adapt: bool, start: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.aimd = AIMD(concurrency, initial=start, clock=clock) if adapt else None
        self.gate = Gate(self.aimd.value if self.aimd else concurrency)


class Capacity:
    """What bounds requests in flight: one gate for all (-c) and one ProviderLimit per serving provider.

    One run owns one; `hfbatch serve` shares one across every batch it runs, so -c is server-wide, a
    provider's learned limit is shared by the batches that use it, and slots go round-robin between
    batches (each batch is a tenant of the gates)."""

    def __init__(self, concurrency: int, adapt: bool = True, start: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.concurrency, self.adapt, self.start, self.clock = concurrency, adapt, start, clock
        self.gate = Gate(concurrency)
        self.providers: dict[str, ProviderLimit] = {}
        self.learned: dict[str, str] = {}  # auto-routed model -> the provider that served it

    def provider(self, key: str) -> ProviderLimit:
        p = self.providers.get(key)
        if p is None:
            p = self.providers[key] = ProviderLimit(self.concurrency, self.adapt, self.start, self.clock)
        return p


@dataclass
class StopControl:
    """Why and how the run stops early. `reason` set = dispatch no more; `hard` = cancel in-flight."""

    reason: StopReason | None = None
    message: str | None = None
    hard: bool = False
    event: asyncio.Event = field(default_factory=asyncio.Event)
    wakeups: list[Callable[[], None]] = field(default_factory=list)  # called once a stop is asked

    def stop(self, reason: StopReason, message: str | None = None, hard: bool = False) -> None:
        if self.reason is None:
            self.reason, self.message = reason, message
        self.hard = self.hard or hard
        self.event.set()
        for wake in list(self.wakeups):
            wake()

    async def sleep(self, delay: float) -> bool:
        """Sleep `delay` seconds; True if the run was stopped meanwhile."""
        if self.reason is not None:
            return True
        try:
            await asyncio.wait_for(self.event.wait(), delay)
        except TimeoutError:
            return False
        return True
