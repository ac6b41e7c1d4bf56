"""The HTTP seam: the Transport protocol (one POST -> Outcome) the engines and the executor call, and what
the two clients below transport.py share (Client, Response).

HttpTransport (transport.py) is the real one; an in-memory one (hfbatch/testing/) stands in for it in the
executor's unit tests. A Transport never raises for a failed request: the failure is the Outcome's
`error_code` (request_timeout, connection_error, response_too_large).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from typing import Self

    from ..models import Outcome


class Transport(Protocol):
    """What a batch's requests go through; an async context manager, entered once per run."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def post(self, url: str, data: bytes) -> Outcome:
        """POST `data` (a JSON body) to `url`. Always an Outcome: its status and raw body, or, when no
        usable answer came, status None and an error code."""
        ...

    async def get_json(self, url: str) -> Any:
        """GET a JSON document (catalogs, prices). Raises OSError when it cannot be had (no answer, a non-2xx
        answer, not JSON, over the cap); any other exception is a bug."""
        ...

    async def prewarm(self, url: str, n: int) -> None:
        """Open up to `n` connections to `url`'s origin ahead of the first requests (may do nothing);
        never raises for a failed connection."""
        ...


class Response:
    """One HTTP answer as a client returns it; `headers` are read case-insensitively by lower-case name."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class Client(Protocol):
    """One of the two HTTP clients below HttpTransport (lean.Pool, aio.AioClient): one request, one
    answer, no redirects followed. Raises TimeoutError, OSError, ProtocolError, ResponseTooLarge (or a
    client's own errors, listed in its ERRORS) when there is no usable answer."""

    async def request(self, method: str, url: str, body: bytes) -> Response: ...

    async def close(self) -> None: ...
