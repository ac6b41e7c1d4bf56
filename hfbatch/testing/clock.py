"""A virtual-time event loop: asyncio.sleep, call_later, timeouts and loop.time() run on a clock that jumps
straight to the next timer instead of waiting for it. Policies driven by the loop's clock (the executor's
limits, retries, pacing) then run in tests in microseconds, and their timing is exact and repeatable,
whatever the machine's speed.

Real I/O still works (the selector is polled without blocking); while nothing is scheduled the loop
blocks for real (e.g. waiting for a worker thread), so code that mixes threads and timers keeps working,
with virtual time jumping ahead while the thread runs. Keep threads out of virtual-time tests.

    result = run_virtual(main())          # like asyncio.run
    loop.time()                           # virtual seconds since the loop started
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class _VirtualSelector(selectors.BaseSelector):
    """Never blocks while a timer is due: the loop's clock jumps by the timeout instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._real = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            return self._real.select(None)  # nothing scheduled: wait for real I/O (a thread's wake-up)
        events = self._real.select(0)
        if not events and timeout > 0:
            self._loop.advance(timeout)
        return events

    def close(self) -> None:
        self._real.close()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(selector=_VirtualSelector(self))
        # The loop rounds timers by the clock's resolution: keep it tiny so virtual deadlines are exact.
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on a fresh virtual-time loop (like asyncio.run)."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
