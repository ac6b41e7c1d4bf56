"""HTTP answer bodies, for both clients (lean.py and aio.py): the size cap and bounded
gzip/deflate decoding. Input: raw body bytes and a cap; output: the decoded body, or ResponseTooLarge.

Why a cap: whatever a server sends (a gzip bomb, a huge Content-Length, an endless chunked body), one
answer may hold at most about twice the cap in memory (its raw bytes, then its decoded bytes), so a run's
peak stays near concurrency x 2 x cap. The clients count raw bytes as they arrive and refuse a
Content-Length over the cap before reading the body; decoding stops one byte past the cap (zlib's
`max_length`), so a bomb never inflates further.
"""

from __future__ import annotations

import zlib

MAX_RESPONSE_BYTES = 64 << 20  # RunConfig's default (--max-response-bytes)
_UNITS = ((1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "KB"))


class ProtocolError(Exception):
    """The server's bytes are not a valid HTTP/1.1 answer, or the connection ended mid-answer."""


class ResponseTooLarge(Exception):
    """An answer over the cap (after decoding). Its connection is closed, never reused; not retried."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        super().__init__(
            f"the answer is larger than the {format_size(limit)} cap ({what}); it was dropped and its "
            "connection closed. If answers this large are expected, raise --max-response-bytes "
            "(HFBATCH_MAX_RESPONSE_BYTES)")


def format_size(n: int) -> str:
    """64 MB, 500 KB, 1 GB (binary units, as parse_size reads them), else bytes."""
    for unit, name in _UNITS:
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def check_length(value: str | None, limit: int) -> None:
    """Refuse a Content-Length over the cap before reading the body (a malformed one is the parser's business)."""
    if value is not None:
        v = value.strip()
        if v.isdigit() and int(v) > limit:
            raise ResponseTooLarge(limit, f"Content-Length: {v}")


def decode(encoding: str, body: bytes, limit: int) -> bytes:
    """Undo a Content-Encoding, never producing more than `limit` bytes: ResponseTooLarge past it; ValueError
    (zlib.error included) for a broken stream or an encoding we did not ask for."""
    enc = encoding.strip().lower()
    if enc in ("gzip", "x-gzip"):
        return _inflate(body, 47, limit)  # 32 + 15: a gzip or zlib header
    if enc == "deflate":
        try:
            return _inflate(body, 15, limit)
        except zlib.error:
            pass  # (out of the except block: an error raised next does not carry this one and its frames)
        return _inflate(body, -15, limit)  # raw deflate, as some servers send it
    if enc == "identity":
        return body
    raise ValueError(f"unsupported content-encoding {encoding!r}")


def _inflate(body: bytes, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    out = d.decompress(body, limit + 1)  # stops there: a bomb inflates by one byte past the cap at most
    if len(out) > limit:
        del out  # not kept alive by the exception's traceback
        raise ResponseTooLarge(limit, f"its {'gzip' if wbits == 47 else 'deflate'} body inflates past it")
    if not d.eof:
        raise zlib.error("incomplete or truncated stream")
    return out
