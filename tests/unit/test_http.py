"""The HTTP layer against real sockets on 127.0.0.1: a scripted raw server that answers with exact bytes, so
framing, keep-alive, errors, timeouts and the size cap are checked as a server would really produce them.

What both clients must share runs through HttpTransport.post once per client (the `client` fixture: the
lean client, hfbatch/http/lean.py, and aiohttp, hfbatch/http/aio.py); the lean client's own internals
(prewarm, its DNS cache, how it connects) are tested on its Pool."""

from __future__ import annotations

import asyncio
import errno
import gc
import gzip
import select
import shutil
import socket
import ssl
import subprocess
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import MIB, deflate_bomb

from hfbatch.http.lean import AddrInfo, Pool, interleave
from hfbatch.http.transport import HttpTransport, Transport

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection open


class RawServer:
    """Reads one request at a time (head + Content-Length body) and lets `handler` answer it."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        self.ended = 0  # connections over (either side closed them)
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                if not await self.handler(head + body, writer):
                    return
        finally:
            self.ended += 1
            writer.close()


def answer(status: int, body: bytes, *extra: str, length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + list(extra)
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def ok(payload: Any = None, *extra: str) -> Handler:
    async def handle(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer(200, orjson.dumps(payload if payload is not None else {"ok": True}), *extra))
        await w.drain()
        return True
    return handle


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def fields(request: bytes) -> dict[bytes, bytes]:
    """A request's header fields, names and values lower-cased."""
    head = request.partition(b"\r\n\r\n")[0]
    return dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])


def dead_port() -> int:
    """A port nobody listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


async def until(check: Callable[[], bool], seconds: float = 3.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within the time allowed")


@pytest.fixture(params=["lean", "aiohttp"])
def client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test through Transport with each HTTP client: the same behaviour from both."""
    if request.param == "aiohttp":
        monkeypatch.setenv("HFBATCH_HTTP", "aiohttp")
    else:
        monkeypatch.delenv("HFBATCH_HTTP", raising=False)
    return str(request.param)


# --------------------------------------------------------------------------- what both clients share


def test_keep_alive_reuses_one_connection_and_sends_exact_requests(client: str) -> None:
    async def main() -> None:
        async with RawServer(ok({"n": 1}, "x-request-id: r-1", "X-Inference-Provider: fake-a")) as srv:
            async with Transport(4, 5, "hf_x") as t:
                for i in range(3):
                    o = await t.post(srv.url + "/v1/chat/completions?q=1", b'{"i":%d}' % i)
                    assert o.status == 200 and o.parsed == {"n": 1} and o.body == b'{"n":1}'
                    assert (o.request_id, o.provider) == ("r-1", "fake-a")
                assert (t._pool is None) == (client == "aiohttp")
            assert srv.connections == 1
            head, _, body = srv.requests[2].partition(b"\r\n\r\n")
            assert head.split(b"\r\n")[0] == b"POST /v1/chat/completions?q=1 HTTP/1.1"
            f = fields(srv.requests[2])
            assert f[b"host"] == f"127.0.0.1:{srv.port}".encode()
            assert f[b"authorization"] == b"bearer hf_x" and f[b"content-length"] == b"7"
            assert f[b"content-type"] == b"application/json" and f[b"user-agent"].startswith(b"hfbatch/")
            assert body == b'{"i":2}'
    run(main())


def test_chunked_gzip_deflate_close_delimited_and_interim_answers(client: str) -> None:
    payload = orjson.dumps({"text": "x" * 5000})

    async def handle(req: bytes, w: asyncio.StreamWriter) -> bool:
        kind = req.split(b" ")[1]
        if kind == b"/chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(payload), 700):
                part = payload[i:i + 700]
                w.write(b"%x\r\n%b\r\n" % (len(part), part))
                await w.drain()
                await asyncio.sleep(0.001)
            w.write(b"0\r\n\r\n")
        elif kind == b"/gzip":
            w.write(answer(200, gzip.compress(payload), "Content-Encoding: gzip"))
        elif kind == b"/deflate":
            w.write(answer(200, zlib.compress(payload), "Content-Encoding: deflate"))
        elif kind == b"/raw-deflate":
            c = zlib.compressobj(wbits=-15)
            w.write(answer(200, c.compress(payload) + c.flush(), "Content-Encoding: deflate"))
        elif kind == b"/interim":
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(200, payload))
        elif kind == b"/close":
            w.write(answer(200, payload, "Connection: close", length=False))
            await w.drain()
            return False
        await w.drain()
        return True

    async def main() -> None:
        async with RawServer(handle) as srv:
            async with Transport(4, 5, None) as t:
                for path in ("/chunked", "/gzip", "/deflate", "/raw-deflate", "/interim", "/close", "/chunked"):
                    o = await t.post(srv.url + path, b"{}")
                    assert (o.status, o.body, o.error_code) == (200, payload, None), (path, o.error_message)
            assert srv.connections == 2  # the close-delimited answer ended the first connection
    run(main())


def test_connection_close_and_a_server_closing_an_idle_connection(client: str) -> None:
    async def handle(req: bytes, w: asyncio.StreamWriter) -> bool:
        path = req.split(b" ")[1]
        if path == b"/bye":
            w.write(answer(201, b'{"a":1}', "Connection: close"))
        else:  # answer, then close the idle connection a moment later (a server's keep-alive timeout)
            w.write(answer(200, b"{}"))
            await w.drain()
            await asyncio.sleep(0.05)
            return False
        await w.drain()
        return path != b"/bye"

    async def main() -> None:
        async with RawServer(handle) as srv:
            async with Transport(4, 5, None) as t:
                o = await t.post(srv.url + "/bye", b"{}")
                assert (o.status, o.parsed) == (201, {"a": 1})
                assert (await t.post(srv.url + "/idle", b"{}")).status == 200
                await asyncio.sleep(0.3)  # the server closed that connection meanwhile
                assert (await t.post(srv.url + "/idle", b"{}")).status == 200
            assert srv.connections == 3
    run(main())


def test_broken_answers_are_connection_errors_and_do_not_poison_the_pool(client: str) -> None:
    async def handle(req: bytes, w: asyncio.StreamWriter) -> bool:
        path = req.split(b" ")[1]
        if path == b"/truncated":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"par")
        elif path == b"/garbage":
            w.write(b"SMTP ready\r\n\r\n")
        elif path == b"/bad-gzip":  # well framed: the server keeps the connection (the lean client does not)
            w.write(answer(200, b"not gzip at all", "Content-Encoding: gzip"))
            await w.drain()
            return True
        elif path == b"/silent-close":
            return False
        else:
            w.write(answer(200, b"{}"))
            await w.drain()
            return True
        await w.drain()
        return False

    async def main() -> None:
        async with RawServer(handle) as srv:
            async with Transport(4, 5, None) as t:
                for path, lean_says in (("/truncated", "mid-answer"), ("/garbage", "invalid HTTP"),
                                        ("/bad-gzip", "could not decode a gzip body"),
                                        ("/silent-close", "before answering")):
                    o = await t.post(srv.url + path, b"{}")
                    assert (o.status, o.error_code) == (None, "connection_error"), (path, o.status, o.error_code)
                    if client == "lean":
                        assert "ProtocolError" in (o.error_message or "") and lean_says in (o.error_message or "")
                    assert (await t.post(srv.url + "/fine", b"{}")).status == 200
    run(main())


def test_timeouts_and_refusals_are_outcomes(client: str) -> None:
    async def handle(req: bytes, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    async def main() -> None:
        async with RawServer(handle) as srv:
            async with Transport(4, 0.4, "hf_secret") as t:
                o = await t.post(srv.url + "/hang", b"{}")
                assert o.status is None and o.error_code == "request_timeout"
                assert 0.3 < o.latency < 10  # the timeout (0.4 s), not the server's 30 s, however busy the machine
                o = await t.post(f"http://127.0.0.1:{dead_port()}/v1/x", b"{}")
                assert o.status is None and o.error_code == "connection_error"
                assert "hf_secret" not in (o.error_message or "")
                with pytest.raises(OSError):  # get_json raises instead
                    await t.get_json(f"http://127.0.0.1:{dead_port()}/v1/models")
    run(main())


def test_get_json_fails_as_oserror_on_whatever_a_server_does(client: str) -> None:
    """load_catalog falls back to its cache on an OSError only (anything else is a bug): no answer in time, a non-2xx
    answer, a body that is not JSON, an answer over the cap all raise OSError from get_json."""
    async def handle(req: bytes, w: asyncio.StreamWriter) -> bool:
        path = req.split(b" ", 2)[1]
        if path == b"/hang":
            await asyncio.sleep(30)
        w.write({b"/json": answer(200, b'[1, 2]'), b"/text": answer(200, b"<html>"), b"/503": answer(503, b"{}"),
                 b"/huge": answer(200, b"[" + b"0," * 600 + b"0]")}[path])
        await w.drain()
        return True

    async def main() -> None:
        async with RawServer(handle) as srv:
            async with Transport(4, 0.4, None, max_response_bytes=1000) as t:
                assert await t.get_json(srv.url + "/json") == [1, 2]  # JSON (a model list or not: the caller's)
                for path in ("/text", "/503", "/huge", "/hang"):
                    with pytest.raises(OSError, match=path):
                        await t.get_json(srv.url + path)
    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_with_a_trusted_certificate_and_sni(tmp_path: Path, client: str) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        srv = RawServer(ok({"tls": True}))
        server = await asyncio.start_server(srv._serve, "127.0.0.1", 0, ssl=server_ctx)
        url = f"https://localhost:{server.sockets[0].getsockname()[1]}/v1/x"
        try:
            async with HttpTransport(4, 5, None, ssl_context=client_ctx) as t:
                for _ in range(2):
                    o = await t.post(url, b"{}")
                    assert (o.status, o.parsed) == (200, {"tls": True}), o.error_message
            assert srv.connections == 1
            # the system store does not trust this certificate: the handshake fails, as it should
            async with HttpTransport(4, 5, None) as t:
                o = await t.post(url, b"{}")
                assert (o.status, o.error_code) == (None, "connection_error")
                assert "certificate verify failed" in (o.error_message or ""), o.error_message
            assert len(srv.requests) == 2  # the refused handshake never got as far as a request
        finally:
            server.close()
    run(main())


async def redirecting(req: bytes, w: asyncio.StreamWriter) -> bool:
    """/status/<code>[?to=<port>]: a redirect to /v1/here, on this origin or on 127.0.0.1:<port>;
    /loop/<n>: a 307 to /loop/<n+1>; /nowhere: a 307 without a Location; else the request, as JSON."""
    method, path = req.split(b" ")[:2]
    p = path.decode()
    if p.startswith("/status/"):
        code, _, query = p.removeprefix("/status/").partition("?")
        where = f"http://127.0.0.1:{query.split('=')[1]}/v1/here" if query else "/v1/here"
        w.write(answer(int(code), b"", f"Location: {where}"))
    elif p.startswith("/loop/"):
        w.write(answer(307, b"", f"Location: /loop/{int(p.split('/')[2]) + 1}"))
    elif p == "/nowhere":
        w.write(answer(307, b""))
    else:
        body = req.partition(b"\r\n\r\n")[2].decode()
        w.write(answer(200, orjson.dumps({"method": method.decode(), "path": p, "body": body,
                                          "token": fields(req).get(b"authorization", b"").decode()})))
    await w.drain()
    return True


@pytest.mark.parametrize("code", [307, 308])
def test_a_post_follows_307_and_308_within_the_origin_with_its_method_body_and_token(client: str, code: int) -> None:
    async def main() -> None:
        async with RawServer(redirecting) as srv, Transport(4, 5, "hf_secret") as t:
            o = await t.post(srv.url + f"/status/{code}", b'{"k":1}')
            assert (o.status, o.parsed) == (200, {"method": "POST", "path": "/v1/here", "body": '{"k":1}',
                                                  "token": "bearer hf_secret"}), (o.status, o.error_message)
    run(main())


@pytest.mark.parametrize("code", [301, 302, 303])
def test_a_post_does_not_follow_a_redirect_that_would_make_it_a_get(client: str, code: int) -> None:
    async def main() -> None:
        async with RawServer(redirecting) as srv, Transport(4, 5, "hf_secret") as t:
            o = await t.post(srv.url + f"/status/{code}", b"{}")
            assert (o.status, o.error_code) == (code, None), (o.status, o.parsed, o.error_message)
            assert len(srv.requests) == 1, srv.requests[1:]
    run(main())


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_not_followed_so_the_token_stays_home(client: str, code: int) -> None:
    async def main() -> None:
        async with RawServer(redirecting) as srv, RawServer(ok({"elsewhere": True})) as other:
            async with Transport(4, 5, "hf_secret") as t:
                o = await t.post(f"{srv.url}/status/{code}?to={other.port}", b"{}")
                assert (o.status, o.error_code) == (code, None), (o.status, o.parsed, o.error_message)
                with pytest.raises(OSError, match=f"HTTP {code}"):  # nor for a GET
                    await t.get_json(f"{srv.url}/status/{code}?to={other.port}")
            assert other.requests == []
    run(main())


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_get_follows_any_redirect_within_the_origin(client: str, code: int) -> None:
    async def main() -> None:
        async with RawServer(redirecting) as srv, Transport(4, 5, None) as t:
            got = await t.get_json(srv.url + f"/status/{code}")
            assert (got["method"], got["path"]) == ("GET", "/v1/here")
    run(main())


def test_at_most_five_redirects_then_the_answer_as_it_is(client: str) -> None:
    async def main() -> None:
        async with RawServer(redirecting) as srv, Transport(4, 5, None) as t:
            o = await t.post(srv.url + "/loop/0", b"{}")
            assert (o.status, o.error_code) == (307, None), (o.status, o.error_message)
            assert [r.split(b" ")[1] for r in srv.requests] == [b"/loop/%d" % i for i in range(6)]
            o = await t.post(srv.url + "/nowhere", b"{}")  # no Location: nothing to follow
            assert (o.status, o.error_code) == (307, None)
    run(main())


def test_an_origin_behind_a_proxy_goes_through_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    async def proxy(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer(200, b'{"via":"proxy"}'))
        await w.drain()
        return True

    async def main() -> None:
        async with RawServer(proxy) as px:
            monkeypatch.setenv("HTTP_PROXY", px.url)
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            async with Transport(2, 5, None) as t:
                o = await t.post("http://api.example.invalid/v1/chat/completions", b"{}")
            assert o.status == 200 and o.parsed == {"via": "proxy"}
            # the proxy got an absolute-form request line: the proxy path was taken
            assert px.requests[0].startswith(b"POST http://api.example.invalid/v1/chat/completions HTTP/1.1")
    run(main())


def test_hfbatch_http_aiohttp_forces_the_aiohttp_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFBATCH_HTTP", "aiohttp")

    async def main() -> None:
        async with RawServer(ok({"x": 1})) as srv:
            async with Transport(2, 5, None) as t:
                o = await t.post(srv.url + "/v1/x", b"{}")
                assert o.status == 200 and o.parsed == {"x": 1}
                assert t._pool is None and t._aio is not None
    run(main())


# --------------------------------------------------------------------------- the lean client's own internals


def test_prewarm_opens_the_first_waves_connections_ahead() -> None:
    async def main() -> None:
        async with RawServer(ok({"w": 1})) as srv:
            pool = Pool({}, timeout=5)
            await pool.prewarm(srv.url + "/v1/x", 5)
            await asyncio.sleep(0.05)
            assert srv.connections == 5 and not srv.requests  # connected, nothing sent yet
            await pool.prewarm(srv.url + "/v1/x", 5)  # already there: nothing more opened
            rs = await asyncio.gather(*(pool.request("POST", srv.url + "/v1/x", b"{}") for _ in range(5)))
            assert [r.status for r in rs] == [200] * 5
            assert srv.connections == 5
            await pool.close()
    run(main())


@pytest.fixture
def black_hole() -> Iterator[tuple[str, int]]:
    """An address whose connect hangs (no answer, no refusal), as a black-holed route's does: a listener
    that never accepts, its accept queue full, so that the kernel drops further SYNs."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    addr = listener.getsockname()
    held: list[socket.socket] = []
    try:
        for _ in range(16):
            s = socket.socket()
            held.append(s)
            s.setblocking(False)
            if s.connect_ex(addr) not in (0, errno.EINPROGRESS):
                break
            if not select.select([], [s], [], 0.5)[1]:  # still connecting after 0.5 s: it hangs
                yield addr
                return
        pytest.skip("this machine does not let a connect hang (a full accept queue still completes it)")
    finally:
        for s in held:
            s.close()
        listener.close()


def addrinfo(host: str, port: int) -> AddrInfo:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))


@pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")
def test_a_black_holed_address_does_not_eat_the_connect_timeout(black_hole: tuple[str, int]) -> None:
    """Happy eyeballs (RFC 8305): the next address starts 250 ms after the previous one if that one has not
    connected yet; the first to connect wins, the others are cancelled and their sockets closed. The
    addresses come from the Pool's resolver (here: a hanging one, then the server), cached as DNS is."""
    async def main() -> None:
        async with RawServer(ok({"raced": True})) as srv:
            asked: list[tuple[str, int]] = []

            async def resolve(host: str, port: int) -> list[AddrInfo]:
                asked.append((host, port))
                return [addrinfo(*black_hole), addrinfo("127.0.0.1", srv.port)]

            pool = Pool({}, timeout=60, connect_timeout=30, resolve=resolve)
            try:
                # 30 s to connect: trying the addresses one after the other would still be stuck on the first
                r = await asyncio.wait_for(pool.request("POST", "http://api.example.test:8443/v1/x", b"{}"), 10)
                assert (r.status, orjson.loads(r.body)) == (200, {"raced": True})
                assert srv.connections == 1  # the second address was tried, and won
                await asyncio.wait_for(pool.prewarm("http://api.example.test:8443/v1/x", 3), 10)
                await until(lambda: srv.connections == 3)
                assert asked == [("api.example.test", 8443)]  # resolved once: the DNS cache holds
            finally:
                await pool.close()
        gc.collect()  # a losing attempt's socket left open would warn here (an error in this test)
    run(main())


def test_when_every_address_fails_the_connect_fails() -> None:
    async def main() -> None:
        async def resolve(host: str, port: int) -> list[AddrInfo]:
            return [addrinfo("127.0.0.1", dead_port()), addrinfo("127.0.0.1", dead_port())]

        pool = Pool({}, timeout=5, resolve=resolve)
        with pytest.raises(ConnectionRefusedError):
            await pool.request("POST", "http://api.example.test/v1/x", b"{}")
        await pool.close()
    run(main())


def test_address_families_alternate_starting_with_the_resolvers_first() -> None:
    v6 = [addrinfo(f"2001:db8::{i}", 443) for i in range(3)]
    v4 = [addrinfo(f"192.0.2.{i}", 443) for i in range(2)]
    assert interleave(v6 + v4) == [v6[0], v4[0], v6[1], v4[1], v6[2]]
    assert interleave(v4 + v6) == [v4[0], v6[0], v4[1], v6[1], v6[2]]
    assert interleave(v4) == v4


# --------------------------------------------------------------------------- the answer size cap (both clients)

CAP = MIB  # small in unit tests; the CLI's default is 64 MB (tests/e2e/test_response_cap.py)
BOMB_MIB = 200  # ~200 KB on the wire, 200 MiB inflated
BOMBS = {b"/gzip-bomb": ("gzip", 31), b"/deflate-bomb": ("deflate", 15), b"/raw-deflate-bomb": ("deflate", -15)}


def json_of_size(n: int) -> bytes:
    """A JSON document of exactly n bytes."""
    return b'{"x":"' + b"a" * (n - 8) + b'"}'


async def sized(w: asyncio.StreamWriter, size: int, framing: str) -> None:
    """Answer a JSON body of `size` bytes (after decoding), framed or encoded as `framing`."""
    body = json_of_size(size)
    if framing == "plain":
        w.write(answer(200, body))
    elif framing == "chunked":
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 100_000):
            part = body[i:i + 100_000]
            w.write(b"%x\r\n%b\r\n" % (len(part), part))
        w.write(b"0\r\n\r\n")
    elif framing == "gzip":
        w.write(answer(200, gzip.compress(body), "Content-Encoding: gzip"))
    elif framing == "deflate":
        w.write(answer(200, zlib.compress(body), "Content-Encoding: deflate"))
    await w.drain()


async def hostile(req: bytes, w: asyncio.StreamWriter) -> bool:
    """Answers by path: what a broken or hostile server may send, and answers just under or over the cap."""
    path = req.split(b" ")[1]
    try:
        if path == b"/huge-length":  # announces 1 GiB, sends a little, then waits: the client must not wait
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n" + bytes(1000))
            await w.drain()
        elif path == b"/endless":  # a chunked body that never ends
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"10000\r\n" + bytes(0x10000) + b"\r\n"
            while True:
                w.write(piece)
                await w.drain()
        elif path in BOMBS:  # ~200 KB that inflate to 200 MiB
            encoding, wbits = BOMBS[path]
            length, parts = deflate_bomb(BOMB_MIB, wbits)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: %b\r\nContent-Length: %d\r\n\r\n"
                    % (encoding.encode(), length))
            for part in parts:
                w.write(part)
            await w.drain()
        elif path.startswith(b"/size/"):  # /size/<bytes>/<plain|chunked|gzip|deflate>
            _, _, size, framing = path.decode().split("/")
            await sized(w, int(size), framing)
        else:
            w.write(answer(200, b'{"ok":true}'))
            await w.drain()
    except ConnectionError:
        return False
    return True


def capped() -> Transport:
    # A 3 s timeout: a client that waited for a body it should have refused ends as request_timeout.
    return Transport(4, 3.0, None, max_response_bytes=CAP)


# Answers the client cannot have read to their end when it refuses them (1 GiB announced, or no end at all).
UNFINISHED = ("/huge-length", "/endless")


@pytest.mark.parametrize("path", [
    *UNFINISHED, "/gzip-bomb", "/deflate-bomb", "/raw-deflate-bomb",
    f"/size/{CAP + 1}/plain", f"/size/{CAP + 1}/chunked", f"/size/{CAP + 1}/gzip", f"/size/{CAP + 1}/deflate",
])
def test_an_answer_over_the_cap_is_response_too_large_and_its_connection_closed(client: str, path: str) -> None:
    async def main() -> None:
        async with RawServer(hostile) as srv:
            async with capped() as t:
                o = await t.post(srv.url + path, b"{}")
                assert (o.status, o.error_code) == (None, "response_too_large"), (o.status, o.error_code, o.body[:80])
                assert "--max-response-bytes" in (o.error_message or "") and "1 MB" in (o.error_message or "")
                o = await t.post(srv.url + "/ok", b"{}")
                assert (o.status, o.parsed) == (200, {"ok": True})
                assert (t._pool is None) == (client == "aiohttp")
                if client == "lean" or path in UNFINISHED:
                    await until(lambda: srv.ended == 1)  # the client closed it (the server did not)
                    assert srv.connections == 2, "a connection was reused after a too-large answer"
                # else aiohttp read that answer to its end (well framed) and put its connection back in
                # its pool at that end, before the body was found too large: it may serve the next request.
    run(main())


@pytest.mark.parametrize("framing", ["plain", "chunked", "gzip", "deflate"])
def test_an_answer_exactly_at_the_cap_passes_and_keeps_its_connection(client: str, framing: str) -> None:
    async def main() -> None:
        async with RawServer(hostile) as srv:
            async with capped() as t:
                for _ in range(2):
                    o = await t.post(srv.url + f"/size/{CAP}/{framing}", b"{}")
                    assert o.status == 200 and o.error_code is None, (o.error_code, o.error_message)
                    assert o.body == json_of_size(CAP) and o.parsed == orjson.loads(o.body)
                assert srv.connections == 1
    run(main())


def test_the_price_catalog_get_is_capped_too(client: str) -> None:
    async def main() -> None:
        async with RawServer(hostile) as srv:
            async with capped() as t:
                for path in ("/gzip-bomb", "/huge-length", "/endless"):
                    with pytest.raises(OSError, match="ResponseTooLarge: .*1 MB"):  # the catalog's fallback
                        await t.get_json(srv.url + path)
                assert await t.get_json(srv.url + f"/size/{CAP}/gzip") == orjson.loads(json_of_size(CAP))
    run(main())


def test_an_endless_header_is_cut_off_not_held_until_the_timeout(client: str) -> None:
    """Not the body cap: headers. aiohttp refuses a line over 8190 bytes; the lean client must not
    gather an endless one (it did, until the timeout: memory at network speed)."""
    async def endless_header(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        try:
            while True:
                w.write(b"a" * 0x10000)
                await w.drain()
        except ConnectionError:
            return False

    async def main() -> None:
        async with RawServer(endless_header) as srv:
            async with capped() as t:
                o = await t.post(srv.url + "/x", b"{}")
                assert (o.status, o.error_code) == (None, "connection_error"), (o.status, o.error_code)
                await until(lambda: srv.ended == 1)
    run(main())


@pytest.mark.parametrize("path", ["/gzip-bomb", "/raw-deflate-bomb", "/endless", f"/size/{CAP + 1}/chunked"])
def test_a_too_large_answer_is_freed_at_once_not_left_to_the_cycle_collector(client: str, path: str) -> None:
    """The cap bounds memory only if what it cut is let go when the request ends: the lean client kept the
    inflated bytes and the raw chunks in a reference cycle (connection -> future -> exception -> traceback ->
    frames), freed only when the cycle collector ran; at -c 32, 64 gzip bombs took 4.5 GB under a 64 MB cap.
    With the collector off, what the answers left behind is measured (tracemalloc)."""
    import gc
    import tracemalloc

    async def main() -> int:
        async with RawServer(hostile) as srv:
            async with capped() as t:
                await t.post(srv.url + "/ok", b"{}")  # the client's own allocations, before measuring
                base = tracemalloc.get_traced_memory()[0]
                for _ in range(8):
                    o = await t.post(srv.url + path, b"{}")
                    assert o.error_code == "response_too_large", (o.status, o.error_code)
                    del o
                await asyncio.sleep(0.05)  # the closed connections' callbacks
                return tracemalloc.get_traced_memory()[0] - base

    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        kept = run(main())
    finally:
        tracemalloc.stop()
        gc.enable()
    assert kept < 2 * CAP, f"{kept / MIB:.1f} MiB still held after 8 answers over a {CAP // MIB} MiB cap"
