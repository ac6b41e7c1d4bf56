"""Estimate stage: an input JSONL + a price Catalog -> token and cost estimates per model and provider, nothing sent.

Input tokens: a tokenizer.json already in the local huggingface_hub cache when `tokenizers` is installed
(never downloaded), else the chars/4 rule: (characters of the text + 3) // 4. The text is what the
endpoint reads: chat `messages[].content` (strings and text parts; also tool-call arguments), responses
`instructions` + `input`, embeddings / moderations `input`, completions `prompt` (token-id arrays are
counted as given), plus `tools` as JSON. Images and audio are not counted. Chat and responses add 4
tokens per message and 3 per request for the chat template.
Output tokens are bounded by max_completion_tokens / max_output_tokens / max_tokens (the largest given),
times `n`; without one: DEFAULT_MAX_OUTPUT (512) for chat and responses, 16 for /v1/completions (OpenAI's
default), 0 for embedding-like endpoints (embeddings, moderations, score, rerank, ...).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

import orjson

from ..errors import UsageError
from ..fingerprints import IdSet
from ..models import LineError
from ..reader import iter_lines
from ..routing import split_model
from ..validate import validate_line
from .pricing import Catalog, ProviderInfo, request_cost, round_usd

DEFAULT_MAX_OUTPUT = 512  # output-token bound of a chat / responses request that sets no max
COMPLETIONS_DEFAULT_MAX_OUTPUT = 16  # OpenAI's (and vLLM's) max_tokens default for /v1/completions
NO_OUTPUT_ENDPOINTS = frozenset({"embeddings", "moderations", "score", "rerank", "classify", "pooling",
                                 "tokenize", "detokenize", "generations", "edits", "videos"})  # last path segment
MESSAGE_OVERHEAD, REQUEST_OVERHEAD = 4, 3  # chat-template tokens per message and per request
_BODY_TEXT_KEYS = ("instructions", "messages", "input", "prompt", "query", "documents", "text_1", "text_2")
_PART_TEXT_KEYS = ("content", "text", "arguments", "output", "tool_calls", "function")
_NON_TEXT_PARTS = frozenset({"image_url", "input_image", "input_audio", "input_file", "image", "file", "audio"})
_MAX_DEPTH = 32


class ProviderEstimate(TypedDict):
    provider: str
    input_price: float | None  # USD per 1M tokens
    output_price: float | None
    cost_usd: float | None  # this model's requests on this provider (None: no price)
    fastest: bool
    status: str | None


class ModelEstimate(TypedDict):
    requests: int
    input_tokens: int
    max_output_tokens: int
    tokenizer: str  # "chars/4" or "local:<model>"
    policy: str
    expected_provider: str | None
    expected_usd: float | None
    providers: list[ProviderEstimate]  # cheapest first


class EstimateTotal(TypedDict):
    cheapest_usd: float | None
    most_expensive_usd: float | None
    expected_usd: float | None
    savings_usd: float | None
    priced_requests: int
    unpriced_requests: int


class Estimate(TypedDict):
    """`hfbatch estimate --json`: one object."""

    object: str  # "hfbatch.estimate"
    input_file: str
    requests: int
    invalid_lines: int
    first_errors: list[dict[str, Any]]
    endpoints: dict[str, int]
    models: dict[str, ModelEstimate]
    total: EstimateTotal
    price_source: str
    prices_fetched_at: int | None
    notes: list[str]
    is_estimate: bool


def _gather(v: Any, texts: list[str], depth: int = 0) -> tuple[int, bool]:
    """Append the text inside `v` to `texts`; returns (tokens given as token ids, saw a non-text part)."""
    if isinstance(v, str):
        texts.append(v)
        return 0, False
    if depth > _MAX_DEPTH:
        return 0, False
    ids, other = 0, False
    if isinstance(v, list):
        if v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return len(v), False
        for x in v:
            i, o = _gather(x, texts, depth + 1)
            ids, other = ids + i, other or o
    elif isinstance(v, dict):
        other = v.get("type") in _NON_TEXT_PARTS
        for k in _PART_TEXT_KEYS:
            if k in v:
                i, o = _gather(v[k], texts, depth + 1)
                ids, other = ids + i, other or o
    return ids, other


def output_bound(body: dict[str, Any], endpoint: str) -> tuple[int, bool]:
    """(upper bound of output tokens, True if a documented default was used because the body sets no max)."""
    given = [v for k in ("max_completion_tokens", "max_output_tokens", "max_tokens")
             if isinstance(v := body.get(k), int) and not isinstance(v, bool) and v >= 0]
    path = endpoint.rstrip("/")
    kind = path.rpartition("/")[2]
    if given:
        bound, defaulted = max(given), False
    elif kind in NO_OUTPUT_ENDPOINTS:
        return 0, False
    else:
        legacy = kind == "completions" and not path.endswith("/chat/completions")
        bound, defaulted = (COMPLETIONS_DEFAULT_MAX_OUTPUT if legacy else DEFAULT_MAX_OUTPUT), True
    n = max((v for k in ("n", "best_of") if isinstance(v := body.get(k), int) and not isinstance(v, bool)), default=1)
    return bound * max(n, 1), defaulted


def _input_texts(body: dict[str, Any], endpoint: str) -> tuple[list[str], int, int, bool]:
    """(texts, tokens given as ids, chat-template overhead, saw a non-text part)."""
    texts: list[str] = []
    ids, other = 0, False
    for key in _BODY_TEXT_KEYS:
        if key in body:
            i, o = _gather(body[key], texts)
            ids, other = ids + i, other or o
    if body.get("tools"):
        texts.append(orjson.dumps(body["tools"]).decode())
    msgs = body.get("messages")
    if not isinstance(msgs, list) and endpoint.endswith("/responses"):
        msgs = body.get("input")
        msgs = msgs if isinstance(msgs, list) else [msgs]
    overhead = REQUEST_OVERHEAD + MESSAGE_OVERHEAD * len(msgs) if isinstance(msgs, list) else 0
    return texts, ids, overhead, other


def estimate_tokens(body: dict[str, Any], endpoint: str, tokenizer: Callable[[str], int] | None = None, *,
                    conservative: bool = False) -> tuple[int, int]:
    """(input tokens estimate, output tokens upper bound) of one request body sent to `endpoint`.

    `tokenizer` counts a text's tokens (see find_local_tokenizer); None: chars/4. `conservative` counts
    UTF-8 bytes instead (a byte-level BPE token covers at least one byte), for --budget reservations.
    """
    inp, out, _, _ = _estimate(body, endpoint, tokenizer, conservative)
    return inp, out


def _estimate(body: dict[str, Any], endpoint: str, tokenizer: Callable[[str], int] | None,
              conservative: bool) -> tuple[int, int, bool, bool]:
    """(input tokens, output bound, output bound is a default, has non-text parts)."""
    texts, ids, overhead, non_text = _input_texts(body, endpoint)
    if conservative:
        counted = sum(len(t.encode("utf-8", "replace")) for t in texts)
    elif tokenizer is not None:
        counted = sum(tokenizer(t) for t in texts)
    else:
        counted = (sum(len(t) for t in texts) + 3) // 4
    out, defaulted = output_bound(body, endpoint)
    return ids + counted + overhead, out, defaulted, non_text


def find_local_tokenizer(model: str, cache_dir: str | None = None) -> Callable[[str], int] | None:
    """A token counter from `<repo>/tokenizer.json` in the local huggingface_hub cache, or None.

    Only when `tokenizers` is installed and the file is already cached: try_to_load_from_cache reads the
    cache directory and never touches the network. Any failure -> None (the caller falls back to chars/4).
    """
    repo = split_model(model)[0]
    try:
        if importlib.util.find_spec("tokenizers") is None:
            return None
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo, "tokenizer.json", cache_dir=cache_dir)
        if not isinstance(path, str):
            return None
        tok = importlib.import_module("tokenizers").Tokenizer.from_file(path)
    except Exception:  # noqa: BLE001 - a missing or broken tokenizer only means the chars/4 rule
        return None

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)
    return count


@dataclass(slots=True)
class _ModelAcc:
    requests: int = 0
    input_tokens: int = 0
    max_output_tokens: int = 0
    tokenizer: str = "chars/4"


def estimate_file(path: str, catalog: Catalog, *, pass_through: bool = False, endpoint: str | None = None,
                  local_tokenizers: bool = True) -> Estimate:
    """Validate and estimate a batch input file without sending anything; one JSON-able dict.

    Keys: object "hfbatch.estimate", input_file, requests, invalid_lines, first_errors (<= 5), endpoints
    {url: n}, models {model as written: {requests, input_tokens, max_output_tokens, tokenizer, policy,
    expected_provider, expected_usd, providers: [{provider, input_price, output_price, cost_usd|None,
    fastest, status}] cheapest first, unpriced last}}, total {cheapest_usd, most_expensive_usd,
    expected_usd, savings_usd, priced_requests, unpriced_requests}, price_source, prices_fetched_at,
    notes, is_estimate. A model pinned with :provider lists only that provider.
    """
    seen, accs, endpoints = IdSet(), dict[str, _ModelAcc](), Counter[str]()
    invalid, errors, defaulted, non_text = 0, list[dict[str, Any]](), 0, 0
    counters: dict[str, Callable[[str], int] | None] = {}
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for line_no, raw in iter_lines(f):
            r = validate_line(line_no, raw, seen, pass_through=pass_through, endpoint=endpoint)
            if isinstance(r, LineError):
                invalid += 1
                if len(errors) < 5:
                    errors.append({"line": r.line_no, "custom_id": r.custom_id, "code": r.code, "message": r.message})
                continue
            endpoints[r.url] += 1
            if r.model not in counters:
                counters[r.model] = find_local_tokenizer(r.model) if local_tokenizers else None
            acc = accs.get(r.model) or accs.setdefault(r.model, _ModelAcc(
                tokenizer="chars/4" if counters[r.model] is None else f"local:{catalog.split(r.model)[0]}"))
            inp, out, dflt, other = _estimate(r.body, r.url, counters[r.model], False)
            acc.requests += 1
            acc.input_tokens += inp
            acc.max_output_tokens += out
            defaulted += dflt
            non_text += other
    models: dict[str, ModelEstimate] = {}
    lo = hi = exp = 0.0
    priced = unpriced = 0
    unknown_expected: list[str] = []
    for model, a in accs.items():
        m = models[model] = _model_entry(model, a, catalog)
        costs = [p["cost_usd"] for p in m["providers"] if p["cost_usd"] is not None]
        if not costs:
            unpriced += a.requests
            continue
        priced += a.requests
        lo, hi = lo + min(costs), hi + max(costs)
        if m["expected_usd"] is None:
            unknown_expected.append(model)
        else:
            exp += m["expected_usd"]
    notes = list(catalog.notes)
    if accs and any(a.tokenizer == "chars/4" for a in accs.values()):
        notes.append("input tokens estimated as characters / 4 (no local tokenizer)")
    if defaulted:
        notes.append(f"{defaulted} request(s) set no max tokens: output bounded by the default "
                     f"({DEFAULT_MAX_OUTPUT} for chat/responses)")
    if non_text:
        notes.append(f"{non_text} request(s) contain images, audio or files: those inputs are not counted")
    if unpriced:
        notes.append(f"{unpriced} request(s) have no known price: the totals cover the others")
    if unknown_expected:
        notes.append(f"expected_usd leaves out {', '.join(unknown_expected)} (its likely provider has no price)")
    return {
        "object": "hfbatch.estimate", "input_file": path, "requests": sum(endpoints.values()),
        "invalid_lines": invalid, "first_errors": errors, "endpoints": dict(endpoints), "models": models,
        "total": {"cheapest_usd": round_usd(lo) if priced else None,
                  "most_expensive_usd": round_usd(hi) if priced else None,
                  "expected_usd": round_usd(exp) if priced else None,
                  "savings_usd": round_usd(hi - lo) if priced else None,
                  "priced_requests": priced, "unpriced_requests": unpriced},
        "price_source": catalog.source, "prices_fetched_at": catalog.fetched_at, "notes": notes, "is_estimate": True,
    }


def _model_entry(model: str, a: _ModelAcc, catalog: Catalog) -> ModelEstimate:
    base, pinned = catalog.split(model)
    infos = catalog.providers(base)
    if pinned:
        infos = [p for p in infos if p.provider == pinned] or [ProviderInfo(pinned, None, None, None, None)]
    fastest = catalog.fastest(base)
    rows: list[ProviderEstimate] = [{"provider": p.provider, "input_price": p.price.input if p.price else None,
             "output_price": p.price.output if p.price else None,
             "cost_usd": None if (c := request_cost(p.price, a.input_tokens, a.max_output_tokens)) is None
             else round_usd(c), "fastest": p.provider == fastest, "status": p.status} for p in infos]
    rows.sort(key=lambda r: (r["cost_usd"] is None, r["cost_usd"] or 0.0))
    expected = catalog.implied_provider(model)[0]
    return {"requests": a.requests, "input_tokens": a.input_tokens, "max_output_tokens": a.max_output_tokens,
            "tokenizer": a.tokenizer, "policy": catalog.policy(model), "expected_provider": expected,
            "expected_usd": next((r["cost_usd"] for r in rows if r["provider"] == expected), None),
            "providers": rows}


def run_estimate(path: str, *, base_url: str | None, prices: str | None, token: str | None,
                 endpoint: str | None = None) -> Estimate:
    """`hfbatch estimate`: fetch the price catalog (one GET, no inference) and estimate the file."""
    return estimate_file(path, fetch_catalog(base_url, prices, token), pass_through=base_url is not None,
                         endpoint=endpoint)


def fetch_catalog(base_url: str | None, prices: str | None, token: str | None) -> Catalog:
    """The price catalog (router, --base-url server or --prices file; the cache when offline)."""
    import asyncio

    from ..http.transport import Transport
    from .pricing import default_cache_path, load_catalog, models_url

    async def catalog() -> Catalog:
        async with Transport(1, 30.0, token) as t:
            url = models_url(base_url)
            return await load_catalog(t.get_json, url, default_cache_path(url), prices)

    return asyncio.run(catalog())


# -- serverless tokens or GPU minutes: `hfbatch estimate FILE --compare` --------------------------------

DEFAULT_CONCURRENCY = 32  # submit's -c: what the serverless wall time assumes


class CompareOption(TypedDict, total=False):
    engine: str  # "http" (serverless: the router) or "hf-jobs"
    provider: str  # http: the provider that serves every model of the file
    flavor: str  # hf-jobs: the Jobs hardware
    cost_usd: float | None
    minutes: float | None  # wall time (Jobs: one per model, in parallel)
    basis: str  # what the figures rest on


class SkippedFlavor(TypedDict):
    flavor: str
    why: str


class Comparison(TypedDict):
    """`hfbatch estimate FILE --compare --json`: the options cheapest first."""

    object: str  # "hfbatch.estimate.compare"
    input_file: str
    requests: int
    invalid_lines: int
    tokens: dict[str, int]  # per model: input estimate + output bound
    options: list[CompareOption]
    skipped_flavors: list[SkippedFlavor]
    notes: list[str]
    is_estimate: bool


def _serverless(est: Estimate, catalog: Catalog) -> list[CompareOption]:
    """One option per provider that prices every model of the file (else one "cheapest per model" mix)."""
    models = est["models"]
    if not models:
        return []
    per: dict[str, list[float]] = {}
    for m in models.values():
        for p in m["providers"]:
            if p["cost_usd"] is not None:
                per.setdefault(p["provider"], []).append(p["cost_usd"])
    out: list[CompareOption] = []
    for provider, costs in per.items():
        if len(costs) != len(models):
            continue
        minutes = _serverless_minutes(est, catalog, provider)
        out.append({"engine": "http", "provider": provider, "cost_usd": round_usd(sum(costs)), "minutes": minutes,
                    "basis": "tokens x the provider's price (prices: " + est["price_source"] + ")"
                             + ("" if minutes is not None else "; wall time unknown (no throughput listed)")})
    if not out and all(any(p["cost_usd"] is not None for p in m["providers"]) for m in models.values()):
        total = sum(min(p["cost_usd"] for p in m["providers"] if p["cost_usd"] is not None) for m in models.values())
        out.append({"engine": "http", "provider": "cheapest per model", "cost_usd": round_usd(total), "minutes": None,
                    "basis": "tokens x each model's cheapest provider (no provider serves every model)"})
    return out


def _serverless_minutes(est: Estimate, catalog: Catalog, provider: str) -> float | None:
    """Requests x (first-token latency + output / the provider's throughput), DEFAULT_CONCURRENCY at a time."""
    total = 0.0
    for model, m in est["models"].items():
        info = next((p for p in catalog.providers(model) if p.provider == provider), None)
        if info is None or not info.throughput:
            return None
        n = max(1, m["requests"])
        per_request = (info.latency_ms or 0.0) / 1000 + m["max_output_tokens"] / n / info.throughput
        total += n * per_request / min(DEFAULT_CONCURRENCY, n)
    return round(total / 60, 2)


def compare_file(est: Estimate, catalog: Catalog, flavors: list[Any], sizes: dict[str, Any],
                 notes: list[str] | None = None) -> Comparison:
    """The options for `est` (estimate_file's result): serverless per provider, and a Job per model on each
    flavor that fits every model (`flavors`: cost.gpu.Flavor; `sizes`: model -> cost.gpu.ModelSize)."""
    from .gpu import billed_minutes, estimate_run, fits, needs_gb

    tokens = {m: e["input_tokens"] + e["max_output_tokens"] for m, e in est["models"].items()}
    options = _serverless(est, catalog)
    skipped: list[SkippedFlavor] = []
    all_notes = list(est["notes"]) + list(notes or [])
    for flavor in flavors:
        cost, wall, bases, why = 0.0, 0.0, list[str](), ""
        for model, n in tokens.items():
            size = sizes[split_model(model)[0]]
            fit = fits(size, flavor)
            if fit is False:
                why = (f"{model} needs about {needs_gb(size):.0f} GB of GPU memory; {flavor.name} has "
                       f"{flavor.memory_gb:.0f}")
                break
            run = estimate_run(flavor, split_model(model)[0], size, n)
            if run.minutes is None:
                why = run.basis
                break
            cost += billed_minutes(run.minutes * 60) * flavor.usd_per_minute
            wall = max(wall, run.minutes)
            start = f"start-up {run.startup_seconds / 60:.1f} min (image pull + weights + engine start: a prior)"
            if run.basis.startswith("measured"):
                start = f"start-up {run.startup_seconds / 60:.1f} min (measured)"
            bases.append(f"{split_model(model)[0]}: {start}; {run.basis}" + ("" if fit else "; fit not checked "
                                                                                        "(no safetensors size)"))
        if why:
            skipped.append({"flavor": flavor.name, "why": why})
            continue
        options.append({"engine": "hf-jobs", "flavor": flavor.name, "cost_usd": round(cost, 4),
                        "minutes": round(wall, 2), "basis": " | ".join(bases)})
    options.sort(key=lambda o: (o.get("cost_usd") is None, o.get("cost_usd") or 0.0))
    if any(o["engine"] == "hf-jobs" for o in options):
        all_notes.append("Jobs: billed per started minute of each Job (one per model) at the flavor's price from "
                         "the Hub's hardware list; output tokens counted at their upper bound (max_tokens)")
    return {"object": "hfbatch.estimate.compare", "input_file": est["input_file"], "requests": est["requests"],
            "invalid_lines": est["invalid_lines"], "tokens": tokens, "options": options, "skipped_flavors": skipped,
            "notes": all_notes, "is_estimate": True}


def run_compare(path: str, *, base_url: str | None, prices: str | None, token: str | None,
                endpoint: str | None = None, flavors: list[str] | None = None) -> Comparison:
    """`hfbatch estimate --compare`: the router's prices (one GET), the Jobs hardware and each model's size from
    the Hub (huggingface_hub), then compare_file."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .gpu import ModelSize, flavors_from, model_size

    catalog = fetch_catalog(base_url, prices, token)
    est = estimate_file(path, catalog, pass_through=base_url is not None, endpoint=endpoint)
    api = HfApi(token=token or False, library_name="hfbatch")
    notes: list[str] = []
    try:
        hardware = flavors_from(api.list_jobs_hardware())
    except Exception as e:  # noqa: BLE001 - without the Hub, the serverless side still stands
        hardware = {}
        notes.append(f"the Jobs hardware list is unavailable ({type(e).__name__}): GPU options left out")
    if flavors is None:
        chosen = [f for f in hardware.values() if f.gpu]
    else:
        unknown = [n for n in flavors if n not in hardware]
        if unknown and hardware:
            gpus = ", ".join(sorted(n for n, f in hardware.items() if f.gpu))
            raise UsageError(f"--flavors: {', '.join(unknown)} not among the Jobs hardware ({gpus})")
        chosen = [hardware[n] for n in flavors if n in hardware]
    sizes: dict[str, ModelSize] = {}
    for model in est["models"]:
        base = split_model(model)[0]
        if base in sizes:
            continue
        try:
            sizes[base] = model_size(api.model_info(base, expand=["safetensors"]))
        except HfHubHTTPError as e:
            sizes[base] = ModelSize(None, None)
            status = e.response.status_code if e.response is not None else "?"
            notes.append(f"{base}: no model info from the Hub (HTTP {status}): its size, hence what fits, is unknown")
        except Exception as e:  # noqa: BLE001 - same: an unknown size, said in the notes
            sizes[base] = ModelSize(None, None)
            notes.append(f"{base}: no model info from the Hub ({type(e).__name__}): its size is unknown")
    return compare_file(est, catalog, chosen, sizes, notes)

