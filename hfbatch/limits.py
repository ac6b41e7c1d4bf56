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

from .adaptive import AdaptiveLimit
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

    def wait(self) -> float:
        """Seconds until one unit is free, booking nothing."""
        now = self._clock()
        return max(0.0, max(self._next, now - self.burst / self.rate) - now)

    def refund(self, amount: float) -> None:
        self._next -= amount / self.rate


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

    async def acquire(self, tenant: object = None, front: bool = False) -> None:
        """Wait for a slot; `front`: ahead of the tenant's other waiters (a request retried after a throttle
        has waited already: it goes back to the front of the queue, not behind the read-ahead)."""
        if self.active < self.limit and not self._queues:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
        if front:
            q.appendleft(fut)
        else:
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
    """One serving provider's gate, its adaptive limit (adaptive.AdaptiveLimit, when --adapt) and, once it
    shows a rate limit, the bucket that paces sends to it."""

    __slots__ = ("gate", "adaptive", "out", "pacer", "_bucket", "_clock")

    def __init__(self, concurrency: int, adapt: bool, start: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.adaptive = AdaptiveLimit(concurrency, initial=start, clock=clock) if adapt else None
        self.gate = Gate(self.adaptive.value if self.adaptive else concurrency)
        self.out = 0  # requests sent and not answered yet: what the provider holds of ours (gate.active also
        # counts slots whose answer is in, being written: they are handed on one loop step later)
        self._bucket: RateBucket | None = None
        self._clock = clock
        self.pacer = asyncio.Lock()  # one request at a time waits for the pace

    @property
    def paced(self) -> bool:
        """The provider showed a rate limit: sends leave at its pace."""
        return self.adaptive is not None and self.adaptive.rate is not None

    def pace(self) -> float:
        """Seconds before the next send may leave (0 unless the provider showed a rate limit): under the rate it
        refused in any second (its window), and spread evenly (no burst). Books nothing: paced_send() does."""
        adaptive = self.adaptive
        if adaptive is None or adaptive.rate is None:
            return 0.0
        bucket = self._bucket
        if bucket is None:
            bucket = self._bucket = RateBucket(adaptive.rate, burst=1.0, clock=self._clock)
        bucket.rate = adaptive.rate
        delay = max(bucket.wait(), adaptive.pace_delay(self._clock()))
        if delay < 1e-6:  # a rounding error, not a wait (`now + delay` may be `now` again: a wait that never ends)
            return 0.0
        adaptive.paced()
        return delay

    def paced_send(self) -> None:
        """A send leaves now: book it in the pace's bucket."""
        if self._bucket is not None and self.adaptive is not None and self.adaptive.rate is not None:
            self._bucket.reserve(1)


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
        # --rpm / --tpm buckets set by the owner (the Ray engine's shard worker: its share of the cluster's rate,
        # moved as shards come and go); None: each executor builds its own from its flags.
        self.rpm: RateBucket | None = None
        self.tpm: RateBucket | None = None

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
