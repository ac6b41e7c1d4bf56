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

import contextlib
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
from ..reader import iter_lines, open_input
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
    """Validate and estimate a batch input file (or "-") without sending anything; one JSON-able dict.

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
        f = open_input(path)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    with contextlib.nullcontext(f) if path == "-" else f:
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
    import asyncio

    from ..http.transport import Transport
    from .pricing import default_cache_path, load_catalog, models_url

    async def catalog() -> Catalog:
        async with Transport(1, 30.0, token) as t:
            url = models_url(base_url)
            return await load_catalog(t.get_json, url, default_cache_path(url), prices)

    return estimate_file(path, asyncio.run(catalog()), pass_through=base_url is not None, endpoint=endpoint)
