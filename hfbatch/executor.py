"""Execute stage: validated Requests -> HTTP attempts under the limits -> one line per request in the sinks.

Every request ends as exactly one line in exactly one file, or (when the run stops early) as no
line at all, so that a rerun sends it. A 401/403 stops everything at once; a 402 (or the budget)
stops dispatching and lets in-flight requests finish.

Each request is a task; a read-ahead window bounds how many exist (memory stays flat), a global
gate bounds what is in flight (-c), and a per-provider gate, moved by AIMD, keeps one throttling
provider from slowing requests that go elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from .http.transport import Transport
from .limits import Capacity, Gate, ProviderLimit, RateBucket, StopControl
from .models import Outcome, Request
from .outcomes import auth_message, error_body, provider_side_failure, tokens_used
from .packing import SOLO, Packs
from .retry import Retry, RetryPolicy
from .routing import Route, Router, Unroutable, split_model
from .summary import Stats, usage_tokens
from .writer import JsonlSink, error_line, success_line

THROTTLE_STATUSES = frozenset({429, 503})


@dataclass(slots=True)
class Limits:
    """What bounds the traffic (built from the flags)."""

    concurrency: int
    rpm: float | None = None
    tpm: float | None = None
    adapt: bool = True
    fallback: tuple[str, ...] = ()
    coalesce: int | None = None  # pack up to N single-input embeddings requests into one
    start: int = 64  # where AIMD starts (then doubles per round trip up to `concurrency`)


# A finished request, replayable for its duplicates: ("ok", status, request_id, body, (in, out)) |
# ("http", response) | ("error", code, message).
Result = tuple[Any, ...]


def _release(gate: Gate, provider_gate: Gate) -> None:
    gate.release()
    provider_gate.release()


class _Group:
    """Identical requests (dedupe): the first is sent, the others get its result. Kept until every
    expected copy was served, so copies read long after the first answer still send nothing."""

    __slots__ = ("result", "done", "remaining")

    def __init__(self, copies: int) -> None:
        self.result: Result | None = None
        self.done = asyncio.Event()
        self.remaining = copies


class Executor:
    def __init__(
        self, *, transport: Transport, router: Router, policy: RetryPolicy, out: JsonlSink,
        err: JsonlSink, stats: Stats, stop: StopControl, limits: Limits,
        dedupe_keys: dict[int, int] | None = None, hooks: Any = None, capacity: Capacity | None = None,
    ) -> None:
        self.transport, self.router, self.policy = transport, router, policy
        self.out, self.err, self.stats, self.stop = out, err, stats, stop
        self.limits = limits
        # Shared with other batches in `hfbatch serve` (this executor is then one tenant of its gates).
        self.capacity = capacity or Capacity(limits.concurrency, limits.adapt, limits.start)
        self.gate = self.capacity.gate
        self.providers = self.capacity.providers
        self.learned = self.capacity.learned
        self.rpm = RateBucket(limits.rpm / 60.0) if limits.rpm else None
        self.tpm = RateBucket(limits.tpm / 60.0, burst=limits.tpm / 60.0) if limits.tpm else None
        self.dedupe_keys = dedupe_keys
        self.groups: dict[tuple[str, bytes], _Group] = {}
        self.hooks = hooks  # cost ledger / budget / cache (optional)
        self.packs = Packs(self) if limits.coalesce else None

    # -- dispatch ------------------------------------------------------------------------------

    async def run(self, requests: Iterable[Request] | AsyncIterator[Request]) -> None:
        """Start a task per request, at most a read-ahead window of them alive, until done or stopped."""
        window = max(64, 4 * self.limits.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        room: list[asyncio.Future[None]] = []  # the feeder waiting for a task to end (or a stop)

        def wake() -> None:
            if room and not room[0].done():
                room[0].set_result(None)

        def finished(t: asyncio.Task[None]) -> None:
            tasks.discard(t)
            wake()

        spawned = 0

        async def admit() -> bool:
            nonlocal spawned
            spawned += 1
            if spawned % 16 == 0:
                # Let the new tasks send before reading further ahead: without this the first
                # read-ahead window (4 x -c lines) is parsed before the first request leaves.
                await asyncio.sleep(0)
            while len(tasks) >= window and self.stop.reason is None:
                room[:] = [loop.create_future()]
                await room[0]
            return self.stop.reason is None

        self.stop.wakeups.append(wake)
        try:
            if isinstance(requests, AsyncIterator):
                async for req in requests:
                    if not await admit():
                        break
                    self._spawn(req, tasks, finished)
            else:
                for req in requests:
                    if not await admit():
                        break
                    self._spawn(req, tasks, finished)
            while tasks:
                await asyncio.wait(tuple(tasks))
        finally:
            self.stop.wakeups.remove(wake)
            self.stats.abandoned += self.stats.in_flight  # sent, no answer: cancelled now (a rerun sends them)
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, req: Request, tasks: set[asyncio.Task[None]], finished: Any) -> None:
        t = asyncio.create_task(self._task(req))
        tasks.add(t)
        t.add_done_callback(finished)

    async def _task(self, req: Request) -> None:
        try:
            await self._one(req)
        except asyncio.CancelledError:
            raise  # cancelled in flight: no line, a rerun sends it
        except Exception as e:  # noqa: BLE001 - a bug must not lose the line
            self._write(req.custom_id, ("error", "internal_error", f"hfbatch internal error: {e!r}"[:300]))

    # -- one request ---------------------------------------------------------------------------

    async def _one(self, req: Request) -> None:
        route = await self.router.route(req)
        if isinstance(route, Unroutable):
            self._write(req.custom_id, ("error", route.code, route.message))
            return
        key = None
        if self.dedupe_keys:
            from .fingerprints import canonical_request, request_fingerprint

            key = canonical_request(req.url, req.body)  # groups match on it exactly
            occurrences = self.dedupe_keys.get(request_fingerprint(key))
            if occurrences is not None:
                group = self.groups.get(key)
                if group is not None:  # a copy: wait for the first one's answer
                    await group.done.wait()
                    group.remaining -= 1
                    if group.remaining <= 0:
                        self.groups.pop(key, None)
                    if group.result is not None:
                        self._write(req.custom_id, group.result, copy=True, req=req)
                    return
                self.groups[key] = _Group(occurrences - 1)
            else:
                key = None
        result = None
        try:
            cached = self.hooks.cached(req) if self.hooks is not None else None
            if cached is not None:
                result = cached
                self._write(req.custom_id, result, copy=True, cache=True, req=req)
                return
            if self.packs is not None and req.url == "/v1/embeddings":
                packed = await self.packs.join(req)
                if packed is not SOLO:
                    result = packed
                    if result is not None:
                        self._write(req.custom_id, result)
                    return
            outcome = await self._send(req, route)
            if outcome is None:
                return  # stopped: no line
            result = self._record(req, route, outcome)
        finally:
            if key is not None:
                group = self.groups[key]
                group.result = result
                group.done.set()
                if result is None:
                    self.groups.pop(key, None)  # stopped before an answer: copies stay unsent too

    def _provider_key(self, model: str) -> str:
        base, pinned = split_model(model)
        return pinned or self.learned.get(base) or "auto:" + base

    def _provider(self, key: str) -> ProviderLimit:
        return self.capacity.provider(key)

    async def _send(self, req: Request, route: Route) -> Outcome | None:
        """Attempts under the limits until a final outcome; None when the run stopped first."""
        stats, stop = self.stats, self.stop
        attempt = answers_500 = 0
        chain = list(self.limits.fallback)
        model = route.model or req.model
        while True:
            attempt += 1
            if self.rpm is not None and await stop.sleep(self.rpm.reserve(1)):
                return None
            booked = 0
            if self.tpm is not None:
                booked = route.token_estimate
                if await stop.sleep(self.tpm.reserve(booked)):
                    return None
            reserved: float | None = 0.0
            if self.hooks is not None and self.hooks.budget is not None:
                reserved = await self.hooks.reserve(req, route)
            if reserved is None:
                return None  # the budget said no: the hook stopped the run
            provider = self._provider(self._provider_key(model))
            try:
                await provider.gate.acquire(self)
                try:
                    await self.gate.acquire(self)
                except BaseException:
                    provider.gate.release()
                    raise
            except BaseException:
                if self.hooks is not None:
                    self.hooks.release(reserved)
                raise
            try:
                if stop.reason is not None:
                    return None
                started = time.monotonic()
                stats.sent += 1
                stats.in_flight += 1
                try:
                    outcome = await self.transport.post(route.url, route.data)
                finally:
                    stats.in_flight -= 1
                if route.object_body and outcome.parsed is not None and not isinstance(outcome.parsed, dict):
                    outcome.parsed = None  # JSON, but not an OpenAI body: a broken answer (retried)
                # Adapt while this request still holds its slot: a throttle lowers the limit before
                # the slot is handed to a waiting request (which would meet the same 429).
                self._adapt(provider, model, outcome, started)
            finally:
                # The slots are handed on one loop step later: this answer's line is written before this
                # task next yields, and its sink's flush is queued before that step, so the next request
                # leaves after the line reached the OS. A kill -9 then re-sends at most -c requests.
                asyncio.get_running_loop().call_soon(_release, self.gate, provider.gate)
                if self.hooks is not None:
                    self.hooks.release(reserved)
            status = outcome.status
            if self.tpm is not None and status is not None and 200 <= status < 300:
                self.tpm.refund(booked - tokens_used(outcome.parsed, booked))
            if status in (401, 403):
                stop.stop("auth", auth_message(status, outcome), hard=True)
                return None
            if status == 402:
                stop.stop("credits", "credits exhausted (HTTP 402): top up your Hugging Face "
                          "credits or subscribe to PRO, then rerun the same command to send the rest")
                return None
            answers_500 += status == 500
            decision = self.policy.decide(outcome, attempt, answers_500=answers_500)
            if isinstance(decision, Retry):
                stats.retries += 1
                if await stop.sleep(decision.delay):
                    return None
                continue
            if chain and provider_side_failure(outcome):
                nxt = chain.pop(0)
                model = split_model(model)[0] + ":" + nxt
                nxt_route = await self.router.route(replace(req, body={**req.body, "model": model}, model=model))
                if isinstance(nxt_route, Unroutable):
                    return outcome
                route = nxt_route
                stats.fallbacks += 1
                attempt = answers_500 = 0
                continue
            return outcome

    def _adapt(self, provider: ProviderLimit, model: str, outcome: Outcome, started: float) -> None:
        if outcome.provider:
            base, pinned = split_model(model)
            if pinned is None and self.learned.get(base) != outcome.provider:
                self.learned[base] = outcome.provider
                # One provider, one controller: requests that queued on the placeholder before the
                # router told us who serves this model share the provider's gate and AIMD.
                auto = self.providers.get("auto:" + base)
                if auto is not None and outcome.provider not in self.providers:
                    self.providers[outcome.provider] = auto
        aimd = provider.aimd
        if aimd is None or outcome.status is None:
            return
        if outcome.status in THROTTLE_STATUSES:
            cut = aimd.on_throttle(started)
            if aimd.clamp(provider.gate.active - 1) or cut:  # the others still out (not this one)
                provider.gate.set_limit(aimd.value)
        elif 200 <= outcome.status < 300:
            before = aimd.value
            aimd.on_success(outcome.latency)
            if aimd.value != before:
                provider.gate.set_limit(aimd.value)

    # -- results -------------------------------------------------------------------------------

    def _record(self, req: Request, route: Route, o: Outcome) -> Result:
        self.stats.latency.add(o.latency)
        result = self._result_of(req, route, o)
        self._write(req.custom_id, result)
        return result

    def _result_of(self, req: Request, route: Route, o: Outcome) -> Result:
        """The line an outcome becomes (and, for a 2xx, its usage, provider and cost recorded)."""
        stats = self.stats
        status = o.status
        request_id = o.request_id or "req_" + os.urandom(12).hex()
        result: Result
        if status is not None and 200 <= status < 300 and o.parsed is not None:
            if route.adapt is not None:
                body: Any = route.adapt(o.parsed, req)
                usage_of = body
            else:
                # Pass the provider's bytes through unchanged, unless pretty-printed (newlines would
                # break JSONL): then re-serialize.
                body = o.parsed if (b"\n" in o.body or b"\r" in o.body) else orjson.Fragment(o.body)
                usage_of = o.parsed
            result = ("ok", status, request_id, body, usage_tokens(usage_of))
            stats.add_usage(usage_of)
            stats.providers[o.provider or "unknown"] += 1
            if self.hooks is not None:
                self.hooks.answered(req, route, o, usage_of)
        elif status is None:
            result = ("error", o.error_code or "connection_error", o.error_message or "")
        elif 200 <= status < 300:
            snippet = o.body[:200].decode("utf-8", "replace")
            result = ("error", "invalid_response",
                      f"the provider answered HTTP {status} with a body that is not a JSON object: {snippet!r}")
        else:
            result = ("http", {"status_code": status, "request_id": request_id, "body": error_body(status, o)})
        return result

    def _write(self, custom_id: str, result: Result, copy: bool = False, cache: bool = False,
               req: Request | None = None) -> None:
        stats = self.stats
        kind = result[0]
        if kind == "ok":
            self.out.write(success_line(custom_id, result[1], result[2], result[3]))
            stats.completed += 1
        elif kind == "http":
            self.err.write(error_line(custom_id, "", "", result[1]))
            stats.failed += 1
        else:
            self.err.write(error_line(custom_id, result[1], result[2]))
            stats.failed += 1
        if copy:
            if cache:
                stats.cache_hits += 1
            else:
                stats.deduped += 1
            if kind == "ok":
                stats.add_saved(result[4])
                if self.hooks is not None and req is not None:
                    self.hooks.saved(req, result[4])

    def concurrency_now(self) -> dict[str, int]:
        """The live limit per provider (what AIMD allows right now)."""
        named: dict[int, str] = {}
        for k, p in self.providers.items():  # a placeholder shared with a provider shows as the provider
            if k.startswith("auto:") and k[5:] in self.learned and self.learned[k[5:]] in self.providers:
                continue  # the model's provider is known (and listed): its placeholder only held early requests
            if id(p) not in named or named[id(p)].startswith("auto:"):
                named[id(p)] = k
        return {k: self.providers[k].gate.limit for k in named.values()}
