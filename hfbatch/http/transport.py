"""HttpTransport: one POST -> Outcome (status, raw body, parsed JSON, ids, latency), the policy above the two
HTTP clients: which client serves an origin, the redirects followed, and one map from exceptions to the
Outcome's error codes. No retries (retry.py decides those).

Plain http(s) origins go through the lean keep-alive client (lean.py); an origin behind a proxy
(HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, minus NO_PROXY) or with credentials in its URL goes through
aiohttp (aio.py), as does everything when HFBATCH_HTTP=aiohttp or httptools is missing. aiohttp is
imported only when it is used.

Redirects, the same for both clients: a POST follows a 307 or 308 (a 301/302/303 would turn it into a
bodiless GET), a GET any redirect; at most 5, and only within the origin (scheme, host and port as the URL
writes them), so that the token never travels to another host. Any other 3xx is the answer, as it is.

Both clients hold an answer to the same cap (bodies.py; --max-response-bytes): over it, the request
ends as `response_too_large` (no answer, not retried), the rest of the answer is not read and its
connection is closed.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from .. import __version__
from ..models import Outcome
from . import base
from .bodies import MAX_RESPONSE_BYTES, ProtocolError, ResponseTooLarge
from .headers import parse_retry_after

if TYPE_CHECKING:
    import ssl
    from typing import Self

    from .aio import AioClient
    from .base import Client, Response
    from .lean import Pool

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5


class HttpTransport(base.Transport):
    """One connection pool per run, sized by the callers' concurrency, keep-alive on."""

    def __init__(
        self, concurrency: int, timeout: float, token: str | None, extra_headers: dict[str, str] | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES, ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context`: the certificates to trust (default: the system store, SSL_CERT_FILE honored)."""
        headers = {"user-agent": f"hfbatch/{__version__}", "content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        headers.update(extra_headers or {})
        self._headers = headers
        self._timeout = timeout
        self._concurrency = concurrency
        self._max_body = max_response_bytes
        self._ssl = ssl_context
        self._pool: Pool | None = None
        self._aio: AioClient | None = None
        self._proxies: dict[str, str | None] = {}
        self._clients: dict[str, Client] = {}  # url -> the client that serves it
        # What ends a request as `connection_error`; aio.ERRORS joins when aiohttp is used.
        self._failures: tuple[type[BaseException], ...] = (OSError, ProtocolError)

    async def __aenter__(self) -> Self:
        if os.environ.get("HFBATCH_HTTP", "").lower() != "aiohttp":
            try:
                from .lean import Pool
            except ImportError:  # httptools missing (an unusual platform): aiohttp does everything
                pass
            else:
                self._pool = Pool(self._headers, self._timeout, ssl_context=self._ssl, max_body=self._max_body)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._aio is not None:
            await self._aio.close()

    async def prewarm(self, url: str, n: int) -> None:
        """Open up to `n` keep-alive connections to `url`'s origin ahead of the first requests (the
        lean client only; failures are left for the requests to report)."""
        if self._pool is not None and self._client(url) is self._pool:
            await self._pool.prewarm(url, n)

    async def post(self, url: str, data: bytes) -> Outcome:
        t0 = time.perf_counter()
        try:
            r = await self._send("POST", url, data)
        except TimeoutError:
            return Outcome(
                None, latency=time.perf_counter() - t0, error_code="request_timeout",
                error_message="The underlying call to the model timed out.",
            )
        except ResponseTooLarge as e:
            return Outcome(None, latency=time.perf_counter() - t0, error_code="response_too_large",
                           error_message=str(e))
        except Exception as e:
            if not isinstance(e, self._failures):
                raise  # a bug, not a failed request
            return Outcome(
                None, latency=time.perf_counter() - t0, error_code="connection_error",
                error_message=_describe(e),
            )
        latency = time.perf_counter() - t0
        status, h, body = r.status, r.headers, r.body
        parsed: Any = None
        if body:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None
        retry_after = parse_retry_after(h.get("retry-after")) if status >= 400 else None
        return Outcome(status, body, parsed, h.get("x-request-id"), h.get("x-inference-provider"), retry_after,
                       latency)

    async def get_json(self, url: str) -> Any:
        """GET a JSON document (catalogs, prices). Whatever keeps it from coming (no answer in time, a failed
        connection, a non-2xx answer, an answer over the cap or not JSON) raises OSError naming `url`; anything
        else is a bug and propagates."""
        try:
            r = await self._send("GET", url, b"")
        except (TimeoutError, ResponseTooLarge) as e:
            raise OSError(f"{url}: {_describe(e)}") from e
        except Exception as e:
            if not isinstance(e, self._failures):
                raise
            raise OSError(f"{url}: {_describe(e)}") from e
        if not 200 <= r.status < 300:
            raise OSError(f"HTTP {r.status} from {url}")
        try:
            return orjson.loads(r.body)
        except orjson.JSONDecodeError as e:
            raise OSError(f"{url}: the answer is not JSON ({e})") from None

    # -- the policy above the two clients ------------------------------------------------------

    async def _send(self, method: str, url: str, data: bytes) -> Response:
        client = self._client(url)
        r = await client.request(method, url, data)
        if r.status in REDIRECTS:
            r = await self._follow(client, method, url, data, r)
        return r

    async def _follow(self, client: Client, method: str, url: str, data: bytes, r: Response) -> Response:
        """Follow `r`, a redirect, where the method and body survive it (307/308; any for a GET), only
        within the origin, at most MAX_REDIRECTS times; return the first answer not to follow, as it is."""
        from urllib.parse import urljoin

        first = _origin(url)
        for _ in range(MAX_REDIRECTS):
            location = r.headers.get("location")
            if not location or (method == "POST" and r.status not in (307, 308)):
                return r
            nxt = urljoin(url, location)
            if _origin(nxt) != first:
                return r
            url = nxt
            r = await client.request(method, url, data)
            if r.status not in REDIRECTS:
                return r
        return r

    def _client(self, url: str) -> Client:
        client = self._clients.get(url)  # per URL (a run has a handful): no string work per request
        if client is None:
            origin, pool = _origin(url), self._pool
            if (pool is not None and "@" not in origin and origin.startswith(("http://", "https://"))
                    and self._proxy_for(url) is None):
                client = pool
            else:
                client = self._aiohttp()
            self._clients[url] = client
        return client

    def _aiohttp(self) -> AioClient:
        if self._aio is None:
            from . import aio

            self._aio = aio.AioClient(self._headers, self._timeout, self._concurrency, self._proxy_for,
                                      max_body=self._max_body, ssl_context=self._ssl)
            self._failures += aio.ERRORS
        return self._aio

    def _proxy_for(self, url: str) -> str | None:
        origin = _origin(url)
        if origin not in self._proxies:
            self._proxies[origin] = _env_proxy(origin)
        return self._proxies[origin]


# The name callers import today (executor.py, engines/http.py, cost/estimate.py); the protocol they may
# type against instead is hfbatch.http.base.Transport.
Transport = HttpTransport


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return scheme + "://" + rest.split("/", 1)[0]


def _env_proxy(origin: str) -> str | None:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY (and ALL_PROXY), as curl and requests read them."""
    if not any(v and k.lower().endswith("_proxy") and k.lower() != "no_proxy" for k, v in os.environ.items()):
        return None  # no proxy set (the usual case): no need to import urllib.request (~10 ms)
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
