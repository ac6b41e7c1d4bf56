"""Cost stage: /v1/models prices (or --prices FILE) + token usage -> estimated USD per request, ledger, budget."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .errors import UsageError
from .providers import POLICY_SUFFIXES, router_root, split_model
from .state import home, private_dir, read_json, write_json

PER_TOKENS = 1_000_000  # prices are USD per 1M tokens
_UNPRICED_TAIL = " have no known price: the total covers the others"


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens."""

    input: float
    output: float


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """One provider of a model, as the price list describes it (every field but the id may be unknown)."""

    provider: str
    price: Price | None
    throughput: float | None  # output tokens/s, the router's :fastest criterion
    latency_ms: float | None  # first-token latency
    status: str | None  # "live" | "error"


def request_cost(price: Price | None, input_tokens: int, output_tokens: int) -> float | None:
    """USD of one request: prompt tokens x input price + completion tokens x output price; None when unpriced."""
    if price is None:
        return None
    return (input_tokens * price.input + output_tokens * price.output) / PER_TOKENS


def round_usd(x: float) -> float:
    """A reported USD figure: 10 decimals (HF bills in nano-USD), no float noise like 0.30000000000000004."""
    return round(x, 10)


def usage_tokens(body: Any) -> tuple[int, int]:
    """(input, output) tokens of a 2xx answer's `usage` (chat, responses, completions, embeddings); 0 if absent."""
    u = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(u, dict):
        return 0, 0
    i, o = u.get("prompt_tokens", u.get("input_tokens")), u.get("completion_tokens", u.get("output_tokens"))
    return (i if isinstance(i, int) and i > 0 else 0), (o if isinstance(o, int) and o > 0 else 0)


def models_url(base_url: str | None) -> str:
    """Where the price list lives: `<base_url>/models` with --base-url, else the router's `/v1/models`."""
    return base_url.rstrip("/") + "/models" if base_url else router_root() + "/v1/models"


def default_cache_path(url: str) -> Path:
    """$HFBATCH_HOME/prices.json for the router's list; prices-<hash>.json for any other server's."""
    if url == router_root() + "/v1/models":
        return home() / "prices.json"
    return home() / f"prices-{hashlib.sha256(url.encode()).hexdigest()[:12]}.json"


def iso(ts: int | None) -> str:
    return "unknown time" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(v: Any) -> float | None:
    """A finite, non-negative JSON number, else None."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        return None
    return float(v)


def _parse_models(obj: Any) -> dict[str, list[ProviderInfo]] | None:
    """The /v1/models shape ({"data": [...]} or the bare list) -> model -> providers; None if not that shape."""
    data = obj.get("data") if isinstance(obj, dict) else obj
    if not isinstance(data, list):
        return None
    models: dict[str, list[ProviderInfo]] = {}
    for m in data:
        if not isinstance(m, dict) or not isinstance(m.get("id"), str):
            continue
        infos = []
        for p in m.get("providers") or []:
            if not isinstance(p, dict) or not isinstance(p.get("provider"), str):
                continue
            pr, price = p.get("pricing"), None
            if isinstance(pr, dict) and (i := _num(pr.get("input"))) is not None and (
                    o := _num(pr.get("output"))) is not None:
                price = Price(i, o)
            status = p.get("status") if isinstance(p.get("status"), str) else None
            infos.append(ProviderInfo(p["provider"], price, _num(p.get("throughput")),
                                      _num(p.get("first_token_latency_ms")), status))
        models[m["id"]] = infos
    return models


def _parse_map(obj: dict[str, Any], path: str) -> dict[str, list[ProviderInfo]]:
    """{model: {provider: {input, output[, throughput]}}} -> model -> providers; UsageError on any bad entry."""
    models: dict[str, list[ProviderInfo]] = {}
    for model, provs in obj.items():
        if not isinstance(provs, dict) or not provs:
            raise UsageError(f"--prices {path}: {model!r} must map provider names to {{\"input\": <USD per 1M "
                             "tokens>, \"output\": <USD per 1M tokens>}")
        infos = []
        for prov, p in provs.items():
            i = _num(p.get("input")) if isinstance(p, dict) else None
            o = _num(p.get("output")) if isinstance(p, dict) else None
            if i is None or o is None:
                raise UsageError(f"--prices {path}: {model!r} / {prov!r} needs numbers \"input\" and \"output\" "
                                 "(USD per 1M tokens, >= 0)")
            infos.append(ProviderInfo(prov, Price(i, o), _num(p.get("throughput")), None, None))
        models[model] = infos
    return models


class Catalog:
    """model (without suffix) -> list[ProviderInfo] in catalog order.

    `source` is 'router' (fetched now), 'cache' (an earlier fetch, used offline), 'file' (--prices) or 'none';
    `fetched_at` the unix time of the fetch (None for files and 'none'); `notes` what a report should say.
    """

    def __init__(self, models: dict[str, list[ProviderInfo]], source: str, fetched_at: int | None = None,
                 notes: list[str] | None = None) -> None:
        self.models, self.source, self.fetched_at = models, source, fetched_at
        self.notes: list[str] = list(notes or [])

    @classmethod
    def from_models_json(cls, obj: Any, source: str, fetched_at: int | None) -> Catalog:
        """The /v1/models shape (malformed entries are skipped; a wrong shape gives an empty catalog and a note)."""
        models = _parse_models(obj)
        if models is None:
            return cls({}, source, fetched_at, ["the price list is not a /v1/models answer: costs are unknown"])
        return cls(models, source, fetched_at)

    @classmethod
    def from_file(cls, path: str) -> Catalog:
        """--prices FILE: the /v1/models shape or {model: {provider: {input, output}}}; UsageError if unusable."""
        try:
            obj = orjson.loads(Path(path).read_bytes())
        except OSError as e:
            raise UsageError(f"--prices {path}: cannot read it ({e.strerror or e})") from None
        except orjson.JSONDecodeError:
            raise UsageError(f"--prices {path}: not a JSON file") from None
        models = _parse_models(obj) if isinstance(obj, list) or (isinstance(obj, dict) and "data" in obj) else None
        if models is None:
            if not isinstance(obj, dict) or "data" in obj:
                raise UsageError(f"--prices {path}: expected a /v1/models answer or "
                                 "{model: {provider: {\"input\": x, \"output\": y}}} (USD per 1M tokens)")
            models = _parse_map(obj, path)
        if not models:
            raise UsageError(f"--prices {path}: it lists no models")
        return cls(models, "file", None, [f"prices from {path}"])

    def split(self, model: str) -> tuple[str, str | None]:
        """(catalog model, pinned provider | None); a name listed as is (e.g. `llama3:8b`) is not split."""
        return (model, None) if model in self.models else split_model(model)

    def policy(self, model: str) -> str:
        """'pinned', or the routing policy of the suffix: 'fastest' (also no suffix), 'cheapest', 'preferred'."""
        base, pinned = self.split(model)
        if pinned:
            return "pinned"
        suffix = model[len(base) + 1:]
        return suffix if suffix in POLICY_SUFFIXES else "fastest"

    def providers(self, model: str) -> list[ProviderInfo]:
        """The model's providers in catalog order ([] if unlisted); a `:suffix` on `model` is ignored."""
        return self.models.get(self.split(model)[0], [])

    def price(self, model: str, provider: str | None) -> Price | None:
        """`provider`'s price for `model`; provider None: the pinned suffix, else the implied provider."""
        if provider is None:
            provider = self.implied_provider(model)[0]
        return next((p.price for p in self.providers(model) if p.provider == provider), None)

    def fastest(self, model: str) -> str | None:
        """What :fastest picks: the highest throughput among live providers, else the first listed."""
        live = [p for p in self.providers(model) if p.status != "error"] or self.providers(model)
        fast = [p for p in live if p.throughput is not None]
        return max(fast, key=lambda p: p.throughput or 0.0).provider if fast else (live[0].provider if live else None)

    def implied_provider(self, model: str) -> tuple[str | None, str | None]:
        """(provider, note) for a request the router answered without naming its provider.

        Pinned `:provider` -> (it, None). `:cheapest` -> lowest output price; `:fastest` / no suffix -> highest
        throughput, else first listed; `:preferred` -> first listed (the user's order is not visible to us).
        Providers with status "error" are passed over while another is live. Unlisted model -> (None, note).
        """
        base, pinned = self.split(model)
        if pinned:
            return pinned, None
        infos = self.models.get(base, [])
        if not infos:
            return None, f"{base} is not in the price list ({self.source}): its cost is unknown"
        live = [p for p in infos if p.status != "error"] or infos
        policy = self.policy(model)
        priced = [p for p in live if p.price is not None]
        if policy == "cheapest" and priced:
            pick = min(priced, key=lambda p: (p.price.output, p.price.input) if p.price else (0.0, 0.0)).provider
            why = "the lowest output price, as :cheapest routes"
        elif policy == "cheapest":
            pick, why = live[0].provider, "the first listed: no provider lists a price"
        elif policy == "preferred":
            pick, why = live[0].provider, "the first listed: :preferred follows your order on hf.co, not visible here"
        else:
            pick = self.fastest(model) or live[0].provider
            why = ("the highest throughput listed, as :fastest routes" if any(p.throughput for p in live)
                   else "the first listed (the price list gives no throughput)")
        return pick, f"{model}: provider not reported, assumed {pick} ({why})"

    def to_json(self) -> dict[str, Any]:
        """The /v1/models shape (what from_models_json reads back) plus source and fetched_at."""
        def entry(p: ProviderInfo) -> dict[str, Any]:
            e: dict[str, Any] = {"provider": p.provider, "status": p.status, "throughput": p.throughput,
                                 "first_token_latency_ms": p.latency_ms}
            if p.price is not None:
                e["pricing"] = {"input": p.price.input, "output": p.price.output}
            return e
        return {"object": "list", "source": self.source, "fetched_at": self.fetched_at,
                "data": [{"id": m, "object": "model", "providers": [entry(p) for p in ps]}
                         for m, ps in self.models.items()]}


async def load_catalog(get_json: Callable[[str], Awaitable[Any]], url: str, cache_path: Path,
                       prices_file: str | None) -> Catalog:
    """The run's prices: `prices_file` if given (UsageError if bad); else GET `url` with `get_json` and cache it
    (atomic, 0600, with its fetch time); if that fails, the cached copy for the same url (with an "offline" note);
    else an empty Catalog (source 'none') with a note. Never raises for network problems."""
    if prices_file:
        return Catalog.from_file(prices_file)
    try:
        obj = await get_json(url)
        models = _parse_models(obj)
        why = "the answer is not a model list" if models is None else ""
    except Exception as e:  # noqa: BLE001 - any fetch failure falls back to the cache
        models, why = None, (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:200]
    if models is not None:
        cat = Catalog(models, "router", int(time.time()))
        try:
            private_dir(cache_path.parent)
            write_json(cache_path, {**cat.to_json(), "url": url})
        except OSError as e:
            cat.notes.append(f"could not cache the prices in {cache_path}: {e.strerror or e}")
        return cat
    cached = _read_cache(cache_path, url)
    if cached is not None:
        cached.notes.append(f"offline: prices from the cache fetched at {iso(cached.fetched_at)} ({url}: {why})")
        return cached
    return Catalog({}, "none", None, [f"no prices: {url} failed ({why}) and nothing is cached; costs are unknown "
                                      "(pass --prices FILE)"])


def _read_cache(path: Path, url: str) -> Catalog | None:
    try:
        obj = read_json(path)
    except (OSError, orjson.JSONDecodeError):
        return None
    models = _parse_models(obj) if isinstance(obj, dict) and obj.get("url") == url else None
    if models is None:
        return None
    ts = obj.get("fetched_at")
    return Catalog(models, "cache", ts if isinstance(ts, int) else None)


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
        self.refused = 0
        self.notes: list[str] = []
        self._open = 0

    @property
    def remaining(self) -> float:
        return self.limit - self.ledger.spent - self.reserved

    def try_reserve(self, amount: float | None) -> bool:
        """Reserve `amount` USD; False (nothing reserved) if spent + reserved + amount > limit or amount is None."""
        if amount is None:
            self.refused += 1
            note = "a request's cost cannot be bounded (no price): under --budget it is not sent"
            if note not in self.notes:
                self.notes.append(note)
            return False
        if self.ledger.spent + self.reserved + amount > self.limit:
            self.refused += 1
            return False
        self.reserved += amount
        self._open += 1
        return True

    def can_ever_fit(self, amount: float | None) -> bool:
        """Could `amount` fit once everything in flight has settled? False: the budget is reached for it."""
        return amount is not None and self.ledger.spent + amount <= self.limit

    def release(self, amount: float | None) -> None:
        """Drop a reservation made by a successful try_reserve (the request ended, answered or not)."""
        if amount is None or self._open == 0:
            return
        self._open -= 1
        self.reserved = 0.0 if self._open == 0 else max(0.0, self.reserved - amount)
