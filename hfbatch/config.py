"""Configuration: flags > HFBATCH_* environment > defaults, the token lookup, and state directories."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import UsageError
from .http.bodies import MAX_RESPONSE_BYTES

_HF_HOST_SUFFIXES = ("huggingface.co", "hf.space", "huggingface.cloud", "hf.co")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
_SIZE_MAX = 1 << 40  # 1 TB: past any real need, and within zlib's max_length (a C ssize_t)


_ONCE = {"once": True}  # a field of one invocation: not stored with the batch, not used by `resume`


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything a run needs; built by the CLI (or serve), read by the core (never typer types).

    Every field is an option stored with the batch (meta.json "options") and used again by `resume`,
    except those marked `_ONCE` (paths, per-invocation switches, the token): a new flag is one field."""

    input_path: str = field(metadata=_ONCE)
    output_path: str = field(metadata=_ONCE)  # "-" = stdout
    errors_path: str = field(metadata=_ONCE)
    engine: str = "http"
    base_url: str | None = None
    concurrency: int = 32
    timeout: float = 300.0
    max_attempts: int = 6
    max_response_bytes: int = MAX_RESPONSE_BYTES  # an answer's largest size after decoding; over it: an error line
    skip_invalid: bool = False
    endpoint: str | None = None
    bill_to: str | None = None
    completion_window: str = "24h"
    grace: float = 10.0
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
    # --engine vllm / hf-jobs (engines/vllm.py, engines/hf_jobs.py)
    vllm_args: str | None = None  # extra `vllm run-batch` flags, split like a shell would
    gpu_price: float | None = None  # --engine vllm: USD per hour of this machine's GPU
    flavor: str | None = None  # --engine hf-jobs: the Jobs hardware (l4x1, a100-large...)
    image: str | None = None  # --engine hf-jobs: the Docker image (default: a pinned vllm/vllm-openai)
    namespace: str | None = None  # --engine hf-jobs: where the Jobs and the bucket live (default: whoami)
    job_timeout: str | None = None  # --engine hf-jobs: each Job's timeout (default: twice the estimate, >= 30m)
    # --engine ray (engines/ray_engine.py)
    ray_address: str | None = None  # None: start a local Ray; "auto": the cluster this machine is in; or an address
    shards: int | None = None  # how many shards the pending requests are split into (None: from size and CPUs)
    ray_storage: str | None = None  # a folder every node reads and writes: the shard files (default: the batch's)
    gpus_per_worker: float | None = None  # set: each shard runs vLLM's batch runner on this many GPUs
    summary_path: str | None = field(default=None, metadata=_ONCE)
    quiet: bool = field(default=False, metadata=_ONCE)
    overwrite: bool = field(default=False, metadata=_ONCE)
    retry_failed: bool = field(default=False, metadata=_ONCE)
    wait: bool = field(default=False, metadata=_ONCE)
    detach: bool = field(default=False, metadata=_ONCE)
    dry_run: bool = field(default=False, metadata=_ONCE)
    # `hfbatch resume ID`: this batch, found by id rather than by identity
    batch_id: str | None = field(default=None, metadata=_ONCE)
    # OpenAI's batch metadata (kept in the Batch object)
    metadata: dict[str, str] | None = field(default=None, metadata=_ONCE)
    # the id a new batch gets (hfbatch serve answers with it at once)
    new_batch_id: str | None = field(default=None, metadata=_ONCE)
    token: str | None = field(default=None, repr=False, metadata=_ONCE)

    def __post_init__(self) -> None:
        # Both become HTTP header values: a line break would end the header (and smuggle others).
        for what, value in (("the token", self.token), ("--bill-to", self.bill_to)):
            if value and any(c in value for c in "\r\n\0"):
                raise UsageError(f"{what} contains a line break or NUL character; check how it was set "
                                 "(a token file or variable with a trailing newline inside quotes?)")

    def options(self) -> dict[str, object]:
        """What `hfbatch resume` needs to run the batch again (never the token): every stored field."""
        out: dict[str, object] = {}
        for f in fields(self):
            if not f.metadata.get("once"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, Any], **overrides: Any) -> RunConfig:
        """The batch registered with `meta` (its meta.json), run again with its stored options; `overrides`
        are this invocation's (quiet, token, --concurrency...). Options an older hfbatch did not store keep
        their defaults; ones this hfbatch does not know are ignored."""
        stored = meta.get("options") or {}
        opts: dict[str, Any] = {}
        for f in fields(cls):
            if f.metadata.get("once") or f.name not in stored:
                continue
            value = stored[f.name]
            opts[f.name] = tuple(value) if isinstance(f.default, tuple) and isinstance(value, list) else value
        opts.update(input_path=meta["input_file"], output_path=meta["output_path"],
                    errors_path=meta["errors_path"], batch_id=meta["id"])
        opts.update(overrides)
        return cls(**opts)


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
