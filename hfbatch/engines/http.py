"""The HTTP engine: pending requests -> the router or an OpenAI-compatible server, through the executor.

While the input is scanned (the engine is entered first) the price list loads and the first wave's
connections open. `run` builds the routing, the limits and the accounting hooks (response cache,
cost ledger, budget) and lets the executor answer every request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

from ..config import RunConfig, env_float

if TYPE_CHECKING:
    from ..cache import AsyncCache
from ..cost.estimate import DEFAULT_MAX_OUTPUT, estimate_tokens
from ..cost.pricing import Catalog, default_cache_path, load_catalog, models_url, request_cost
from ..cost.spend import Budget, CostLedger
from ..executor import Executor, Limits
from ..http.transport import Transport
from ..limits import Capacity, StopControl
from ..models import Outcome, Request, StopReason, Success
from ..retry import RetryPolicy
from ..routing import Route, Router, router_root
from ..summary import usage_tokens
from .base import Work


def first_limit(concurrency: int, base_url: str | None) -> int:
    """Where each provider's AIMD limit starts. The router's providers are shared and their limits
    unknown: 64, doubling per round trip. A --base-url server is yours and -c is your number for it:
    start there (a 429/503 still shrinks it)."""
    return concurrency if base_url else min(concurrency, 64)


class HttpEngine:
    """Requests over HTTP: the Hugging Face router, or any OpenAI-compatible server (--base-url)."""

    name = "http"
    remote = False

    def __init__(self, cfg: RunConfig, *, input_size: int, capacity: Capacity | None = None,
                 warm: bool = True, budget: Callable[[float, CostLedger], Budget] = Budget) -> None:
        self.cfg, self.capacity, self.warm = cfg, capacity, warm
        self.budget = budget  # how --budget is kept: here, or a share of a cluster's (the Ray engine's workers)
        self.hooks: Accounting | None = None
        # A batch line is at least ~100 bytes: never more connections than the file can use.
        self.connections = max(1, min(first_limit(cfg.concurrency, cfg.base_url), input_size // 100))
        headers = {"X-HF-Bill-To": cfg.bill_to} if cfg.bill_to else {}
        self.transport = Transport(cfg.concurrency, cfg.timeout, cfg.token, headers,
                                   max_response_bytes=cfg.max_response_bytes)
        self._catalog: asyncio.Task[Catalog] | None = None
        self._connect: asyncio.Task[None] | None = None
        self._executor: Executor | None = None

    async def __aenter__(self) -> HttpEngine:
        await self.transport.__aenter__()
        if self.warm:
            self._catalog = asyncio.create_task(self._load_catalog())
            url = self.cfg.base_url or router_root()
            self._connect = asyncio.create_task(self.transport.prewarm(url, self.connections))
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        for task in (self._catalog, self._connect):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._catalog, self._connect):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        await self.transport.__aexit__(t, e, tb)

    async def _load_catalog(self) -> Catalog:
        """Prices for this run: the router's catalog (its cache when offline), the server's, or --prices."""
        url = models_url(self.cfg.base_url)
        return await load_catalog(self.transport.get_json, url, default_cache_path(url), self.cfg.prices)

    def live(self) -> dict[str, int]:
        return self._executor.concurrency_now() if self._executor is not None else {}

    async def run(self, work: Work) -> None:
        cfg, stats = self.cfg, work.stats
        if self._catalog is None:
            self._catalog = asyncio.create_task(self._load_catalog())
        spend = CostLedger(await self._catalog)
        stored_cost = ((work.stored or {}).get("hfbatch") or {}).get("cost")
        if stored_cost:
            spend.load(stored_cost)
        stats.cost = spend
        router = Router(cfg.base_url, route_suffix=cfg.route, max_tokens=cfg.max_tokens,
                        estimate=_booked_tokens if cfg.tpm else None,
                        default_max_tokens=DEFAULT_MAX_OUTPUT if cfg.budget is not None else None)
        hooks = self.hooks = Accounting(spend, work.stop, server=cfg.base_url or "router",
                                        budget=self.budget(cfg.budget, spend) if cfg.budget is not None else None,
                                        cache=await _open_cache() if cfg.cache else None)
        limits = Limits(concurrency=cfg.concurrency, rpm=cfg.rpm, tpm=cfg.tpm, adapt=cfg.adapt,
                        fallback=cfg.fallback, coalesce=cfg.coalesce,
                        start=first_limit(cfg.concurrency, cfg.base_url))
        executor = self._executor = Executor(
            transport=self.transport, router=router, answers=work.answers, stats=stats, stop=work.stop,
            limits=limits, policy=RetryPolicy(max_attempts=cfg.max_attempts, base=env_float("HFBATCH_RETRY_BASE", 0.5)),
            dedupe_keys=work.duplicates or None, hooks=hooks, capacity=self.capacity,
        )
        try:
            await executor.run(work.requests)
        finally:
            await hooks.aclose()
            stats.saved_usd = hooks.saved_usd
            stats.capped = router.capped
            stats.concurrency = executor.concurrency_now()
            stats.pace = executor.pace_now()
        if executor.internal_errors:
            raise executor.internal_errors[0]


async def _open_cache() -> AsyncCache:
    from ..cache import AsyncCache, default_path  # only with --cache: sqlite3 and threads stay out of a plain run

    return await AsyncCache.open(default_path())


def _booked_tokens(body: dict[str, Any], url: str) -> int:
    """What --tpm books before a request: the prompt estimate plus the output cap (estimate.py's rules)."""
    inp, out = estimate_tokens(body, url)
    return inp + out


class Accounting:
    """The executor's hooks for an HTTP run (executor.RunHooks): the response cache (--cache), the cost
    ledger, and the budget gate (--budget)."""

    def __init__(self, ledger: CostLedger, stop: StopControl, *, server: str, budget: Budget | None = None,
                 cache: AsyncCache | None = None) -> None:
        self.ledger, self.stop, self.budget, self.cache = ledger, stop, budget, cache
        self.server = server  # cache answers per server: the router and a local vLLM differ
        self.caching = cache is not None
        self.budgeted = budget is not None
        self.saved_usd = 0.0
        self._released = asyncio.Event()

    def _key(self, req: Request) -> bytes:
        from ..cache import request_key

        return request_key(self.server + req.url, req.body)

    async def cached(self, req: Request) -> Success | None:
        if self.cache is None:
            return None
        hit = await self.cache.get(self._key(req))  # SQLite in a worker thread: never on the event loop
        if hit is None:
            return None
        return Success(hit.status, f"cached_{hit.created_at}", orjson.Fragment(hit.body),
                       (hit.input_tokens, hit.output_tokens))

    async def reserve(self, req: Request, route: Route) -> float | None:
        """Book the worst-case cost of one attempt under --budget; None: the budget is reached (the run
        is stopped). Waits while in-flight requests settle if that could make room."""
        budget = self.budget
        if budget is None:
            return 0.0
        body = route.body if route.body is not None else req.body
        inp, out = estimate_tokens(body, req.url, conservative=True)
        worst = self.ledger.worst_case(route.model or req.model, inp, out)
        while not budget.try_reserve(worst):
            if worst is None or not budget.can_ever_fit(worst) or not budget.may_free():
                why = ("a request's cost cannot be bounded (its model has no known price)" if worst is None
                       else f"budget reached: estimated spend ${self.ledger.spent:.6f} of ${budget.limit:g}")
                self.stop.stop(StopReason.BUDGET, f"{why}. Rerun the same command with a larger --budget: only "
                               "the requests not sent yet will be")
                return None
            released = self._released
            await released.wait()
            if self.stop.reason is not None:
                return None
        return worst

    def release(self, amount: float) -> None:
        if self.budget is not None and amount:
            self.budget.release(amount)
            self.room()

    def room(self) -> None:
        """The budget may have room now (a reservation settled, or a shared budget's share grew): waiters try again."""
        self._released.set()
        self._released = asyncio.Event()

    def answered(self, req: Request, route: Route, outcome: Outcome, body: dict[str, Any]) -> None:
        inp, out = usage_tokens(body)
        self.ledger.add(route.model or req.model, outcome.provider, inp, out)
        if self.cache is not None and outcome.status is not None:
            raw = outcome.body if route.adapt is None else orjson.dumps(body)
            if b"\n" in raw:
                raw = orjson.dumps(body)
            self.cache.put(self._key(req), req.url, req.model, outcome.status, raw, inp, out)

    def saved(self, req: Request, tokens: tuple[int, int]) -> None:
        catalog = self.ledger.catalog
        base, pinned = catalog.split(req.model)
        provider = pinned or catalog.implied_provider(req.model)[0]
        cost = request_cost(catalog.price(base, provider) if provider else None, *tokens)
        self.saved_usd += cost or 0.0

    async def aclose(self) -> None:
        if self.cache is not None:
            await self.cache.aclose()

