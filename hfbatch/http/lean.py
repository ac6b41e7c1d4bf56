"""A lean keep-alive HTTP/1.1 client for the hot path: one request at a time per connection, no pipelining.

Why not aiohttp here: its ClientSession costs ~160 µs of Python per request on this path (request
objects, header multidicts, a timer per request), more than all of hfbatch's own work; this client
writes one pre-rendered header block and parses the answer with llhttp (httptools, C). See
BENCHMARKS.md. What it does not do (proxies, credentials in the URL) stays with aiohttp
(transport.py decides per origin).

- Connections are kept per origin (LIFO, so a few warm ones serve a slow trickle), closed after
  60 s idle, after `Connection: close`, or after any error.
- DNS is resolved once per host and reused for 5 minutes (the resolver is a seam: Pool(resolve=...));
  a new connection races the host's addresses as RFC 8305 does (happy_eyeballs: families
  interleaved, the next address 250 ms after the previous one, the first to connect wins). TLS uses
  the system trust store, with SNI and hostname checks on.
- Timeouts: one watchdog per pool (not a timer per request) aborts requests past their deadline.
- Bodies: Content-Length, chunked or close-delimited; gzip/deflate decoded. Capped (bodies.py): a
  Content-Length over the cap is refused before the body is read, raw bytes are counted as they
  arrive, decoding stops past the cap; the connection is then closed (ResponseTooLarge). Headers
  over MAX_HEAD end the answer as a ProtocolError.
"""

from __future__ import annotations

import asyncio
import socket
import zlib
from collections.abc import Awaitable, Callable, Sequence
from itertools import zip_longest
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httptools

# Response, ProtocolError and ResponseTooLarge are shared with the aiohttp path (importable without httptools).
from .base import Response
from .bodies import MAX_RESPONSE_BYTES, ProtocolError, ResponseTooLarge, check_length, decode, format_size

if TYPE_CHECKING:
    import ssl

# Response headers the callers read (lower-case); everything else is skipped.
WANTED = frozenset({b"x-request-id", b"x-inference-provider", b"retry-after", b"content-encoding",
                    b"location", b"content-length", b"transfer-encoding"})
IDLE_SECONDS = 60.0
DNS_TTL = 300.0
CONNECT_DELAY = 0.25  # RFC 8305's Connection Attempt Delay: when the next address starts (happy eyeballs)
# An answer's status line and headers, at most (aiohttp: 8190 bytes a line, 128 lines). llhttp has no
# limit of its own and httptools gathers a header in memory until its line ends.
MAX_HEAD = 1 << 20

# getaddrinfo's entries: (family, type, proto, canonname, sockaddr)
AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
Resolver = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]


class Target:
    """A URL, pre-rendered: the connection key and the request head up to the Content-Length value."""

    __slots__ = ("key", "host", "port", "tls", "heads")

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
            raise ValueError(f"not a plain http(s) URL: {url}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.key = (self.tls, self.host, self.port)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        lines = [f"host: {parts.netloc}"] + [f"{k}: {v}" for k, v in headers.items()]
        fixed = "\r\n".join(lines)
        self.heads = {m: f"{m} {target} HTTP/1.1\r\n{fixed}\r\ncontent-length: ".encode("latin-1")
                      for m in ("GET", "POST")}


class _Conn(asyncio.Protocol):
    """One connection; `send` starts a request and returns the future of its Response."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_body: int = MAX_RESPONSE_BYTES) -> None:
        self.loop = loop
        self.max_body = max_body
        self.size_digits = len(str(max_body))  # a Content-Length with fewer digits is under the cap
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.fut: asyncio.Future[Response] | None = None
        self.closed = False
        self.keep = False
        self.deadline = 0.0
        self.idle_since = 0.0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = 0  # raw body bytes of the current answer
        self.head_size = 0  # bytes received before its headers were complete
        self.headers_done = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.headers_done:
            self.head_size += len(data)
            if self.head_size > MAX_HEAD:
                self._fail(ProtocolError(f"the answer's headers are over {format_size(MAX_HEAD)}"))
                self.close()
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ProtocolError(f"invalid HTTP answer: {e}"))
            self.close()

    def eof_received(self) -> bool:
        self.closed = True  # never handed out again, even before connection_lost runs
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        fut = self.fut
        if fut is None or fut.done():
            return
        h = self.headers
        if self.headers_done and "content-length" not in h and "transfer-encoding" not in h:
            self._complete()  # a body delimited by the end of the connection
        elif exc is not None:
            self._fail(exc)
        else:
            self._fail(ProtocolError("the server closed the connection before answering"
                                     if not self.headers_done else "the server closed the connection mid-answer"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in WANTED:
            self.headers[name.decode()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True
        length = self.headers.get("content-length")
        if length is not None and len(length) >= self.size_digits:
            try:
                check_length(length, self.max_body)
            except ResponseTooLarge as e:
                self._too_large(e)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            self._too_large(ResponseTooLarge(self.max_body, "its body went past it while being read"))
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers, self.chunks, self.size, self.headers_done = {}, [], 0, False
            return
        self.keep = self.parser.should_keep_alive()
        self._complete()
        self.headers_done = False  # bytes on an idle connection count as a head again

    # own
    def send(self, payload: bytes, deadline: float) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.headers, self.chunks, self.size, self.head_size, self.headers_done, self.keep = {}, [], 0, 0, False, False
        self.deadline = deadline
        self.fut = fut = self.loop.create_future()
        self.transport.write(payload)
        return fut

    def _complete(self) -> None:
        fut = self.fut
        if fut is None or fut.done():
            return
        body = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks = []  # the raw chunks go before the body is decoded: one copy at a time
        enc = self.headers.get("content-encoding")
        if enc and body:
            try:
                body = decode(enc, body, self.max_body)
            except ResponseTooLarge as e:
                self.keep = False
                # Without its traceback: its frames hold the raw body and the inflated bytes, and through
                # `self` -> fut -> e a cycle that only the cycle collector would free (memory past the cap).
                fut.set_exception(e.with_traceback(None))
                return
            except (zlib.error, ValueError) as e:
                self.keep = False
                fut.set_exception(ProtocolError(f"could not decode a {enc} body: {e}"))
                return
        try:
            status = self.parser.get_status_code()
        except httptools.HttpParserError:  # pragma: no cover - headers_done implies a status
            status = 0
        fut.set_result(Response(status, self.headers, body))

    def _too_large(self, e: ResponseTooLarge) -> None:
        """Fail the answer and stop the parser: raised inside its callback, this ends feed_data, and
        data_received closes the connection."""
        self._fail(e)
        raise e

    def _fail(self, exc: BaseException) -> None:
        self.keep = False
        self.chunks = []  # what was read of a failed answer goes now (up to the cap), not with the connection
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(exc)

    def time_out(self) -> None:
        self._fail(TimeoutError())
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        self.closed = True
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


def default_ssl_context() -> ssl.SSLContext:
    """The system trust store (SSL_CERT_FILE / SSL_CERT_DIR honored by OpenSSL), as aiohttp uses."""
    import ssl

    return ssl.create_default_context()


def interleave(infos: Sequence[AddrInfo]) -> list[AddrInfo]:
    """RFC 8305 section 4: alternate address families (IPv6, IPv4, IPv6, ...), starting with the family
    of the resolver's first choice, each family's addresses in the resolver's order."""
    families: dict[int, list[AddrInfo]] = {}
    for info in infos:
        families.setdefault(info[0], []).append(info)
    if len(families) < 2:
        return list(infos)
    return [info for row in zip_longest(*families.values()) for info in row if info is not None]


async def happy_eyeballs(infos: Sequence[AddrInfo], loop: asyncio.AbstractEventLoop) -> socket.socket:
    """A connected socket to one of `infos`, raced as RFC 8305 does: each address is tried in turn, the
    next one as soon as the previous one fails or after CONNECT_DELAY if it is still connecting (a
    black-holed route, often IPv6, would otherwise hold the whole connect timeout); the first to connect
    wins, the others are cancelled and their sockets closed. Raises the last error if every one fails.

    Over the Pool's cached addresses: loop.create_connection(happy_eyeballs_delay=...) would race the
    same way but resolve the host again for every connection."""
    if len(infos) == 1:
        return await _connect_socket(infos[0], loop)
    attempts: set[asyncio.Task[socket.socket]] = set()
    errors: list[BaseException] = []
    try:
        for i, info in enumerate(infos):
            attempts.add(loop.create_task(_connect_socket(info, loop)))
            # CONNECT_DELAY before the next address starts; after the last one, as long as the caller's
            # timeout allows.
            sock = await _first_connected(attempts, errors, CONNECT_DELAY if i + 1 < len(infos) else None)
            if sock is not None:
                return sock
        while attempts:
            sock = await _first_connected(attempts, errors, None)
            if sock is not None:
                return sock
    finally:
        for task in attempts:  # the losers, and all of them when the caller's timeout ends the race
            task.cancel()
            task.add_done_callback(_close_loser)
    raise errors[-1]


async def _first_connected(attempts: set[asyncio.Task[socket.socket]], errors: list[BaseException],
                           timeout: float | None) -> socket.socket | None:
    """Wait up to `timeout` for an attempt to end; the socket of the first that connected, if one did.
    The attempts that ended leave `attempts` (their errors go to `errors`; an extra winner is closed)."""
    done, _ = await asyncio.wait(attempts, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    winner: socket.socket | None = None
    for task in done:
        attempts.discard(task)
        error = task.exception()
        if error is not None:
            errors.append(error)
        elif winner is None:
            winner = task.result()
        else:
            task.result().close()
    return winner


def _close_loser(task: asyncio.Task[socket.socket]) -> None:
    """A cancelled attempt may have connected before the cancel reached it: close that socket."""
    if not task.cancelled() and task.exception() is None:
        task.result().close()


async def _connect_socket(info: AddrInfo, loop: asyncio.AbstractEventLoop) -> socket.socket:
    family, _, proto, _, addr = info
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def system_resolve(host: str, port: int) -> Sequence[AddrInfo]:
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


class Pool:
    """Keep-alive connections per origin, a DNS cache, and one timeout watchdog."""

    def __init__(self, headers: dict[str, str], timeout: float, connect_timeout: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None, max_body: int = MAX_RESPONSE_BYTES,
                 resolve: Resolver | None = None) -> None:
        """`max_body`: the largest answer body accepted, after decoding (bytes); past it a request
        raises ResponseTooLarge. `resolve(host, port)`: a host's addresses (default: the system's
        getaddrinfo), cached for DNS_TTL."""
        self._headers = {"accept-encoding": "gzip, deflate", **{k.lower(): v for k, v in headers.items()}}
        if any(c in text for kv in self._headers.items() for text in kv for c in "\r\n\0"):
            raise ValueError("a header name or value contains a line break")  # (RunConfig refuses these first)
        self.timeout = timeout
        self.max_body = max_body
        self.connect_timeout = min(connect_timeout, timeout)
        self._ssl = ssl_context
        self._targets: dict[str, Target] = {}
        self._idle: dict[tuple[bool, str, int], list[_Conn]] = {}
        self._busy: set[_Conn] = set()
        self._resolver = resolve or system_resolve
        self._dns: dict[tuple[str, int], tuple[float, Sequence[AddrInfo]]] = {}
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def target(self, url: str) -> Target:
        t = self._targets.get(url)
        if t is None:
            if len(self._targets) > 1024:
                self._targets.clear()
            t = self._targets[url] = Target(url, self._headers)
        return t

    async def request(self, method: str, url: str, body: bytes = b"") -> Response:
        """Send one request; raises TimeoutError, OSError or ProtocolError when there is no answer,
        ResponseTooLarge when the answer is over the cap."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        t = self.target(url)
        payload = b"%b%d\r\n\r\n%b" % (t.heads[method], len(body), body)
        deadline = loop.time() + self.timeout
        conn = self._take(t.key)
        if conn is None:
            conn = await self._connect(t, loop, deadline)
        self._busy.add(conn)
        if self._watchdog is None:
            self._arm()
        try:
            resp = await conn.send(payload, deadline)
        except BaseException:
            conn.close(abort=True)
            conn.fut = None  # no cycle (conn -> future -> exception -> this frame -> conn) outlives the request
            raise
        finally:
            self._busy.discard(conn)
        if conn.keep and not conn.closed:
            conn.idle_since = loop.time()
            self._idle.setdefault(t.key, []).append(conn)
        else:
            conn.close()
        return resp

    async def prewarm(self, url: str, n: int) -> None:
        """Open connections to `url`'s origin until `n` are idle there; errors are ignored (the
        requests that follow meet them)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        t = self.target(url)

        async def one() -> None:
            conn = await self._connect(t, loop, loop.time() + self.connect_timeout)
            conn.idle_since = loop.time()
            self._idle.setdefault(t.key, []).append(conn)
            if self._watchdog is None:
                self._arm()

        missing = n - len(self._idle.get(t.key, ()))
        await asyncio.gather(*(one() for _ in range(missing)), return_exceptions=True)

    def _take(self, key: tuple[bool, str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self, t: Target, loop: asyncio.AbstractEventLoop, deadline: float) -> _Conn:
        ssl_ctx: ssl.SSLContext | None = None
        if t.tls:
            if self._ssl is None:
                self._ssl = default_ssl_context()
            ssl_ctx = self._ssl
        max_body = self.max_body
        factory: Callable[[], _Conn] = lambda: _Conn(loop, max_body)  # noqa: E731
        budget = max(0.001, min(self.connect_timeout, deadline - loop.time()))
        async with asyncio.timeout(budget):  # the race and the TLS handshake
            sock = await happy_eyeballs(await self._resolve(t.host, t.port, loop), loop)
            try:
                _, conn = await loop.create_connection(
                    factory, sock=sock, ssl=ssl_ctx, server_hostname=t.host if ssl_ctx is not None else None)
            except BaseException:
                sock.close()  # (a transport that was made closed it already)
                raise
            return conn

    async def _resolve(self, host: str, port: int, loop: asyncio.AbstractEventLoop) -> Sequence[AddrInfo]:
        now = loop.time()
        hit = self._dns.get((host, port))
        if hit is not None and now - hit[0] < DNS_TTL:
            return hit[1]
        infos = interleave(await self._resolver(host, port))
        if not infos:
            raise OSError(f"cannot resolve {host}")
        self._dns[(host, port)] = (now, infos)
        return infos

    def _arm(self) -> None:
        assert self._loop is not None
        self._watchdog = self._loop.call_later(min(1.0, max(0.05, self.timeout / 4)), self._watch)

    def _watch(self) -> None:
        """Abort requests past their deadline; close connections idle for too long."""
        assert self._loop is not None
        now = self._loop.time()
        for conn in [c for c in self._busy if c.deadline <= now]:
            conn.time_out()
        for key, conns in list(self._idle.items()):
            fresh = []
            for c in conns:
                if c.closed:
                    continue
                if now - c.idle_since > IDLE_SECONDS:
                    c.close()
                else:
                    fresh.append(c)
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]
        self._watchdog = None
        if self._busy or self._idle:
            self._arm()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        conns = [c for cs in self._idle.values() for c in cs] + list(self._busy)
        self._idle.clear()
        for c in conns:
            c.close()
        if conns:
            await asyncio.sleep(0)  # let the transports run their close callbacks
