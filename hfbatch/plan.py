"""Plan stage: the input file -> counts, strict-mode errors, duplicate-request groups; and the per-request
hooks (response cache, cost ledger, budget gate) the executor calls around each request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson

from .fingerprints import ExactIds, FingerprintIds, RepeatFinder, canonical_request, request_fingerprint
from .models import LineError, Request
from .reader import iter_lines
from .summary import MAX_REPORTED_ERRORS, usage_tokens
from .validate import validate_line


@dataclass
class InputPlan:
    total: int = 0  # non-blank lines
    errors: list[LineError] = field(default_factory=list)
    errors_dropped: int = 0
    duplicates: dict[int, int] = field(default_factory=dict)  # request fingerprint -> occurrences (>= 2)
    repeated_ids: set[int] = field(default_factory=set)  # custom_id fingerprints seen more than once

    def unique_ids(self) -> ExactIds:
        """The exact custom_id check for another pass over the same file, in this process."""
        return ExactIds(self.repeated_ids)


def scan_input(path: str, *, strict: bool, dedupe: bool, pass_through: bool, endpoint: str | None,
               ids: bool = False) -> InputPlan:
    """One streaming pass over the input. Strict: collect every invalid line (OpenAI validates the
    whole file before running anything). Dedupe: find requests (endpoint + body) that occur more
    than once. `ids` (implied by strict): find the custom_ids used more than once, for the run's own
    check (--skip-invalid).

    Memory does not grow with the file: fingerprints go through an external sort (repeats.py). Only
    when some custom_id fingerprint repeats (a duplicate, or a 1-in-10^8 collision) does strict mode
    read the file a second time to name the duplicate lines exactly."""
    plan = InputPlan()
    seen = FingerprintIds() if (strict or ids) else None
    keys = RepeatFinder() if dedupe else None
    parse = strict or dedupe or ids
    errors = _Errors(plan) if strict else None
    with open(path, "rb") as f:
        for line_no, raw in iter_lines(f):
            plan.total += 1
            if not parse:
                continue
            r = validate_line(line_no, raw, seen, pass_through=pass_through, endpoint=endpoint)
            if isinstance(r, LineError):
                if errors is not None:
                    errors.add(r)
                continue
            if keys is not None:
                keys.add(request_fingerprint(canonical_request(r.url, r.body)))
    if seen is not None:
        plan.repeated_ids = seen.repeats()
    if keys is not None:
        plan.duplicates = keys.repeats()
    if errors is not None and plan.repeated_ids:
        # Name the duplicates exactly: a second pass that checks ids in file order (an invalid line
        # still claims its id, and a line's duplicate id is its error, as in OpenAI).
        plan.errors, plan.errors_dropped = [], 0
        errors = _Errors(plan)
        exact = plan.unique_ids()
        with open(path, "rb") as f:
            for line_no, raw in iter_lines(f):
                r = validate_line(line_no, raw, exact, pass_through=pass_through, endpoint=endpoint)
                if isinstance(r, LineError):
                    errors.add(r)
    if plan.total == 0:
        plan.errors.append(LineError(0, None, "empty_file", "The input file is empty. Please ensure "
                                     "that the batch contains at least one request."))
    return plan


class _Errors:
    """Strict mode's error list: the first MAX_REPORTED_ERRORS, then a count."""

    def __init__(self, plan: InputPlan) -> None:
        self.plan = plan

    def add(self, e: LineError) -> None:
        if len(self.plan.errors) < MAX_REPORTED_ERRORS:
            self.plan.errors.append(e)
        else:
            self.plan.errors_dropped += 1


class RunHooks:
    """What the executor asks around each request: a cached answer? may it start (budget)? what did it
    cost? Every part is optional."""

    def __init__(self, *, cache: Any = None, server: str = "router", ledger: Any = None, budget: Any = None,
                 stop: Any = None) -> None:
        self.cache = cache
        self.server = server  # cache answers per server: the router and a local vLLM differ
        self.ledger = ledger  # cost.CostLedger
        self.budget = budget  # cost.Budget
        self.stop = stop
        self.saved_usd = 0.0
        self._released = asyncio.Event()

    def _key(self, req: Request) -> bytes:
        from .cache import request_key

        return request_key(self.server + req.url, req.body)

    def cached(self, req: Request) -> tuple[Any, ...] | None:
        if self.cache is None:
            return None
        hit = self.cache.get(self._key(req))
        if hit is None:
            return None
        return ("ok", hit.status, f"cached_{hit.created_at}", orjson.Fragment(hit.body),
                (hit.input_tokens, hit.output_tokens))

    async def reserve(self, req: Request, route: Any) -> float | None:
        """Book the worst-case cost of one attempt under --budget; None: the budget is reached (the run
        is stopped). Waits while in-flight requests settle if that could make room."""
        if self.budget is None:
            return 0.0
        from .cost.estimate import estimate_tokens

        body = route.body if route.body is not None else req.body
        inp, out = estimate_tokens(body, req.url, conservative=True)
        worst: float | None = self.ledger.worst_case(route.model or req.model, inp, out)
        while not self.budget.try_reserve(worst):
            if worst is None or not self.budget.can_ever_fit(worst) or self.budget.reserved <= 0:
                spent = self.ledger.spent
                why = ("a request's cost cannot be bounded (its model has no known price)" if worst is None
                       else f"budget reached: estimated spend ${spent:.6f} of ${self.budget.limit:g}")
                self.stop.stop("budget", f"{why}. Rerun the same command with a larger --budget: only the "
                               "requests not sent yet will be")
                return None
            released = self._released
            await released.wait()
            if self.stop.reason is not None:
                return None
        return worst

    def release(self, amount: float | None) -> None:
        if self.budget is not None and amount:
            self.budget.release(amount)
            self._released.set()
            self._released = asyncio.Event()

    def answered(self, req: Request, route: Any, outcome: Any, body: Any) -> None:
        """A 2xx answer: what it cost, and into the cache."""
        inp, out = usage_tokens(body)
        if self.ledger is not None:
            self.ledger.add(route.model or req.model, outcome.provider, inp, out)
        if self.cache is not None:
            raw = outcome.body if route.adapt is None else orjson.dumps(body)
            if b"\n" in raw:
                raw = orjson.dumps(body)
            self.cache.put(self._key(req), req.url, req.model, outcome.status, raw, inp, out)

    def saved(self, req: Request, tokens: tuple[int, int]) -> None:
        """A copy answered by dedupe or the cache: what it would have cost."""
        if self.ledger is None:
            return
        catalog = self.ledger.catalog
        base, pinned = catalog.split(req.model)
        provider = pinned or catalog.implied_provider(req.model)[0]
        from .cost.pricing import request_cost

        cost = request_cost(catalog.price(base, provider) if provider else None, *tokens)
        self.saved_usd += cost or 0.0

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
