"""Execute stage: validated Requests -> HTTP attempts under the limits -> one Answer per request, written.

Every request ends as exactly one line in exactly one file, or (when the run stops early) as no
line at all, so that a rerun sends it. A 401/403 stops everything at once; a 402 (or the budget)
stops dispatching and lets in-flight requests finish. A bug in a request's handling stops the run
too (resumable, exit 1): it is never turned into a quiet data line.

Each request is a task; a read-ahead window bounds how many exist (memory stays flat), a global
gate bounds what is in flight (-c), and a per-provider gate, moved by AIMD, keeps one throttling
provider from slowing requests that go elsewhere (limits.Capacity, which `hfbatch serve` shares
between batches). Time comes from the event loop's clock, so a virtual-time loop drives every
policy here in tests (hfbatch.testing).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from .adaptive import Ticket
from .coalesce import SOLO, Packs
from .fingerprints import canonical_request, request_fingerprint
from .http.base import Transport
from .limits import Capacity, Gate, ProviderLimit, RateBucket, StopControl
from .models import Answer, Failure, NoAnswer, Outcome, Request, StopReason, Success
from .outcomes import auth_message, error_body, provider_side_failure, tokens_used
from .retry import Retry, RetryPolicy
from .routing import Route, Router, Unroutable, split_model
from .summary import Stats, usage_tokens
from .writer import Answers

THROTTLE_STATUSES = frozenset({429, 503})
REFUSED_AT_THE_DOOR = 4  # times max_attempts a request may be refused at the door before it counts as attempts


class RunHooks(Protocol):
    """What the executor asks around each request: a cached answer? may it start (budget)? what did it
    cost? (engines.http.Accounting: the response cache, the cost ledger and the budget.)"""

    caching: bool  # False: cached() is never asked
    budgeted: bool  # False: reserve()/release() are never called

    async def cached(self, req: Request) -> Success | None: ...

    async def reserve(self, req: Request, route: Route) -> float | None:
        """Book the worst-case cost of one attempt; None: refused (the hook stopped the run)."""
        ...

    def release(self, amount: float) -> None: ...

    def answered(self, req: Request, route: Route, outcome: Outcome, body: dict[str, Any]) -> None:
        """A 2xx answer: its cost, and into the cache."""
        ...

    def saved(self, req: Request, tokens: tuple[int, int]) -> None:
        """A copy answered by dedupe or the cache: what it would have cost."""
        ...


class NoHooks:
    """No cache, no budget, no cost ledger."""

    caching = False
    budgeted = False

    async def cached(self, req: Request) -> Success | None:
        return None

    async def reserve(self, req: Request, route: Route) -> float | None:
        return 0.0

    def release(self, amount: float) -> None:
        pass

    def answered(self, req: Request, route: Route, outcome: Outcome, body: dict[str, Any]) -> None:
        pass

    def saved(self, req: Request, tokens: tuple[int, int]) -> None:
        pass


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


def _release(gate: Gate, provider_gate: Gate) -> None:
    gate.release()
    provider_gate.release()


class _Group:
    """Identical requests (dedupe): the first is sent, the others get its answer. Kept until every
    expected copy was served, so copies read long after the first answer still send nothing."""

    __slots__ = ("answer", "done", "remaining")

    def __init__(self, copies: int) -> None:
        self.answer: Answer | None = None
        self.done = asyncio.Event()
        self.remaining = copies


class Executor:
    def __init__(
        self, *, transport: Transport, router: Router, policy: RetryPolicy, answers: Answers, stats: Stats,
        stop: StopControl, limits: Limits, capacity: Capacity | None = None,
        dedupe_keys: dict[int, int] | None = None, hooks: RunHooks | None = None,
        clock: Callable[[], float] | None = None, rand: Callable[[], float] = random.random,
    ) -> None:
        self.transport, self.router, self.policy = transport, router, policy
        self.answers, self.stats, self.stop = answers, stats, stop
        self.limits = limits
        self.clock = clock or asyncio.get_running_loop().time
        self.rand = rand  # the retry jitter's random source (a seeded one in tests)
        # Shared with other batches in `hfbatch serve` (this executor is then one tenant of its gates).
        self.capacity = capacity or Capacity(limits.concurrency, limits.adapt, limits.start, clock=self.clock)
        self.gate = self.capacity.gate
        self.rpm = self.capacity.rpm or (RateBucket(limits.rpm / 60.0, clock=self.clock) if limits.rpm else None)
        self.tpm = self.capacity.tpm or (RateBucket(limits.tpm / 60.0, burst=limits.tpm / 60.0, clock=self.clock)
                                         if limits.tpm else None)
        self.dedupe_keys = dedupe_keys
        self.groups: dict[tuple[str, bytes], _Group] = {}
        self.hooks: RunHooks = hooks or NoHooks()
        self.packs = Packs(self, limits.coalesce) if limits.coalesce else None
        self.internal_errors: list[BaseException] = []  # bugs met in request tasks (the run stops on the first)
        self.draining = False  # every request has been read: the limit no longer needs to grow

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

        def spawn(req: Request) -> None:
            t = loop.create_task(self._task(req))
            tasks.add(t)
            t.add_done_callback(finished)

        self.stop.wakeups.append(wake)
        try:
            if isinstance(requests, AsyncIterator):
                async for req in requests:
                    if not await admit():
                        break
                    spawn(req)
            else:
                for req in requests:
                    if not await admit():
                        break
                    spawn(req)
            self.draining = True  # the whole input is out: no more probing above a known limit
            while tasks:
                await asyncio.wait(tuple(tasks))
        finally:
            self.stop.wakeups.remove(wake)
            self.stats.abandoned += self.stats.in_flight  # sent, no answer: cancelled now (a rerun sends them)
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _task(self, req: Request) -> None:
        try:
            await self._one(req)
        except asyncio.CancelledError:
            raise  # cancelled in flight: no line, a rerun sends it
        except Exception as e:  # noqa: BLE001 - a bug: stop the run, never a quiet data line
            self.internal_error(e)

    def internal_error(self, e: BaseException) -> None:
        """A bug in a request's handling: no line for it (a rerun sends it), and the run stops (exit 1)."""
        self.internal_errors.append(e)
        self.stop.stop(StopReason.INTERNAL_ERROR, f"internal error: {type(e).__name__}: {e}"[:300])

    # -- one request ---------------------------------------------------------------------------

    async def _one(self, req: Request) -> None:
        route = await self.router.route(req)
        if isinstance(route, Unroutable):
            self.answers.write(req.custom_id, NoAnswer(route.code, route.message))
            return
        key = None
        if self.dedupe_keys:
            key = canonical_request(req.url, req.body)  # groups match on it exactly
            occurrences = self.dedupe_keys.get(request_fingerprint(key))
            if occurrences is not None:
                group = self.groups.get(key)
                if group is not None:  # a copy: wait for the first one's answer
                    await group.done.wait()
                    group.remaining -= 1
                    if group.remaining <= 0:
                        self.groups.pop(key, None)
                    if group.answer is not None:
                        self._copy(req, group.answer, cached=False)
                    return
                self.groups[key] = _Group(occurrences - 1)
            else:
                key = None
        answer: Answer | None = None
        try:
            if self.hooks.caching:
                hit = await self.hooks.cached(req)
                if hit is not None:
                    answer = hit
                    self._copy(req, hit, cached=True)
                    return
            if self.packs is not None and req.url == "/v1/embeddings":
                packed = await self.packs.join(req)
                if packed is not SOLO:
                    answer = packed
                    if answer is not None:
                        self.answers.write(req.custom_id, answer)
                    return
            outcome = await self.send(req, route)
            if outcome is None:
                return  # stopped: no line
            self.stats.latency.add(outcome.latency)
            answer = self.answer_of(req, route, outcome)
            self.answers.write(req.custom_id, answer)
        finally:
            if key is not None:
                group = self.groups[key]
                group.answer = answer
                group.done.set()
                if answer is None:
                    self.groups.pop(key, None)  # stopped before an answer: copies stay unsent too

    def _copy(self, req: Request, answer: Answer, *, cached: bool) -> None:
        """An answer this request did not pay for (a deduped copy, a cache hit)."""
        self.answers.write(req.custom_id, answer)
        if cached:
            self.stats.cache_hits += 1
        else:
            self.stats.deduped += 1
        if isinstance(answer, Success):
            self.stats.add_saved(answer.tokens)
            self.hooks.saved(req, answer.tokens)

    def _provider_key(self, model: str) -> str:
        base, pinned = split_model(model)
        return pinned or self.capacity.learned.get(base) or "auto:" + base

    async def send(self, req: Request, route: Route) -> Outcome | None:
        """Attempts under the limits until a final outcome; None when the run stopped first."""
        stats, stop, hooks = self.stats, self.stop, self.hooks
        attempt = answers_500 = refused = 0
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
            reserved = 0.0
            if hooks.budgeted:
                booking = await hooks.reserve(req, route)
                if booking is None:
                    return None  # the budget said no: the hook stopped the run
                reserved = booking
            provider = self.capacity.provider(self._provider_key(model))
            try:
                slot = await self._slot(provider, front=attempt > 1 or refused > 0)
            except BaseException:
                if hooks.budgeted:
                    hooks.release(reserved)
                raise
            if not slot:
                if hooks.budgeted:
                    hooks.release(reserved)
                return None
            try:
                if stop.reason is not None:
                    return None
                adaptive = provider.adaptive
                # what the limit learns from: when it left, with how many of ours out at the provider
                ticket = adaptive.sent(self.clock(), provider.out) if adaptive is not None else None
                stats.sent += 1
                stats.in_flight += 1
                provider.out += 1
                try:
                    outcome = await self.transport.post(route.url, route.data)
                finally:
                    stats.in_flight -= 1
                    provider.out -= 1
                if route.object_body and outcome.parsed is not None and not isinstance(outcome.parsed, dict):
                    outcome.parsed = None  # JSON, but not an OpenAI body: a broken answer (retried)
                # Adapt while this request still holds its slot: a throttle lowers the limit before
                # the slot is handed to a waiting request (which would meet the same 429).
                self._adapt(provider, model, outcome, ticket)
            finally:
                # The slots are handed on one loop step later: this answer's line is written before this
                # task next yields, and its sink's flush is queued before that step, so the next request
                # leaves after the line reached the OS. A kill -9 then re-sends at most -c requests.
                asyncio.get_running_loop().call_soon(_release, self.gate, provider.gate)
                if hooks.budgeted:
                    hooks.release(reserved)
            status = outcome.status
            if self.tpm is not None and status is not None and 200 <= status < 300:
                self.tpm.refund(booked - tokens_used(outcome.parsed, booked))
            if status in (401, 403):
                stop.stop(StopReason.AUTH, auth_message(status, outcome), hard=True)
                return None
            if status == 402:
                stop.stop(StopReason.CREDITS, "credits exhausted (HTTP 402): top up your Hugging Face "
                          "credits or subscribe to PRO, then rerun the same command to send the rest")
                return None
            answers_500 += status == 500
            if (status == 429 and ticket is not None and ticket.at_door
                    and refused < REFUSED_AT_THE_DOOR * self.policy.max_attempts):
                # Refused at the door (a 429: about our load; a 503 is the provider failing and spends attempts),
                # and the adaptive limit has taken it in: back to the front of the queue
                # through the limit that now holds it back, after the provider's Retry-After, else the first
                # backoff's jitter (no attempt spent, no growing backoff: not the request's failure).
                refused += 1
                attempt -= 1
                stats.retries += 1
                retry_after = outcome.retry_after
                wait = min(retry_after, self.policy.max_retry_after) if retry_after else self.rand() * self.policy.base
                if await stop.sleep(wait):
                    return None
                continue
            decision = self.policy.decide(outcome, attempt, rand=self.rand, answers_500=answers_500)
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

    async def _slot(self, provider: ProviderLimit, front: bool) -> bool:
        """Take this provider's slot and one of -c; at the provider's pace once it showed a rate limit. False:
        the run stopped meanwhile."""
        while True:
            if provider.paced:
                async with provider.pacer:  # one request at a time through the pace: no herd of sleepers
                    return await self._paced_slot(provider, front)
            await self._acquire(provider, front)
            if not provider.paced:
                return True
            self.gate.release()  # the provider showed a rate limit while this request waited: to the pace
            provider.gate.release()

    async def _paced_slot(self, provider: ProviderLimit, front: bool) -> bool:
        while True:
            wait = provider.pace()
            if wait > 0:
                if await self.stop.sleep(wait):
                    return False
                continue
            await self._acquire(provider, front)
            if provider.pace() > 0:  # the pace tightened while this request waited for the slots
                self.gate.release()
                provider.gate.release()
                continue
            provider.paced_send()
            return True

    async def _acquire(self, provider: ProviderLimit, front: bool) -> None:
        await provider.gate.acquire(self, front=front)
        try:
            await self.gate.acquire(self)
        except BaseException:
            provider.gate.release()
            raise

    def _adapt(self, provider: ProviderLimit, model: str, outcome: Outcome, ticket: Ticket | None) -> None:
        if outcome.provider:
            base, pinned = split_model(model)
            learned = self.capacity.learned
            if pinned is None and learned.get(base) != outcome.provider:
                learned[base] = outcome.provider
                # One provider, one controller: requests that queued on the placeholder before the
                # router told us who serves this model share the provider's gate and AIMD.
                providers = self.capacity.providers
                auto = providers.get("auto:" + base)
                if auto is not None and outcome.provider not in providers:
                    providers[outcome.provider] = auto
        adaptive = provider.adaptive
        status = outcome.status
        if adaptive is None or status is None or ticket is None:
            return
        gate = provider.gate
        limited = gate.waiting > 0  # requests wait for this provider's limit (not for -c, nor the input)
        if status in THROTTLE_STATUSES:
            changed = adaptive.throttled(ticket, latency=outcome.latency, in_flight=provider.out, limited=limited)
        elif 200 <= status < 300:
            changed = adaptive.served(ticket, latency=outcome.latency, limited=limited, growing=not self.draining)
        else:
            return
        if changed:
            gate.set_limit(adaptive.value)

    # -- answers -------------------------------------------------------------------------------

    def answer_of(self, req: Request, route: Route, o: Outcome) -> Answer:
        """The line an outcome becomes (and, for a 2xx, its usage, provider and cost recorded)."""
        status = o.status
        request_id = o.request_id or "req_" + os.urandom(12).hex()
        if status is not None and 200 <= status < 300 and o.parsed is not None:
            if route.adapt is not None:
                adapted = route.adapt(o.parsed, req)
                body: orjson.Fragment | dict[str, Any] = adapted
                usage_of: object = adapted
            else:
                # Pass the provider's bytes through unchanged, unless pretty-printed (newlines would
                # break JSONL): then re-serialize.
                if b"\n" in o.body or b"\r" in o.body:
                    assert isinstance(o.parsed, dict)
                    body = o.parsed
                else:
                    body = orjson.Fragment(o.body)
                usage_of = o.parsed
            self.account(req, route, o, usage_of)
            return Success(status, request_id, body, usage_tokens(usage_of))
        if status is None:
            return NoAnswer(o.error_code or "connection_error", o.error_message or "")
        if 200 <= status < 300:
            snippet = o.body[:200].decode("utf-8", "replace")
            return NoAnswer("invalid_response",
                            f"the provider answered HTTP {status} with a body that is not a JSON object: {snippet!r}")
        return Failure(status, request_id, error_body(status, o))

    def account(self, req: Request, route: Route, o: Outcome, usage_of: object) -> None:
        """A 2xx answer (or a packed request's share of one): usage, the serving provider, cost and cache."""
        self.stats.add_usage(usage_of)
        self.stats.providers[o.provider or "unknown"] += 1
        if isinstance(usage_of, dict):
            self.hooks.answered(req, route, o, usage_of)

    def concurrency_now(self) -> dict[str, int]:
        """The live limit per provider (what the adaptive limit allows right now)."""
        return {name: p.gate.limit for name, p in self._named().items()}

    def pace_now(self) -> dict[str, float]:
        """The learned pace (requests per second) of each provider that showed a rate limit."""
        return {name: round(p.adaptive.rate, 1) for name, p in self._named().items()
                if p.adaptive is not None and p.adaptive.rate is not None}

    def _named(self) -> dict[str, ProviderLimit]:
        named: dict[int, str] = {}
        providers, learned = self.capacity.providers, self.capacity.learned
        for k, p in providers.items():  # a placeholder shared with a provider shows as the provider
            if k.startswith("auto:") and k[5:] in learned and learned[k[5:]] in providers:
                continue  # the model's provider is known (and listed): its placeholder only held early requests
            if id(p) not in named or named[id(p)].startswith("auto:"):
                named[id(p)] = k
        return {k: providers[k] for k in named.values()}
