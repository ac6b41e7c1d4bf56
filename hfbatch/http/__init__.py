"""http: the HTTP layer, one request -> Outcome. `Transport` is the protocol the engines and the executor
call (base.py); `HttpTransport` the real one (transport.py), over the lean client (lean.py) and aiohttp
(aio.py)."""

from .base import Transport
from .bodies import MAX_RESPONSE_BYTES, ProtocolError, ResponseTooLarge
from .transport import HttpTransport

__all__ = ["MAX_RESPONSE_BYTES", "HttpTransport", "ProtocolError", "ResponseTooLarge", "Transport"]
