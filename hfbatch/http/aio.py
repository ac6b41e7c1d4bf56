"""The aiohttp client, for what the lean client (lean.py) does not do: an origin behind a proxy or with
credentials in its URL, and everything when HFBATCH_HTTP=aiohttp or httptools is missing. Input: one
request; output: a Response (base.py), or an exception transport.py maps to an Outcome.

Imported only when it is used (transport.py), so that aiohttp is too. It follows no redirect: transport.py
does, with one policy for both clients. It holds an answer to the same cap as the lean client (bodies.py):
Content-Length first, raw bytes as they arrive, then a bounded decode (the session does not decompress);
over it, the connection is dropped without reading the rest. (aiohttp returns a connection to its pool as
soon as it has read an answer to its end, well framed: one found too large only when decoded may serve
another request.)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp

from .base import Response
from .bodies import MAX_RESPONSE_BYTES, ProtocolError, ResponseTooLarge, check_length, decode

if TYPE_CHECKING:
    import ssl

# aiohttp's exceptions for a request that got no usable answer (besides TimeoutError and OSError, which
# some of them also are): transport.py maps them to `connection_error`, as the lean client's.
ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError,)


class AioClient:
    """One aiohttp session per run, opened at the first request; `proxy_for(url)` names the proxy to use."""

    def __init__(
        self, headers: dict[str, str], timeout: float, concurrency: int, proxy_for: Callable[[str], str | None],
        max_body: int = MAX_RESPONSE_BYTES, ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._headers = headers
        self._timeout = timeout
        self._concurrency = concurrency
        self._proxy_for = proxy_for
        self.max_body = max_body
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    async def request(self, method: str, url: str, body: bytes) -> Response:
        session = self._session or self._open()
        limit = self.max_body
        # allow_redirects=False: transport.py follows redirects, one policy for both clients (aiohttp's own
        # would follow a 302 on a POST as a GET, and a 307 to another host).
        async with session.request(method, url, data=body or None, proxy=self._proxy_for(url),
                                   allow_redirects=False) as resp:
            # resp.close() drops the connection without reading the rest of a too-large answer.
            try:
                check_length(resp.headers.get("content-length"), limit)
                chunks, size = [], 0
                async for chunk in resp.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise ResponseTooLarge(limit, "its body went past it while being read")
                    chunks.append(chunk)
                data = b"".join(chunks)
                del chunks
                enc = resp.headers.get("content-encoding")
                if enc and data:
                    try:
                        data = decode(enc, data, limit)
                    except (zlib.error, ValueError) as e:
                        raise ProtocolError(f"could not decode a {enc} body: {e}") from None
            except (ResponseTooLarge, ProtocolError):
                resp.close()
                raise
            return Response(resp.status, resp.headers, data)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300,
            ssl=self._ssl if self._ssl is not None else True,
        )
        # trust_env=False: with it, aiohttp re-reads the proxy variables and ~/.netrc (in a thread) for
        # every request. Proxies are resolved once per origin instead (proxy_for, transport.py).
        # auto_decompress=False: bodies are decoded by bodies.decode, bounded by the cap; so only the
        # encodings it reads are asked for.
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"accept-encoding": "gzip, deflate", **self._headers},
            timeout=aiohttp.ClientTimeout(total=self._timeout), skip_auto_headers=("user-agent",),
            trust_env=False, auto_decompress=False,
        )
        return self._session
