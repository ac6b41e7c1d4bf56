"""Durations: the completion window's range (CLI and serve) and plain durations (--older-than)."""

from __future__ import annotations

import pytest

from hfbatch.config import MAX_WINDOW, MIN_WINDOW, parse_duration, parse_window
from hfbatch.errors import UsageError


@pytest.mark.parametrize("text, seconds", [
    ("24h", 86400), ("2h", 7200), ("30m", 1800), ("2s", 2), ("1s", 1), ("90", 90), (" 7D ", 604800),
    ("604800s", 604800), ("0.5h", 1800),
])
def test_window_in_the_range(text: str, seconds: int) -> None:
    assert parse_window(text) == seconds
    assert MIN_WINDOW <= seconds <= MAX_WINDOW


@pytest.mark.parametrize("text", [
    "999999h", "8d", "604801s", "0s", "0", "0.5s", "-1h", "nan", "NaN", "inf", "-inf", "1e309s", "1e309", "",
    "soon", "h", "24x", "1_0h",
])
def test_window_outside_the_range_is_refused(text: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_window(text)
    message = str(e.value)
    assert message.startswith("--completion-window ") and "from 1s to 7d" in message and "\n" not in message


def test_plain_durations_have_no_upper_bound_but_must_be_finite() -> None:
    assert parse_duration("30d", "--older-than") == 30 * 86400
    for text in ("inf", "nan", "1e309d", "0s", "-2h", "x"):
        with pytest.raises(UsageError, match="^--older-than "):
            parse_duration(text, "--older-than")
