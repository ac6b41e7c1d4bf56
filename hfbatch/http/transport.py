"""Transport: one POST -> Outcome (status, raw body, parsed JSON, ids, latency). No policy, no retries.

Plain http(s) origins go through the lean keep-alive client in http1.py; an origin behind a proxy
(HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, minus NO_PROXY) or with credentials in its URL goes through
aiohttp, as does everything when HFBATCH_HTTP=aiohttp or httptools is missing. aiohttp is imported
only when it is used.

Both clients hold an answer to the same cap (bodies.py; --max-response-bytes): over it, the request
ends as `response_too_large` (no answer, not retried), the rest of the answer is not read and its
connection is closed. (aiohttp returns a connection to its pool as soon as it has read an answer to
its end, well framed: one found too large only when decoded may serve another request.)
"""

from __future__ import annotations

import os
import time
import zlib
from typing import TYPE_CHECKING, Any

import orjson

from .. import __version__
from ..models import Outcome
from ..retry import parse_retry_after
from .bodies import MAX_RESPONSE_BYTES, ProtocolError, ResponseTooLarge, check_length, decode

if TYPE_CHECKING:
    import aiohttp

    from .lean import Pool

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5


class Transport:
    """One connection pool per run, sized by the callers' concurrency, keep-alive on."""

    def __init__(
        self, concurrency: int, timeout: float, token: str | None, extra_headers: dict[str, str] | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        headers = {"user-agent": f"hfbatch/{__version__}", "content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        headers.update(extra_headers or {})
        self._headers = headers
        self._timeout = timeout
        self._concurrency = concurrency
        self._max_body = max_response_bytes
        self._session: aiohttp.ClientSession | None = None
        self._pool: Pool | None = None
        self._proxies: dict[str, str | None] = {}
        self._lean: dict[str, bool] = {}  # url -> the lean client serves it

    async def __aenter__(self) -> Transport:
        if os.environ.get("HFBATCH_HTTP", "").lower() != "aiohttp":
            try:
                from .lean import Pool
            except ImportError:  # httptools missing (an unusual platform): aiohttp does everything
                pass
            else:
                self._pool = Pool(self._headers, self._timeout, max_body=self._max_body)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._session is not None:
            await self._session.close()

    async def prewarm(self, url: str, n: int) -> None:
        """Open up to `n` keep-alive connections to `url`'s origin ahead of the first requests (the
        lean client only; failures are left for the requests to report)."""
        if self._pool is not None and self._uses_lean(url):
            await self._pool.prewarm(url, n)

    async def post(self, url: str, data: bytes) -> Outcome:
        t0 = time.perf_counter()
        try:
            if self._pool is not None and self._uses_lean(url):
                status, h, body = await self._lean_request("POST", url, data)
            else:
                status, h, body = await self._aiohttp_request("POST", url, data)
        except TimeoutError:
            return Outcome(
                None, latency=time.perf_counter() - t0, error_code="request_timeout",
                error_message="The underlying call to the model timed out.",
            )
        except ResponseTooLarge as e:
            return Outcome(None, latency=time.perf_counter() - t0, error_code="response_too_large",
                           error_message=str(e))
        except Exception as e:
            if not _is_connection_error(e):
                raise
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
        retry_after = parse_retry_after(h.get("retry-after")) if status >= 400 else None
        return Outcome(status, body, parsed, h.get("x-request-id"), h.get("x-inference-provider"), retry_after,
                       latency)

    async def get_json(self, url: str) -> Any:
        """GET a JSON document (catalogs, prices); raises on a failure, a non-2xx answer or an answer over
        the cap (ResponseTooLarge)."""
        if self._pool is not None and self._uses_lean(url):
            status, _, body = await self._lean_request("GET", url, b"")
        else:
            status, _, body = await self._aiohttp_request("GET", url, b"")
        if not 200 <= status < 300:
            raise OSError(f"HTTP {status} from {url}")
        return orjson.loads(body)

    # -- the two clients -----------------------------------------------------------------------

    async def _lean_request(self, method: str, url: str, data: bytes) -> tuple[int, Any, bytes]:
        assert self._pool is not None
        first = url
        for _ in range(MAX_REDIRECTS + 1):
            r = await self._pool.request(method, url, data)
            location = r.headers.get("location")
            # Follow a redirect only where the method and body survive it (307/308; any for a GET: a
            # 301/302/303 would turn the POST into a bodiless GET), and only within the origin: the
            # token must not travel to another host. Anything else is returned as it is.
            if r.status not in REDIRECTS or not location or (method == "POST" and r.status not in (307, 308)):
                return r.status, r.headers, r.body
            from urllib.parse import urljoin

            nxt = urljoin(url, location)
            if _origin(nxt) != _origin(first):
                return r.status, r.headers, r.body
            url = nxt
        return r.status, r.headers, r.body

    async def _aiohttp_request(self, method: str, url: str, data: bytes) -> tuple[int, Any, bytes]:
        session = await self._aiohttp()
        limit = self._max_body
        async with session.request(method, url, data=data or None, proxy=self._proxy_for(url)) as resp:
            # The same cap as the lean client: Content-Length first, raw bytes as they arrive, then a
            # bounded decode (the session does not decompress). Over it, resp.close() drops the
            # connection without reading the rest.
            try:
                check_length(resp.headers.get("content-length"), limit)
                chunks, size = [], 0
                async for chunk in resp.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise ResponseTooLarge(limit, "its body went past it while being read")
                    chunks.append(chunk)
                body = b"".join(chunks)
                del chunks
                enc = resp.headers.get("content-encoding")
                if enc and body:
                    try:
                        body = decode(enc, body, limit)
                    except (zlib.error, ValueError) as e:
                        raise ProtocolError(f"could not decode a {enc} body: {e}") from None
            except (ResponseTooLarge, ProtocolError):
                resp.close()
                raise
            return resp.status, resp.headers, body

    async def _aiohttp(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            connector = aiohttp.TCPConnector(
                limit=self._concurrency, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
            )
            # trust_env=False: with it, aiohttp re-reads the proxy variables and ~/.netrc (in a
            # thread) for every request. Proxies are resolved once per origin instead (_proxy_for).
            # auto_decompress=False: bodies are decoded by bodies.decode, bounded by the cap; so only the
            # encodings it reads are asked for.
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"accept-encoding": "gzip, deflate", **self._headers},
                timeout=aiohttp.ClientTimeout(total=self._timeout), skip_auto_headers=("user-agent",),
                trust_env=False, auto_decompress=False,
            )
        return self._session

    def _uses_lean(self, url: str) -> bool:
        lean = self._lean.get(url)  # per URL (a run has a handful): no string work per request
        if lean is None:
            origin = _origin(url)
            lean = self._lean[url] = (
                "@" not in origin and origin.startswith(("http://", "https://")) and self._proxy_for(url) is None
            )
        return lean

    def _proxy_for(self, url: str) -> str | None:
        origin = _origin(url)
        if origin not in self._proxies:
            self._proxies[origin] = _env_proxy(origin)
        return self._proxies[origin]


def _is_connection_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    if isinstance(e, ProtocolError):
        return True
    import sys

    aiohttp = sys.modules.get("aiohttp")  # only loaded if it was used
    return aiohttp is not None and isinstance(e, aiohttp.ClientError)


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
