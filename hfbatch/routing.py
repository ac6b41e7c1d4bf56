"""Routing: a validated Request -> where to POST it and what to send (Route), or why it cannot be served.

Without --base-url, chat completions and responses go to the router unchanged (the model keeps its
`:fastest` / `:cheapest` / `:<provider>` suffix). The router has no OpenAI embeddings route, so
embeddings go to a provider's own route, built once per model by huggingface_hub's provider helpers
(their Hub lookups are synchronous: run in a thread, once, before that model's requests fan out).
With --base-url every endpoint is passed through: base URL + the line's url without its `/v1` (urls
outside /v1, vLLM's /score, /rerank and /v2/rerank, go to the server's root: base URL without /v1).

The provider helpers are private (`huggingface_hub.inference._providers.get_provider_helper`): no
public API builds a provider's request without sending it (InferenceClient sends; HfApi.model_info
only gives the mapping). What their lookups are expected to raise (Hub HTTP errors, network errors,
ValueError/KeyError for an unknown model, provider or task) is that model's per-line error; an
ImportError, AttributeError or TypeError means the private API changed: DependencyChanged, never a
quiet per-line model_not_found. tests/unit/test_hub_contract.py pins the contract.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import DependencyChanged
from .models import Request
from .retry import retryable

DEFAULT_ROUTER = "https://router.huggingface.co"
_HF_ROUTER_HOST = "https://router.huggingface.co"
ROUTER_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/responses"})
POLICY_SUFFIXES = frozenset({"fastest", "cheapest", "preferred"})
# Handed to huggingface_hub's helpers instead of the token: they only use it to pick the router URL;
# the real token is sent by the transport and never given to another library.
_PLACEHOLDER_KEY = "hf_hfbatch_placeholder"


def router_root() -> str:
    """The router's origin; HFBATCH_ROUTER_URL points it at a local server (tests, demo)."""
    return os.environ.get("HFBATCH_ROUTER_URL", DEFAULT_ROUTER).rstrip("/")


def split_model(model: str) -> tuple[str, str | None]:
    """`org/model:groq` -> ("org/model", "groq"); policies and no suffix -> (model, None)."""
    base, sep, suffix = model.rpartition(":")
    if not sep or "/" in suffix or not base:
        return model, None
    return base, (None if suffix in POLICY_SUFFIXES else suffix)


@dataclass(slots=True, frozen=True)
class Route:
    url: str
    data: bytes
    # Turns the provider's parsed 2xx answer into the OpenAI body to write; None: pass bytes through.
    adapt: Callable[[object, Request], dict[str, Any]] | None = None
    model: str | None = None  # the model as sent (with the --route suffix, after a fallback)
    body: dict[str, Any] | None = None  # the body as sent (after --route / --max-tokens)
    token_estimate: int = 0  # prompt estimate + output cap, for --tpm (0 when not asked for)
    # OpenAI's answers are JSON objects: a 2xx with another JSON value is a broken answer (retried).
    # Hugging Face task routes answer lists ([[floats]], [{"label", "score"}]).
    object_body: bool = True


@dataclass(slots=True, frozen=True)
class Unroutable:
    code: str
    message: str


@dataclass(slots=True, frozen=True)
class _EmbeddingTarget:
    url: str
    payload: dict[str, Any]
    input_key: str
    openai_shaped: bool


class Router:
    """Builds Routes. `base_url` set: pass-through mode.

    `route_suffix` (--route) is appended to router models that carry no suffix; `max_tokens`
    (--max-tokens) caps the output of every chat / responses body; `estimate` computes the token
    estimate --tpm books."""

    def __init__(self, base_url: str | None, route_suffix: str | None = None, max_tokens: int | None = None,
                 estimate: Callable[[dict[str, Any], str], int] | None = None,
                 default_max_tokens: int | None = None) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        self.root = router_root()
        self.route_suffix = route_suffix
        self.max_tokens = max_tokens
        self.default_max_tokens = default_max_tokens  # set where no cap is given (--budget's bound)
        self.estimate = estimate
        self.capped = 0  # bodies whose output cap --max-tokens lowered or set
        self._resolved: dict[str, Any] = {}  # Hub lookups done, per (task, model)
        self._locks: dict[str, asyncio.Lock] = {}

    async def route(self, req: Request) -> Route | Unroutable:
        if req.url.startswith("/hf/"):
            return await self._hf_task(req)
        body = self._rewrite(req)
        est = self.estimate(body, req.url) if self.estimate is not None else 0
        if self.base_url is not None:
            # /v1/... goes under the base URL; vLLM's /score, /rerank, /v2/rerank live at the server's root.
            url = self.base_url + req.url[3:] if req.url.startswith("/v1/") else self._server_root() + req.url
            return Route(url, orjson.dumps(body), model=body.get("model"), body=body, token_estimate=est)
        if req.url in ROUTER_ENDPOINTS:
            return Route(self.root + req.url, orjson.dumps(body), model=body.get("model"), body=body,
                         token_estimate=est)
        if req.url == "/v1/embeddings":
            target = await self._embedding_target(req.model)
            if isinstance(target, Unroutable):
                return target
            payload = dict(target.payload)
            payload[target.input_key] = req.body.get("input")
            if target.openai_shaped:
                extra = {k: v for k, v in req.body.items() if k not in ("model", "input")}
                payload.update(extra)
                return Route(target.url, orjson.dumps(payload), model=req.model, token_estimate=est)
            return Route(target.url, orjson.dumps(payload), adapt=hf_features_to_openai, model=req.model,
                         token_estimate=est, object_body=False)
        return Unroutable(
            "unsupported_endpoint",
            f"{req.url} is not served by the Hugging Face router (it serves /v1/chat/completions, "
            "/v1/responses and, through provider routes, /v1/embeddings); run this line with "
            "--base-url pointing at an OpenAI-compatible server that has it",
        )

    async def _hf_task(self, req: Request) -> Route | Unroutable:
        """`/hf/<task>` lines (our extension): {"model", "inputs", "parameters"} sent as the task's native
        request, through the provider helper's route (router) or to the server's root (--base-url, e.g.
        an Inference Endpoint). The answer is written unchanged."""
        task = req.url[4:]
        body = {k: v for k, v in req.body.items() if k != "model"}
        if self.base_url is not None:
            return Route(self._server_root(), orjson.dumps(body), model=req.model, body=body, object_body=False)
        helper = await self._helper(task, req.model)
        if isinstance(helper, Unroutable):
            return helper
        base = split_model(req.model)[0]
        try:
            params = helper.prepare_request(  # its Hub lookups are cached by now: no network here
                inputs=body.get("inputs"), parameters=body.get("parameters") or {}, headers={}, model=base,
                api_key=_PLACEHOLDER_KEY,
            )
        except Exception as e:  # noqa: BLE001 - the warm-up call proved the API: what fails is this line's inputs
            return Unroutable("invalid_request", f"{task} request for {req.model!r}: {_first_line(e)}")
        data = orjson.dumps(params.json) if params.json is not None else bytes(params.data or b"")
        return Route(self._to_root(params.url), data, model=req.model, body=body, object_body=False)

    async def _once(self, key: str, resolve: Callable[[], Any]) -> Any:
        """`resolve()` (synchronous Hub lookups) run once per key in a thread; concurrent callers wait
        for the first one instead of fanning out lookups."""
        hit = self._resolved.get(key)
        if hit is not None:
            return hit
        async with self._locks.setdefault(key, asyncio.Lock()):
            hit = self._resolved.get(key)
            if hit is None:
                hit = self._resolved[key] = await asyncio.to_thread(resolve)
        return hit

    async def _helper(self, task: str, model: str) -> Any:
        """huggingface_hub's provider helper for (task, model)."""
        return await self._once(f"{task}\x00{model}", lambda: self._resolve_helper(task, model))

    def _resolve_helper(self, task: str, model: str) -> Any:
        found = provider_request(task, model, "warm-up")  # runs (and caches) the Hub lookups
        if isinstance(found, LookupFailed):
            e = found.error
            return Unroutable(_lookup_code(e), f"no {task} route for model {model!r}: {_first_line(e)}; "
                              "check the model id, its task and providers, or use --base-url")
        return found[0]

    def _server_root(self) -> str:
        """--base-url without its /v1."""
        assert self.base_url is not None
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url

    def _to_root(self, url: str) -> str:
        return self.root + url[len(_HF_ROUTER_HOST):] if url.startswith(_HF_ROUTER_HOST) else url

    def _rewrite(self, req: Request) -> dict[str, Any]:
        """Apply --route and --max-tokens (copying the body only when something changes)."""
        body = req.body
        if self.route_suffix and self.base_url is None and req.url in ROUTER_ENDPOINTS:
            model = body.get("model", "")
            if ":" not in model.rsplit("/", 1)[-1]:
                body = {**body, "model": f"{model}:{self.route_suffix}"}
        cap = self.max_tokens
        if (cap or self.default_max_tokens) and req.url in ("/v1/chat/completions", "/v1/responses",
                                                             "/v1/completions"):
            keys = ("max_output_tokens",) if req.url == "/v1/responses" else ("max_completion_tokens", "max_tokens")
            present = [k for k in keys if isinstance(body.get(k), int)]
            if not present:
                body = {**body, keys[-1]: cap or self.default_max_tokens}
                self.capped += cap is not None
            elif cap is not None and any(body[k] > cap for k in present):
                body = {**body, **{k: min(body[k], cap) for k in present}}
                self.capped += 1
        return body

    async def _embedding_target(self, model: str) -> _EmbeddingTarget | Unroutable:
        target: _EmbeddingTarget | Unroutable = await self._once(
            f"embeddings\x00{model}", lambda: self._resolve_embedding(model))
        return target

    def _resolve_embedding(self, model: str) -> _EmbeddingTarget | Unroutable:
        """Ask huggingface_hub's provider helper for the feature-extraction route of `model`."""
        sentinel = "\x00hfbatch-input\x00"
        found = provider_request("feature-extraction", model, sentinel)
        if isinstance(found, LookupFailed):
            e = found.error
            return Unroutable(
                _lookup_code(e),
                f"no embeddings route for model {model!r}: {_first_line(e)}; "
                "check the model id and its providers, or use --base-url with a server that serves it",
            )
        params = found[1]
        payload = dict(params.json) if isinstance(params.json, dict) else {}
        key = next((k for k, v in payload.items() if v == sentinel), None)
        if key is None:
            return Unroutable("unsupported_endpoint", f"cannot build an embeddings request for {model!r}")
        del payload[key]
        return _EmbeddingTarget(self._to_root(params.url), payload, key, openai_shaped=(key == "input"))


def hf_features_to_openai(parsed: object, req: Request) -> dict[str, Any]:
    """hf-inference feature-extraction answer ([[floats], ...]) -> an OpenAI CreateEmbeddingResponse.

    hf-inference reports no token usage (it bills compute time), so usage counts are 0."""
    if isinstance(parsed, dict) and "data" in parsed:
        return parsed
    vectors = parsed if isinstance(parsed, list) else []
    if vectors and not isinstance(vectors[0], list):
        vectors = [vectors]  # a single input answered with a flat vector
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": req.model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }



def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0][:200] if text else repr(e)


@dataclass(slots=True, frozen=True)
class LookupFailed:
    """A provider lookup failed the expected way (unknown model, provider or task; Hub or network error)."""

    error: Exception


@dataclass(slots=True, frozen=True)
class _HubErrors:
    expected: tuple[type[Exception], ...]  # what the lookups raise for a model, a provider or the network
    network: tuple[type[Exception], ...]  # of those, what no HTTP answer explains (retryable)


@functools.cache
def _hub_errors() -> _HubErrors:
    """huggingface_hub's public errors: HfHubHTTPError (RepositoryNotFoundError, GatedRepoError, ...: an
    OSError) for a Hub answer; the HTTP library's own HTTPError (httpx in 1.x, httpx2 in 2.x: ConnectError,
    TimeoutException) for the network, found as HfHubHTTPError's base so no HTTP library is named here;
    OSError (OfflineModeIsEnabled, sockets); ValueError (HFValidationError, an unknown provider or task, no
    mapping, a task mismatch) and KeyError; StopIteration (`provider="auto"` on a model with no provider)."""
    from huggingface_hub.errors import HfHubHTTPError

    http = tuple(b for b in HfHubHTTPError.__mro__[1:] if b.__name__ == "HTTPError" and issubclass(b, Exception))
    return _HubErrors(expected=(HfHubHTTPError, *http, OSError, ValueError, KeyError, StopIteration),
                      network=(*http, OSError))


def provider_request(task: str, model: str, inputs: Any) -> tuple[Any, Any] | LookupFailed:
    """(helper, RequestParameters) of huggingface_hub's provider helper for `task` and `model` (with its
    `:provider` suffix, else "auto"), its request prepared for `inputs`; synchronous (Hub lookups, cached
    per process). Raises DependencyChanged when the private API is not what this code calls."""
    base, provider = split_model(model)
    try:
        from huggingface_hub.inference._providers import get_provider_helper

        expected = _hub_errors().expected
    except ImportError as e:
        raise _api_changed(e) from e
    try:
        helper = get_provider_helper(provider or "auto", task, base)  # type: ignore[arg-type]
        params = helper.prepare_request(inputs=inputs, parameters={}, headers={}, model=base,
                                        api_key=_PLACEHOLDER_KEY)
        params.url, params.json  # noqa: B018 - the fields read later: a rename fails here, loudly
    except expected as e:
        return LookupFailed(e)
    except (ImportError, AttributeError, TypeError) as e:
        raise _api_changed(e) from e
    return helper, params


def _api_changed(e: Exception) -> DependencyChanged:
    try:
        from huggingface_hub import __version__ as version
    except ImportError:
        version = "?"
    # Short: the whole message must fit where one line's error is written (about 300 characters).
    return DependencyChanged(
        f"huggingface_hub {version} changed the private API used for embeddings and /hf/<task> lines "
        f"({type(e).__name__}: {_first_line(e)[:50]}); install an earlier huggingface_hub or use --base-url, "
        "and please report it")


def _lookup_code(e: Exception) -> str:
    """A Hub lookup that failed for the network, or an answer the one retry rule retries (retry.retryable: 429,
    500, 502-504), is retryable (--retry-failed); any other answer (404, 501, ...) or a task mismatch is the
    model's."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(status, int):
        return "connection_error" if retryable(status) else "model_not_found"
    return "connection_error" if isinstance(e, _hub_errors().network) else "model_not_found"
