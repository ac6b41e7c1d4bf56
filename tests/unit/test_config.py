"""config.py: durations (the completion window's range, --older-than), sizes (--max-response-bytes,
serve's --max-upload) and the options a batch is resumed with."""

from __future__ import annotations

import pytest

from hfbatch.config import (
    MAX_WINDOW,
    MIN_WINDOW,
    RunConfig,
    parse_duration,
    parse_size,
    parse_window,
)
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



@pytest.mark.parametrize(("text", "value"), [
    ("64MB", 64 << 20), ("1GB", 1 << 30), ("500KB", 500 << 10), ("100", 100), ("100B", 100),
    ("1.5MB", 3 << 19), (" 64 mb ", 64 << 20),
])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text, "--max-response-bytes") == value


@pytest.mark.parametrize("text", ["", "lots", "0", "-5MB", "12XB", "MB", "inf", "nan", "5000GB"])
def test_bad_sizes_name_the_flag(text: str) -> None:
    with pytest.raises(UsageError, match="^--max-upload .*64MB"):
        parse_size(text, "--max-upload")


META = {"id": "batch_1", "input_file": "/in.jsonl", "output_path": "/o.jsonl", "errors_path": "/e.jsonl"}


def test_the_response_cap_defaults_to_64_mb_and_is_kept_for_resume() -> None:
    cfg = RunConfig("in.jsonl", "out.jsonl", "err.jsonl")
    assert cfg.max_response_bytes == 64 << 20
    cfg = RunConfig("in.jsonl", "out.jsonl", "err.jsonl", max_response_bytes=1000, token="hf_x")
    assert cfg.options()["max_response_bytes"] == 1000 and "token" not in cfg.options()
    again = RunConfig.from_meta({**META, "options": cfg.options()})
    assert again.max_response_bytes == 1000 and again.token is None
    # a batch registered before the flag existed resumes with the default
    old = RunConfig.from_meta({**META, "options": {"timeout": 5}})
    assert old.max_response_bytes == 64 << 20 and old.timeout == 5


def test_options_are_every_stored_field_and_from_meta_round_trips_them() -> None:
    """A new flag is one field: options() and from_meta() follow the dataclass (no list to keep in sync)."""
    cfg = RunConfig("in.jsonl", "out.jsonl", "err.jsonl", concurrency=7, fallback=("a", "b"), budget=2.5,
                    quiet=True, overwrite=True, retry_failed=True, token="hf_secret", metadata={"k": "v"})
    opts = cfg.options()
    once = {"input_path", "output_path", "errors_path", "summary_path", "quiet", "overwrite", "retry_failed",
            "wait", "detach", "dry_run", "batch_id", "metadata", "new_batch_id", "token"}
    from dataclasses import fields

    assert set(opts) == {f.name for f in fields(RunConfig)} - once
    assert opts["fallback"] == ["a", "b"]  # JSON-able
    again = RunConfig.from_meta({**META, "options": opts}, quiet=False)
    assert again.fallback == ("a", "b") and again.concurrency == 7 and again.budget == 2.5
    assert (again.input_path, again.output_path, again.errors_path, again.batch_id) == (
        "/in.jsonl", "/o.jsonl", "/e.jsonl", "batch_1")
    assert not again.overwrite and not again.retry_failed and again.token is None  # this invocation's, not stored
    newer = RunConfig.from_meta({**META, "options": {**opts, "a_flag_from_the_future": 1}})
    assert newer.concurrency == 7  # an option this hfbatch does not know is ignored
