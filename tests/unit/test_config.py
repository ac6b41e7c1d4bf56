"""config.py: sizes (--max-response-bytes, serve's --max-upload) and the options a batch is resumed with."""

from __future__ import annotations

import pytest

from hfbatch.config import RunConfig, options_from_meta, parse_size
from hfbatch.errors import UsageError


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


def test_the_response_cap_defaults_to_64_mb_and_is_kept_for_resume() -> None:
    cfg = RunConfig("in.jsonl", "out.jsonl", "err.jsonl")
    assert cfg.max_response_bytes == 64 << 20
    cfg = RunConfig("in.jsonl", "out.jsonl", "err.jsonl", max_response_bytes=1000, token="hf_x")
    opts = options_from_meta({"options": cfg.options()})
    assert opts["max_response_bytes"] == 1000 and "token" not in opts
    # a batch registered before the flag existed resumes with the default
    old = RunConfig("in.jsonl", "o", "e", **options_from_meta({"options": {"timeout": 5}}))
    assert old.max_response_bytes == 64 << 20
