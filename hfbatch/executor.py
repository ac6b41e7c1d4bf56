"""Execute stage: validated Requests -> HTTP attempts (bounded workers, retry policy) -> lines in the sinks.

Every request ends as exactly one line in exactly one file, or (when the run stops early) as no
line at all, so that a rerun sends it. A 401/403 stops everything at once; a 402 stops dispatching
and lets in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .models import Outcome, Request
from .providers import Router, Unroutable
from .retry import Retry, RetryPolicy
from .summary import Stats
from .transport import Transport
from .writer import JsonlSink, error_line, success_line

_HTTP_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
    403: "permission_error", 404: "not_found_error", 408: "timeout", 409: "conflict_error",
    413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
}


@dataclass
class StopControl:
    """Why and how the run stops early. `reason` set = dispatch no more; `hard` = cancel in-flight."""

    reason: str | None = None
    message: str | None = None
    hard: bool = False
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self, reason: str, message: str | None = None, hard: bool = False) -> None:
        if self.reason is None:
            self.reason, self.message = reason, message
        self.hard = self.hard or hard
        self.event.set()

    async def sleep(self, delay: float) -> bool:
        """Sleep `delay` seconds; True if the run was stopped meanwhile."""
        if self.reason is not None:
            return True
        try:
            await asyncio.wait_for(self.event.wait(), delay)
        except TimeoutError:
            return False
        return True


class Executor:
    def __init__(
        self, *, transport: Transport, router: Router, policy: RetryPolicy, out: JsonlSink,
        err: JsonlSink, stats: Stats, stop: StopControl, concurrency: int,
    ) -> None:
        self.transport, self.router, self.policy = transport, router, policy
        self.out, self.err, self.stats, self.stop = out, err, stats, stop
        self.concurrency = concurrency
        self.unsent = 0

    async def run(self, requests: Iterable[Request] | AsyncIterator[Request]) -> None:
        """Feed `requests` through a bounded queue to the workers until done or stopped."""
        queue: asyncio.Queue[Request | None] = asyncio.Queue(maxsize=self.concurrency * 2)
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.concurrency)]
        stop_wait = asyncio.create_task(self.stop.event.wait())
        try:
            if isinstance(requests, AsyncIterator):
                async for req in requests:
                    if not await self._put(queue, req, stop_wait):
                        break
            else:
                for req in requests:
                    if not await self._put(queue, req, stop_wait):
                        break
            for _ in workers:  # one end marker per worker
                if not await self._put(queue, None, stop_wait):
                    # Stopped: what is queued stays unsent; every worker gets its marker at once
                    # (the queue holds 2x the workers, so this never blocks).
                    self._drain(queue)
                    for _ in workers:
                        queue.put_nowait(None)
                    break
            await asyncio.gather(*workers)
        finally:
            stop_wait.cancel()
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self._drain(queue)

    def _drain(self, queue: asyncio.Queue[Request | None]) -> None:
        """Empty the queue; the requests in it were never sent."""
        while not queue.empty():
            if queue.get_nowait() is not None:
                self.unsent += 1

    async def _put(self, queue: asyncio.Queue[Request | None], item: Request | None,
                   stop_wait: asyncio.Task[Any]) -> bool:
        if self.stop.reason is not None:
            if item is not None:
                self.unsent += 1
            return False
        if not queue.full():
            queue.put_nowait(item)
            return True
        put = asyncio.ensure_future(queue.put(item))
        await asyncio.wait((put, stop_wait), return_when=asyncio.FIRST_COMPLETED)
        if put.done():
            return True
        put.cancel()
        if item is not None:
            self.unsent += 1
        return False

    async def _worker(self, queue: asyncio.Queue[Request | None]) -> None:
        while True:
            req = await queue.get()
            if req is None:
                return
            if self.stop.reason is not None:
                self.unsent += 1
                continue
            try:
                await self._one(req)
            except asyncio.CancelledError:
                self.unsent += 1  # cancelled in flight: no line, a rerun sends it
                raise
            except Exception as e:  # noqa: BLE001 - a bug must not lose the line
                self._write_error(req.custom_id, "internal_error", f"hfbatch internal error: {e!r}"[:300])

    async def _one(self, req: Request) -> None:
        route = await self.router.route(req)
        if isinstance(route, Unroutable):
            self._write_error(req.custom_id, route.code, route.message)
            return
        stats, attempt, answers_500 = self.stats, 0, 0
        while True:
            attempt += 1
            stats.sent += 1
            stats.in_flight += 1
            try:
                outcome = await self.transport.post(route.url, route.data)
            finally:
                stats.in_flight -= 1
            status = outcome.status
            if status in (401, 403):
                self.stop.stop("auth", _auth_message(status, outcome), hard=True)
                self.unsent += 1
                return
            if status == 402:
                self.stop.stop("credits", "credits exhausted (HTTP 402): top up your Hugging Face "
                               "credits or subscribe to PRO, then rerun the same command to send the rest")
                self.unsent += 1
                return
            answers_500 += status == 500
            decision = self.policy.decide(outcome, attempt, answers_500=answers_500)
            if isinstance(decision, Retry):
                stats.retries += 1
                if await self.stop.sleep(decision.delay):
                    self.unsent += 1
                    return
                continue
            break
        self._record(req, route.adapt, outcome)

    def _record(self, req: Request, adapt: Any, o: Outcome) -> None:
        stats = self.stats
        stats.latency.add(o.latency)
        status = o.status
        request_id = o.request_id or "req_" + os.urandom(12).hex()
        if status is not None and 200 <= status < 300 and o.parsed is not None:
            if adapt is not None:
                body: Any = adapt(o.parsed, req)
            elif b"\n" in o.body or b"\r" in o.body:
                body = o.parsed  # pretty-printed answers would break JSONL: re-serialize those
            else:
                body = orjson.Fragment(o.body)  # pass the provider's bytes through unchanged
            self.out.write(success_line(req.custom_id, status, request_id, body))
            stats.completed += 1
            stats.add_usage(o.parsed if adapt is None else body)
            stats.providers[o.provider or "unknown"] += 1
            return
        if status is None:
            self._write_error(req.custom_id, o.error_code or "connection_error", o.error_message or "")
            return
        if 200 <= status < 300:
            snippet = o.body[:200].decode("utf-8", "replace")
            self._write_error(
                req.custom_id, "invalid_response",
                f"the provider answered HTTP {status} with a body that is not JSON: {snippet!r}",
            )
            return
        response = {"status_code": status, "request_id": request_id, "body": error_body(status, o)}
        self.err.write(error_line(req.custom_id, "", "", response))
        stats.failed += 1

    def _write_error(self, custom_id: str, code: str, message: str) -> None:
        self.err.write(error_line(custom_id, code, message))
        self.stats.failed += 1


def error_body(status: int, o: Outcome) -> Any:
    """The provider's error answer in OpenAI's envelope {"error": {message, type, param, code}}.

    OpenAI-shaped answers pass through unchanged; Hugging Face's `{"error": "text"}`, `{"detail":
    ...}`, `{"message": ...}`, plain text and HTML are wrapped so OpenAI code can read them."""
    p = o.parsed
    kind = _HTTP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if isinstance(p, dict) and isinstance(p.get("error"), dict) and "message" in p["error"]:
        e = p["error"]
        if all(k in e for k in ("type", "param", "code")):
            return p  # already OpenAI's envelope: unchanged
        return {**p, "error": {"type": kind, "param": None, "code": None, **e}}
    if isinstance(p, dict):
        raw = p.get("error") or p.get("detail") or p.get("message") or p
        message = raw if isinstance(raw, str) else orjson.dumps(raw).decode()
    elif p is not None:
        message = orjson.dumps(p).decode()
    else:
        message = o.body[:1000].decode("utf-8", "replace").strip() or f"HTTP {status}"
    code = p.get("error_type") if isinstance(p, dict) else None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _auth_message(status: int | None, o: Outcome) -> str:
    detail = ""
    if isinstance(o.parsed, dict):
        e = o.parsed.get("error")
        detail = (e.get("message") if isinstance(e, dict) else e) or ""
    detail = f" ({str(detail)[:160]})" if detail else ""
    if status == 401:
        return (f"the provider rejected the token (HTTP 401){detail}: check HF_TOKEN / --token; it needs "
                "the 'Make calls to Inference Providers' permission. Rerun to send the rest")
    return (f"access denied (HTTP 403){detail}: the token may lack access to this model (gated? accept its "
            "terms on the Hub) or to the org in --bill-to. Rerun to send the rest")
