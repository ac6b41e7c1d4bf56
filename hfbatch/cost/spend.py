"""Cost stage: answered requests' usage + the price catalog -> spend per model and provider; the budget gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .pricing import _UNPRICED_TAIL, Catalog, request_cost, round_usd


@dataclass(slots=True)
class _Row:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    priced: bool = True


class CostLedger:
    """Running spend of a batch, per (model without suffix, provider): requests, tokens and cost_usd.

    A (model, provider) with no known price keeps cost_usd None and its requests count as `unpriced_requests`;
    the total covers the priced ones. Record only answered (2xx) requests: failed ones are not billed.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.spent = 0.0  # total known cost so far (USD)
        self.unpriced_requests = 0
        self.notes: list[str] = []
        self._rows: dict[tuple[str, str], _Row] = {}

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def add(self, model: str, provider_header: str | None, input_tokens: int, output_tokens: int) -> float | None:
        """Record one answered request; provider = header, else the :provider suffix, else the implied one
        (noted once). Returns its cost, None if unpriced."""
        base, pinned = self.catalog.split(model)
        provider = provider_header or pinned
        if not provider:
            provider, why = self.catalog.implied_provider(model)
            if why:
                self.note(why)
        price = self.catalog.price(base, provider) if provider else None
        if price is None and provider:
            self.note(f"{base} on {provider}: no price in the price list, its cost is unknown"
                      + (" (hf-inference bills compute time, not tokens)" if provider == "hf-inference" else ""))
        cost = request_cost(price, input_tokens, output_tokens)
        row = self._rows.setdefault((base, provider or "unknown"), _Row())
        row.requests += 1
        row.input_tokens += input_tokens
        row.output_tokens += output_tokens
        if cost is None:
            row.priced = False
            self.unpriced_requests += 1
        else:
            row.cost += cost
            self.spent += cost
        return cost

    def worst_case(self, model: str, input_tokens: int, max_output_tokens: int) -> float | None:
        """Upper bound of one unsent request: the pinned provider's cost, else the max over the model's priced
        providers (the router may pick any). None when no price bounds it."""
        base, pinned = self.catalog.split(model)
        if pinned:
            return request_cost(self.catalog.price(base, pinned), input_tokens, max_output_tokens)
        costs = [request_cost(p.price, input_tokens, max_output_tokens) for p in self.catalog.providers(base)]
        known = [c for c in costs if c is not None]
        return max(known) if known else None

    def load(self, summary: dict[str, Any]) -> None:
        """Resume: fold a previous summary() (same batch) back in, so spend and budget continue from it."""
        for model, provs in (summary.get("by_model") or {}).items():
            for prov, r in provs.items():
                row = self._rows.setdefault((model, prov), _Row())
                row.requests += int(r.get("requests", 0))
                row.input_tokens += int(r.get("input_tokens", 0))
                row.output_tokens += int(r.get("output_tokens", 0))
                if r.get("cost_usd") is None:
                    row.priced = False
                else:
                    row.cost += float(r["cost_usd"])
                    self.spent += float(r["cost_usd"])
        self.unpriced_requests += int(summary.get("unpriced_requests", 0))
        for n in summary.get("notes") or []:
            if n not in self.catalog.notes and not n.endswith(_UNPRICED_TAIL):
                self.note(n)

    def summary(self) -> dict[str, Any]:
        """JSON-able cost report (put it under the batch object's "hfbatch"); every figure is an estimate."""
        by_model: dict[str, dict[str, Any]] = {}
        saved = extra = 0.0
        for (model, prov), r in self._rows.items():
            by_model.setdefault(model, {})[prov] = {
                "requests": r.requests, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
                "cost_usd": round_usd(r.cost) if r.priced else None}
            alts = [c for p in self.catalog.providers(model)
                    if (c := request_cost(p.price, r.input_tokens, r.output_tokens)) is not None]
            if r.priced and alts:
                saved += max(0.0, max(alts) - r.cost)
                extra += max(0.0, r.cost - min(alts))
        notes = [*self.catalog.notes, *self.notes]
        if self.unpriced_requests:
            notes.append(f"{self.unpriced_requests} request(s){_UNPRICED_TAIL}")
        priced_any = any(r.priced for r in self._rows.values())
        return {
            "estimated_cost_usd": round_usd(self.spent) if priced_any or not self.unpriced_requests else None,
            "currency": "USD", "is_estimate": True, "by_model": by_model,
            "unpriced_requests": self.unpriced_requests,
            "savings": {"vs_most_expensive_usd": round_usd(saved), "above_cheapest_usd": round_usd(extra)},
            "price_source": self.catalog.source, "prices_fetched_at": self.catalog.fetched_at, "notes": notes,
        }


class Budget:
    """Pure gate (no I/O) for --budget: try_reserve(worst case) before starting a request, then, when it ends,
    ledger.add(actual) and release(the reserved amount) with no await in between.

    Invariant: ledger.spent + reserved <= limit_usd whenever each request costs at most its reservation."""

    def __init__(self, limit_usd: float, ledger: CostLedger) -> None:
        self.limit, self.ledger = limit_usd, ledger
        self.reserved = 0.0
        self._open = 0

    def try_reserve(self, amount: float | None) -> bool:
        """Reserve `amount` USD; False (nothing reserved) if spent + reserved + amount > limit or amount is None
        (a cost no price bounds is never sent under --budget; RunHooks.reserve says why when it stops the run)."""
        if amount is None or self.ledger.spent + self.reserved + amount > self.limit:
            return False
        self.reserved += amount
        self._open += 1
        return True

    def can_ever_fit(self, amount: float | None) -> bool:
        """Could `amount` fit once everything in flight has settled? False: the budget is reached for it."""
        return amount is not None and self.ledger.spent + amount <= self.limit

    def may_free(self) -> bool:
        """Could waiting make room (reservations here that will settle)? False: a request that does not fit now
        never will, and the run stops. (A budget shared with other processes says True while they hold some.)"""
        return self.reserved > 0

    def release(self, amount: float | None) -> None:
        """Drop a reservation made by a successful try_reserve (the request ended, answered or not)."""
        if amount is None or self._open == 0:
            return
        self._open -= 1
        self.reserved = 0.0 if self._open == 0 else max(0.0, self.reserved - amount)
