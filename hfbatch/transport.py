"""Transport: one POST -> Outcome (status, raw body, parsed JSON, ids, latency). No policy, no retries."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson

from . import __version__
from .models import Outcome
from .retry import parse_retry_after


class Transport:
    """One aiohttp session per run, its connector sized to the concurrency, keep-alive on."""

    def __init__(
        self, concurrency: int, timeout: float, token: str | None, extra_headers: dict[str, str] | None = None
    ) -> None:
        headers = {"user-agent": f"hfbatch/{__version__}", "content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        headers.update(extra_headers or {})
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, str | None] = {}

    async def __aenter__(self) -> Transport:
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
        )
        # trust_env=False: with it, aiohttp re-reads the proxy variables and ~/.netrc (in a thread)
        # for every request, which cost more than the request itself here. Proxies are resolved
        # once per origin instead (_proxy_for).
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, timeout=self._timeout,
            skip_auto_headers=("user-agent",), trust_env=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, url: str, data: bytes) -> Outcome:
        assert self._session is not None
        t0 = time.perf_counter()
        try:
            async with self._session.post(url, data=data, proxy=self._proxy_for(url)) as resp:
                body = await resp.read()
                status = resp.status
                h = resp.headers
                request_id = h.get("x-request-id")
                provider = h.get("x-inference-provider")
                retry_after = parse_retry_after(h.get("retry-after")) if status >= 400 else None
        except TimeoutError:
            return Outcome(
                None, latency=time.perf_counter() - t0, error_code="request_timeout",
                error_message="The underlying call to the model timed out.",
            )
        except (aiohttp.ClientError, OSError) as e:
            return Outcome(
                None, latency=time.perf_counter() - t0, error_code="connection_error",
                error_message=_describe(e),
            )
        latency = time.perf_counter() - t0
        parsed: Any = None
        if body:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None
        return Outcome(status, body, parsed, request_id, provider, retry_after, latency)

    def _proxy_for(self, url: str) -> str | None:
        origin = _origin(url)
        if origin not in self._proxies:
            self._proxies[origin] = _env_proxy(origin)
        return self._proxies[origin]

    async def get_json(self, url: str) -> Any:
        """GET a JSON document (catalogs, prices); raises aiohttp.ClientError on failure."""
        assert self._session is not None
        async with self._session.get(url, proxy=self._proxy_for(url)) as resp:
            resp.raise_for_status()
            return orjson.loads(await resp.read())


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return scheme + "://" + rest.split("/", 1)[0]


def _env_proxy(origin: str) -> str | None:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY (and ALL_PROXY), as curl and requests read them."""
    import urllib.request
    from urllib.parse import urlparse

    parsed = urlparse(origin)
    if urllib.request.proxy_bypass_environment(parsed.hostname or ""):  # type: ignore[attr-defined]
        return None
    proxies = urllib.request.getproxies_environment()
    return proxies.get(parsed.scheme) or proxies.get("all")


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]

