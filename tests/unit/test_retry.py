"""retry.RetryPolicy.decide and parse_retry_after: pure, with injected randomness and clock; no sleeping."""

from __future__ import annotations

import email.utils

import pytest

from hfbatch.http.headers import parse_retry_after
from hfbatch.models import Outcome
from hfbatch.retry import GiveUp, Retry, RetryPolicy, is_retryable

P = RetryPolicy()  # the defaults: 6 attempts, base 0.5 s, cap 30 s, a 500 twice


def answer(status: int | None, parsed: object = {"ok": True}, retry_after: float | None = None,
           error_code: str | None = None) -> Outcome:
    body = b"{}" if parsed is not None else b"<html>"
    return Outcome(status, body, parsed, retry_after=retry_after, error_code=error_code)


def one() -> float:
    return 1.0


def half() -> float:
    return 0.5


def zero() -> float:
    return 0.0


def test_defaults() -> None:
    assert P.max_attempts == 6


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_retry_until_max_attempts(status: int) -> None:
    for attempt in range(1, 6):
        assert isinstance(P.decide(answer(status), attempt, rand=half), Retry), attempt
    assert isinstance(P.decide(answer(status), 6, rand=half), GiveUp)


@pytest.mark.parametrize("code", ["request_timeout", "connection_error", "invalid_response"])
def test_no_answer_outcomes_are_retried(code: str) -> None:
    o = Outcome(None, error_code=code)
    assert isinstance(P.decide(o, 1, rand=half), Retry)
    assert isinstance(P.decide(o, 6, rand=half), GiveUp)


def test_unknown_no_answer_code_is_final() -> None:
    assert isinstance(P.decide(Outcome(None, error_code="unsupported_endpoint"), 1, rand=half), GiveUp)


def test_an_answer_over_the_size_cap_is_final_and_not_resent_by_retry_failed() -> None:
    from hfbatch.batches.ledger import is_retryable_line

    o = Outcome(None, error_code="response_too_large", error_message="the answer is larger than the 64 MB cap")
    assert not is_retryable(o)
    assert isinstance(P.decide(o, 1, rand=half), GiveUp)
    line = {"custom_id": "a", "response": None, "error": {"code": "response_too_large", "message": "..."}}
    assert not is_retryable_line(line)
    assert is_retryable_line({**line, "error": {"code": "connection_error", "message": "..."}})


def http_line(status: int) -> dict[str, object]:
    return {"id": "batch_req_1", "custom_id": "a", "error": None,
            "response": {"status_code": status, "request_id": "req_1", "body": {"error": {"message": "x"}}}}


def no_answer_line(code: str) -> dict[str, object]:
    return {"id": "batch_req_1", "custom_id": "a", "response": None, "error": {"code": code, "message": "x"}}


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_retry_failed_resends_retryable_answers(status: int) -> None:
    from hfbatch.batches.ledger import is_retryable_line

    assert is_retryable_line(http_line(status))


@pytest.mark.parametrize("status", [400, 404, 409, 422, 501, 505, 511, 599])
def test_retry_failed_keeps_final_answers(status: int) -> None:
    from hfbatch.batches.ledger import is_retryable_line

    assert not is_retryable_line(http_line(status))


def test_retry_failed_resends_exactly_what_the_run_retries() -> None:
    """One rule: an error line is re-sent by --retry-failed iff the outcome it records was retryable."""
    from hfbatch.batches.ledger import is_retryable_line

    for status in range(300, 600):
        assert is_retryable_line(http_line(status)) == is_retryable(answer(status)), status
    for code in ["request_timeout", "connection_error", "invalid_response", "response_too_large",
                 "unsupported_endpoint", "model_not_found", "batch_cancelled", "batch_expired"]:
        assert is_retryable_line(no_answer_line(code)) == is_retryable(Outcome(None, error_code=code)), code
    # A 2xx whose body is not JSON is written as an invalid_response line (no response): both retry it.
    assert is_retryable(answer(200, parsed=None)) and is_retryable_line(no_answer_line("invalid_response"))


def test_2xx_with_non_json_body_is_retried_2xx_json_is_final() -> None:
    assert isinstance(P.decide(answer(200, parsed=None), 1, rand=half), Retry)
    assert isinstance(P.decide(answer(200), 1, rand=half), GiveUp)


def test_500_is_retried_once_only() -> None:
    assert isinstance(P.decide(answer(500), 1, rand=half, answers_500=1), Retry)
    assert isinstance(P.decide(answer(500), 2, rand=half, answers_500=2), GiveUp)
    # even with a generous attempt budget
    assert isinstance(RetryPolicy(max_attempts=20).decide(answer(500), 2, rand=half, answers_500=2), GiveUp)


def test_a_first_500_after_other_failures_is_still_retried() -> None:
    # 429, then 500: the 500 is the first one, so it gets its one retry.
    assert isinstance(P.decide(answer(500), 2, rand=half, answers_500=1), Retry)


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 409, 413, 422])
def test_client_errors_are_final(status: int) -> None:
    assert isinstance(P.decide(answer(status), 1, rand=one), GiveUp)


def test_exponential_backoff_with_full_jitter() -> None:
    p = RetryPolicy(max_attempts=100, base=0.5, cap=30.0)
    # rand() == 1: the upper bound of the window
    assert [p.decide(answer(429), a, rand=one).delay for a in range(1, 8)] == [  # type: ignore[union-attr]
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    # rand() scales the window: full jitter
    assert p.decide(answer(429), 3, rand=half).delay == pytest.approx(1.0)  # type: ignore[union-attr]
    assert p.decide(answer(429), 3, rand=zero).delay == 0.0  # type: ignore[union-attr]


def test_delay_is_capped() -> None:
    p = RetryPolicy(max_attempts=100, cap=5.0)
    assert p.decide(answer(503), 40, rand=one).delay == 5.0  # type: ignore[union-attr]


def test_retry_after_is_a_floor() -> None:
    d = P.decide(answer(429, retry_after=7.0), 1, rand=zero)
    assert isinstance(d, Retry) and d.delay == 7.0
    # a longer jittered delay wins over a short Retry-After
    d = RetryPolicy(max_attempts=100).decide(answer(429, retry_after=0.1), 5, rand=one)
    assert isinstance(d, Retry) and d.delay == 8.0


def test_huge_retry_after_is_bounded() -> None:
    d = P.decide(answer(429, retry_after=86400.0 * 30), 1, rand=zero)
    assert isinstance(d, Retry) and d.delay == P.max_retry_after


def test_retry_after_does_not_make_a_final_status_retryable() -> None:
    assert isinstance(P.decide(answer(400, retry_after=1.0), 1, rand=zero), GiveUp)


def test_max_attempts_one_never_retries() -> None:
    assert isinstance(RetryPolicy(max_attempts=1).decide(answer(429), 1, rand=half), GiveUp)


def test_is_retryable() -> None:
    assert is_retryable(answer(429)) and is_retryable(answer(500)) and is_retryable(answer(502))
    assert not is_retryable(answer(400)) and not is_retryable(answer(200))
    assert is_retryable(answer(204, parsed=None))


# ------------------------------------------------------------------ Retry-After


@pytest.mark.parametrize("value, seconds", [("0", 0.0), ("120", 120.0), (" 7 ", 7.0), ("1.5", 1.5),
                                            ("-5", 0.0)])
def test_retry_after_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


@pytest.mark.parametrize("value", [None, "", "soon", "Thursday", "12abc"])
def test_retry_after_unparseable_is_none(value: str | None) -> None:
    assert parse_retry_after(value) is None


def test_retry_after_http_date_is_relative_to_now() -> None:
    when = 1_700_000_000.0
    header = email.utils.formatdate(when, usegmt=True)  # e.g. "Tue, 14 Nov 2023 22:13:20 GMT"
    assert parse_retry_after(header, now=lambda: when - 30) == pytest.approx(30.0)
    assert parse_retry_after(header, now=lambda: when - 3600) == pytest.approx(3600.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    header = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert parse_retry_after(header, now=lambda: 2_000_000_000.0) == 0.0


def test_retry_after_imf_fixdate_example_from_rfc() -> None:
    base = email.utils.parsedate_to_datetime("Sun, 06 Nov 1994 08:49:37 GMT").timestamp()
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=lambda: base - 10) == pytest.approx(10.0)
