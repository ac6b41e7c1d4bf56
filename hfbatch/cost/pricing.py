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

from ..errors import UsageError
from ..routing import POLICY_SUFFIXES, router_root, split_model
from ..storage import home, private_dir, read_json, write_json

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
    (atomic, 0600, with its fetch time); if that fails (OSError), the cached copy for the same url (with an
    "offline" note); else an empty Catalog (source 'none') with a note. Never raises for network problems."""
    if prices_file:
        return Catalog.from_file(prices_file)
    try:
        obj = await get_json(url)
        models = _parse_models(obj)
        why = "the answer is not a model list" if models is None else ""
    except OSError as e:  # the fetch failed (Transport.get_json): the cache; anything else is a bug
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
