"""Records that flow between the stages: Request (a validated input line), LineError, Outcome (one HTTP
exchange), Answer (what a request ends as: one line), and the statuses a batch and a run go through."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

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

    status None means no HTTP answer (then `error_code` is request_timeout | connection_error | ...).
    `body` is the raw answer; `parsed` its JSON when it parsed, else None.
    """

    status: int | None
    body: bytes = b""
    parsed: object = None
    request_id: str | None = None
    provider: str | None = None
    retry_after: float | None = None
    latency: float = 0.0
    error_code: str | None = None
    error_message: str | None = None


# -- what a request ends as: exactly one line ---------------------------------------------------------

Body = orjson.Fragment | dict[str, Any]  # a provider's bytes passed through, or a body we built


@dataclass(slots=True, frozen=True)
class Success:
    """A 2xx answer: an output-file line. `tokens` = (input, output) usage, for savings and cost."""

    status: int
    request_id: str
    body: Body
    tokens: tuple[int, int] = (0, 0)


@dataclass(slots=True, frozen=True)
class Failure:
    """A non-2xx HTTP answer: an error-file line with `response` set (the body in OpenAI's error envelope)."""

    status: int
    request_id: str
    body: dict[str, Any]


@dataclass(slots=True, frozen=True)
class NoAnswer:
    """No usable answer (timeout, connection error, refused line...): an error-file line with `error` set."""

    code: str
    message: str


Answer = Success | Failure | NoAnswer


# -- statuses ------------------------------------------------------------------------------------------


class BatchStatus(enum.StrEnum):
    """OpenAI's Batch statuses, exactly."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED,
                               BatchStatus.CANCELLED})


class RunState(enum.StrEnum):
    """Ours (`hfbatch.state`): whether a process runs the batch, and how its last run ended."""

    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"  # stopped early, resumable
    FAILED = "failed"  # the input failed validation


class StopReason(enum.StrEnum):
    """Why a run stopped before every request had a line (`hfbatch.stop_reason`)."""

    SIGNAL = "signal"  # SIGINT/SIGTERM
    AUTH = "auth"  # 401/403: stops at once
    CREDITS = "credits"  # 402: in-flight requests finish
    BUDGET = "budget"  # --budget reached
    CANCELLED = "cancelled"  # hfbatch cancel / the API
    EXPIRED = "expired"  # the completion window
    SHUTDOWN = "shutdown"  # hfbatch serve is stopping
    WRITE_ERROR = "write_error"  # a file could not be written
    INTERNAL_ERROR = "internal_error"  # a bug: the run stops, resumable, exit 1
    PROCESS_EXITED = "process_exited"  # its process died without a word (seen by list/status)
    OVERWRITTEN = "overwritten"  # another batch took its files (--overwrite)
    ENGINE_FAILED = "engine_failed"  # a vLLM run or a Job ended in an error (the rest is resumable)
    INPUT_CHANGED = "input_changed"  # the input file shrank under the run: requests never read (resumable)


@dataclass
class RunResult:
    batch: dict[str, Any]
    error: HfbatchError | None  # raised by the CLI after the summary is printed
    replayed: bool = False  # the batch had ended: its stored result, nothing sent
    detached: bool = False  # registered and validated: the caller starts its runner (--detach)
