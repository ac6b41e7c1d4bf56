"""Retry policy (pure): an Outcome and its attempt number -> Retry(delay) | GiveUp. No sleeping here.

Classification follows Hugging Face's own chat-ui (utils/upstreamRetry.ts): retry 429, 502, 503,
504, timeouts and connection errors; the router answers 500 when the upstream model rejected the
request, so a 500 is retried once only. A 2xx whose body is not JSON is a broken answer: retried.
Any other status (501, 505, ...) and any other no-answer code is final: `response_too_large` (over
--max-response-bytes) would come back as large. `retryable` is the one rule: the run's retries use
it, and so does `--retry-failed` when it reads an error line back (ledger.is_retryable_line).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .models import Outcome

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})  # a 500 at most twice per run (RetryPolicy)
NO_ANSWER_CODES = frozenset({"request_timeout", "connection_error", "invalid_response"})


@dataclass(slots=True, frozen=True)
class Retry:
    delay: float


@dataclass(slots=True, frozen=True)
class GiveUp:
    pass


GIVE_UP = GiveUp()


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: delay ~ U(0, min(cap, base * 2**(attempt-1))),
    and never less than the server's Retry-After."""

    max_attempts: int = 6
    base: float = 0.5
    cap: float = 30.0
    max_500_attempts: int = 2
    max_retry_after: float = 600.0

    def decide(
        self, outcome: Outcome, attempt: int, rand: Callable[[], float] = random.random,
        answers_500: int = 1,
    ) -> Retry | GiveUp:
        """`attempt` is the 1-based number of the attempt that produced `outcome`; `answers_500`
        how many of this request's attempts so far were answered 500 (this one included)."""
        if attempt >= self.max_attempts or not is_retryable(outcome):
            return GIVE_UP
        if outcome.status == 500 and answers_500 >= self.max_500_attempts:
            return GIVE_UP
        delay = rand() * min(self.cap, self.base * 2 ** (attempt - 1))
        if outcome.retry_after is not None:
            # Honor the server, but a buggy or hostile header must not park a worker for hours.
            delay = max(delay, min(outcome.retry_after, self.max_retry_after))
        return Retry(delay)


def retryable(status: int | None, error_code: str | None = None) -> bool:
    """The one rule: would another attempt plausibly succeed? `status` is the HTTP answer's (None: no
    answer, then `error_code` says why, as the error line's `error.code`)."""
    if status is None:
        return error_code in NO_ANSWER_CODES
    return status in RETRY_STATUSES


def is_retryable(outcome: Outcome) -> bool:
    """`retryable` for one attempt's outcome; a 2xx that is not JSON is written as an
    `invalid_response` line, and retried as one."""
    if outcome.status is not None and 200 <= outcome.status < 300:
        return outcome.parsed is None
    return retryable(outcome.status, outcome.error_code)

