"""Records that flow between the stages: Request (validated input line), LineError, Outcome (one HTTP exchange)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import HfbatchError


@dataclass(slots=True)
class Request:
    """One valid input line. `body` is the parsed JSON body, `url` the normalized endpoint (`/v1/...`)."""

    line_no: int
    custom_id: str
    url: str
    body: dict[str, Any]
    model: str


@dataclass(slots=True, frozen=True)
class LineError:
    """Why an input line is invalid; `line_no` is 1-based, `custom_id` None when unreadable."""

    line_no: int
    custom_id: str | None
    code: str
    message: str
    param: str | None = None


@dataclass(slots=True)
class Outcome:
    """The result of the last attempt of one request.

    status None means no usable HTTP answer (then `error_code` is request_timeout | connection_error |
    response_too_large | ...).
    `body` is the raw answer; `parsed` its JSON when it parsed (a dict or list), else None.
    """

    status: int | None
    body: bytes = b""
    parsed: Any = None
    request_id: str | None = None
    provider: str | None = None
    retry_after: float | None = None
    latency: float = 0.0
    error_code: str | None = None
    error_message: str | None = None


@dataclass
class RunResult:
    batch: dict[str, Any]
    error: HfbatchError | None  # raised by the CLI after the summary is printed
    replayed: bool = False
