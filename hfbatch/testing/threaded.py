"""A local fake server on a daemon thread with its own event loop, for synchronous tests (the fake provider, the
fake Hub and the fake of the Hub's files API each serve this way)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Protocol, Self

from aiohttp import web


async def listen(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: any free port); its runner (cleanup() stops it) and the port bound."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])


class Server(Protocol):
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; the port bound."""
        ...

    async def stop(self) -> None: ...


class OnAThread:
    """Runs `server` on a thread of its own: `start()` returns once it listens (`url`), `call(fn)` runs `fn` on its
    loop (its state is not thread-safe), `stop()` stops it and the thread; a context manager."""

    def __init__(self, server: Server, name: str) -> None:
        self.server, self.name = server, name
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        loop, ready, port = asyncio.new_event_loop(), threading.Event(), []

        def run() -> None:
            try:
                port.append(loop.run_until_complete(self.server.start()))
            finally:
                ready.set()
            loop.run_forever()
            loop.close()

        self._loop, self._thread = loop, threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        if not ready.wait(10) or not port:
            raise RuntimeError(f"{self.name} failed to start")
        self.url = f"http://127.0.0.1:{port[0]}"
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop and return its result."""

        async def run() -> Any:
            return fn()

        assert self._loop is not None, "not started"
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stop(self) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
