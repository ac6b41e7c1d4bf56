"""Configuration: flags > HFBATCH_* environment > defaults, the token lookup, and state directories."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import UsageError
from .http.bodies import MAX_RESPONSE_BYTES
from .limits import Capacity

_HF_HOST_SUFFIXES = ("huggingface.co", "hf.space", "huggingface.cloud", "hf.co")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
_SIZE_MAX = 1 << 40  # 1 TB: past any real need, and within zlib's max_length (a C ssize_t)


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything `hfbatch submit` needs; built by the CLI, read by the core (never typer types)."""

    input_path: str
    output_path: str  # "-" = stdout
    errors_path: str
    base_url: str | None = None
    concurrency: int = 32
    timeout: float = 300.0
    max_attempts: int = 6
    max_response_bytes: int = MAX_RESPONSE_BYTES  # an answer's largest size after decoding; over it: an error line
    skip_invalid: bool = False
    endpoint: str | None = None
    summary_path: str | None = None
    quiet: bool = False
    bill_to: str | None = None
    completion_window: str = "24h"
    grace: float = 10.0
    overwrite: bool = False
    retry_failed: bool = False
    wait: bool = False
    detach: bool = False
    batch_id: str | None = None  # `hfbatch resume ID`: this batch, found by id rather than by identity
    rpm: float | None = None
    tpm: float | None = None
    adapt: bool = True
    route: str | None = None
    fallback: tuple[str, ...] = ()
    max_tokens: int | None = None
    dedupe: bool = True
    cache: bool = False
    coalesce: int | None = None
    budget: float | None = None
    prices: str | None = None
    dry_run: bool = False
    handle_signals: bool = True  # False inside `hfbatch serve`, whose process owns SIGINT/SIGTERM
    metadata: dict[str, str] | None = None  # OpenAI's batch metadata (hfbatch serve)
    new_batch_id: str | None = None  # the id a new batch gets (hfbatch serve answers with it at once)
    shutdown: Any = None  # an asyncio.Event: set = stop like SIGTERM (grace for in-flight requests)
    capacity: Capacity | None = None  # limits shared with other batches (hfbatch serve: -c is server-wide)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Both become HTTP header values: a line break would end the header (and smuggle others).
        for what, value in (("the token", self.token), ("--bill-to", self.bill_to)):
            if value and any(c in value for c in "\r\n\0"):
                raise UsageError(f"{what} contains a line break or NUL character; check how it was set "
                                 "(a token file or variable with a trailing newline inside quotes?)")

    def options(self) -> dict[str, object]:
        """What `hfbatch resume` needs to run the batch again (never the token)."""
        return {
            "base_url": self.base_url, "concurrency": self.concurrency, "timeout": self.timeout,
            "max_attempts": self.max_attempts, "max_response_bytes": self.max_response_bytes,
            "skip_invalid": self.skip_invalid,
            "endpoint": self.endpoint, "bill_to": self.bill_to,
            "completion_window": self.completion_window, "grace": self.grace,
            "rpm": self.rpm, "tpm": self.tpm, "adapt": self.adapt, "route": self.route,
            "fallback": list(self.fallback), "max_tokens": self.max_tokens, "dedupe": self.dedupe,
            "cache": self.cache, "coalesce": self.coalesce, "budget": self.budget, "prices": self.prices,
        }


def default_output_paths(input_path: str) -> tuple[str, str]:
    """`data/in.jsonl` -> (`data/in.output.jsonl`, `data/in.errors.jsonl`); stdin -> files in the cwd."""
    if input_path == "-":
        return "batch.output.jsonl", "batch.errors.jsonl"
    p = Path(input_path)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.stem
    return str(p.with_name(stem + ".output.jsonl")), str(p.with_name(stem + ".errors.jsonl"))


def is_hf_host(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return any(host == s or host.endswith("." + s) for s in _HF_HOST_SUFFIXES)


def resolve_token(flag: str | None, base_url: str | None) -> str | None:
    """--token, else HF_TOKEN, else huggingface_hub's saved login.

    Against the router a token is required. With --base-url the token is optional (a local vLLM
    needs none), and the saved login is only sent to Hugging Face hosts, never to a third party.
    """
    token = flag or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    if base_url is None or is_hf_host(base_url):
        from huggingface_hub import get_token  # imported lazily: ~0.3 s

        saved = get_token()
        if saved:
            return saved
    if base_url is None:
        raise UsageError(
            "no Hugging Face token found: set HF_TOKEN=hf_..., pass --token, or run `hf auth login` "
            "(create one at https://huggingface.co/settings/tokens with 'Make calls to Inference Providers')"
        )
    return None


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not a number") from None


# The completion window a new batch may ask for (`--completion-window`, serve's `completion_window`):
# OpenAI's only value (24h) and anything from a second (tests, quick jobs) to a week. Batches stored
# before the range existed keep their window (they are read with parse_duration).
MIN_WINDOW = 1
MAX_WINDOW = 7 * 86400
WINDOW_RANGE = f"from {MIN_WINDOW}s to {MAX_WINDOW // 86400}d"
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> float:
    """`24h`, `30m`, `90s`, `2d`, `0.5h` or plain seconds -> seconds; NaN when it is not a duration."""
    m = _DURATION_RE.match(text.strip().lower())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else math.nan  # huge digit strings give inf


def parse_duration(text: str, what: str) -> int:
    """A duration (see _seconds) of at least a second -> whole seconds; `what` names the flag in the error."""
    seconds = _seconds(text)
    if not (math.isfinite(seconds) and seconds >= 1):
        raise UsageError(f"{what} {text!r}: use a duration such as 30s, 30m, 2h or 7d")
    return int(seconds)


def parse_size(text: str, flag: str) -> int:
    """`64MB`, `500KB`, `1GB` or bytes -> bytes (binary units: 1KB = 1024). `flag` names the option in the error."""
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGB")
    try:
        value = int(float(num) * _SIZE_UNITS[t[len(num):]])
    except (KeyError, ValueError, OverflowError):  # OverflowError: inf
        value = 0
    if not 0 < value <= _SIZE_MAX:
        raise UsageError(f"{flag} {text!r}: use a size such as 64MB, 500KB or 1GB, or a number of bytes")
    return value


def parse_window(text: str) -> int:
    """A new batch's completion window -> seconds; a UsageError outside MIN_WINDOW..MAX_WINDOW."""
    seconds = _seconds(text)
    if not (math.isfinite(seconds) and MIN_WINDOW <= seconds <= MAX_WINDOW):
        raise UsageError(f"--completion-window {text!r}: use a duration {WINDOW_RANGE}, such as 30m, 2h or 24h")
    return int(seconds)


def options_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The options a batch was submitted with (its meta.json), as RunConfig fields."""
    from dataclasses import fields

    known = {f.name for f in fields(RunConfig)}
    opts = {k: v for k, v in (meta.get("options") or {}).items() if k in known}
    if isinstance(opts.get("fallback"), list):
        opts["fallback"] = tuple(opts["fallback"])
    return opts
