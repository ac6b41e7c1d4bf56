"""Summary stage: counters folded from outcomes -> the OpenAI Batch object (+ our figures under "hfbatch")."""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NotRequired, Protocol, TypedDict

from . import __version__
from .models import BatchStatus, LineError, RunState, StopReason

MAX_REPORTED_ERRORS = 10_000


class CostReport(Protocol):
    """What an engine spent: `spent` (USD so far) and the JSON report under the Batch object's hfbatch.cost."""

    @property
    def spent(self) -> float: ...

    def summary(self) -> dict[str, Any]: ...


class LatencyHistogram:
    """Log-bucketed latencies (5% wide buckets): p50/p95 in constant memory, whatever the batch size."""

    _RATIO = math.log(1.05)

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0

    def add(self, seconds: float) -> None:
        self._buckets[math.floor(math.log(max(seconds, 1e-5)) / self._RATIO)] += 1
        self.count += 1

    def counts(self) -> dict[int, int]:
        """Its buckets (to carry to another process: merge() adds them)."""
        return dict(self._buckets)

    def merge(self, counts: dict[int, int]) -> None:
        self._buckets.update(counts)
        self.count += sum(counts.values())

    def quantile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for b in sorted(self._buckets):
            seen += self._buckets[b]
            if seen >= rank:
                return math.exp((b + 0.5) * self._RATIO)
        return None


@dataclass
class Stats:
    """Running totals of one batch; cheap to update per request."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    sent: int = 0  # HTTP attempts
    retries: int = 0
    in_flight: int = 0
    abandoned: int = 0  # requests in flight (sent, no answer yet) when the run stopped
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    deduped: int = 0  # lines answered by an identical request of this batch
    cache_hits: int = 0  # lines answered from the --cache
    fallbacks: int = 0  # requests re-sent to the next --fallback provider
    coalesced: int = 0  # requests saved by packing embeddings inputs (--coalesce)
    saved_input_tokens: int = 0
    saved_output_tokens: int = 0
    capped: int = 0  # bodies whose output cap --max-tokens lowered or set
    saved_usd: float = 0.0  # what the deduped copies and cache hits would have cost
    cost: CostReport | None = None  # what the run spent (token prices, or GPU time)
    concurrency: dict[str, int] = field(default_factory=dict)  # the adaptive limit per provider at the end
    pace: dict[str, float] = field(default_factory=dict)  # requests per second, per provider that showed a rate
    # GPU engines (vLLM's batch runner, Jobs): requests the runner reports done whose lines are not written
    # yet (its progress lines), a short status per running part for the progress line (` · `-joined: the line
    # shows as many as fit), and each run (hfbatch.jobs).
    engine_done: int = 0
    engine_note: str = ""
    jobs: list[JobFigures] = field(default_factory=list)
    # The Ray engine: each shard's figures (hfbatch.shards) and the most shard tasks that ran at once (workers).
    shards: list[ShardRow] | None = None
    workers: int | None = None
    providers: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    endpoints: Counter[str] = field(default_factory=Counter)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def add_saved(self, tokens: tuple[int, int]) -> None:
        """Tokens a deduped copy or a cache hit did not spend."""
        inp, out = tokens
        self.saved_input_tokens += inp
        self.saved_output_tokens += out

    def add_usage(self, body: object) -> None:
        """Sum chat (prompt/completion), responses (input/output) and embeddings usage."""
        if not isinstance(body, dict):
            return
        u = body.get("usage")
        if not isinstance(u, dict):
            return
        inp, out = usage_tokens(body)
        self.input_tokens += inp
        self.output_tokens += out
        d = u.get("prompt_tokens_details") or u.get("input_tokens_details")
        if isinstance(d, dict) and isinstance(d.get("cached_tokens"), int):
            self.cached_tokens += d["cached_tokens"]
        d = u.get("completion_tokens_details") or u.get("output_tokens_details")
        if isinstance(d, dict) and isinstance(d.get("reasoning_tokens"), int):
            self.reasoning_tokens += d["reasoning_tokens"]


def usage_tokens(body: object) -> tuple[int, int]:
    """(input, output) tokens of an answer body (chat, responses, embeddings); 0 when unknown."""
    u = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(u, dict):
        return 0, 0
    inp = u.get("prompt_tokens", u.get("input_tokens"))
    out = u.get("completion_tokens", u.get("output_tokens"))
    return (inp if isinstance(inp, int) else 0), (out if isinstance(out, int) else 0)


@dataclass
class BatchInfo:
    """Identity and timestamps of one batch (the Batch object minus the counters)."""

    id: str = field(default_factory=lambda: "batch_" + os.urandom(12).hex())
    input_file_id: str = "-"
    completion_window: str = "24h"
    created_at: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    status: BatchStatus = BatchStatus.VALIDATING
    stamps: dict[BatchStatus, int] = field(default_factory=dict)
    errors: list[LineError] = field(default_factory=list)
    errors_dropped: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    metadata: dict[str, str] | None = None
    state: RunState = RunState.RUNNING
    stop_reason: StopReason | None = None
    unsent: int = 0
    engine: str = "http"

    def set_status(self, status: BatchStatus) -> None:
        self.status = status
        self.stamps[status] = int(time.time())

    @classmethod
    def from_stored(cls, stored: dict[str, Any], completion_window: str) -> BatchInfo:
        """The identity and stamps of a stored Batch object (a batch being resumed)."""
        info = cls(id=stored["id"], input_file_id=stored["input_file_id"],
                   completion_window=stored.get("completion_window", completion_window),
                   created_at=stored["created_at"], status=BatchStatus(stored["status"]),
                   metadata=stored.get("metadata"))
        for status in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
            stamp = stored.get(_STAMP_KEYS[status])
            if stamp:
                info.stamps[status] = stamp
        return info


_STAMP_KEYS = {
    BatchStatus.IN_PROGRESS: "in_progress_at",
    BatchStatus.FINALIZING: "finalizing_at",
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.FAILED: "failed_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.CANCELLING: "cancelling_at",
    BatchStatus.CANCELLED: "cancelled_at",
}


class JobFigures(TypedDict):
    """One run of a GPU engine's part (a local `vllm run-batch`, a Hugging Face Job): `hfbatch.jobs`."""

    part: str
    model: str
    requests: int
    id: str | None  # the Job's id; local: the process id
    url: str | None  # the Job's page
    flavor: str | None  # the Jobs hardware; local: "local"
    stage: str  # SCHEDULING, RUNNING, COMPLETED, ERROR, CANCELED (local runs: the same words)
    billed_seconds: float | None
    answered: int  # lines of the part written to the output or error file
    message: str | None  # why it ended in ERROR (the tail of its log)


class ShardRow(TypedDict):
    """One shard of a Ray run (`hfbatch.shards`)."""

    shard: str
    requests: int  # requests written to it
    status: str  # written, running, done (its every request has a line), stopped, failed, merged (a rerun's)
    attempts: int  # Ray tasks that ran it (more than one: a worker died and Ray ran it again)
    completed: int  # its lines merged into the output file
    failed: int  # ... into the error file
    sent: int  # HTTP attempts (every attempt of it)
    retries: int
    node: str | None  # where its last attempt ran
    seconds: float | None  # its last attempt's wall time
    message: str | None  # why it failed


class LatencyMs(TypedDict):
    p50: float | None
    p95: float | None


class Savings(TypedDict):
    deduped_requests: int
    coalesced_requests: int
    cache_hits: int
    saved_input_tokens: int
    saved_output_tokens: int
    max_tokens_capped: int
    estimated_saved_usd: float


class HfbatchFigures(TypedDict):
    """Our own block of the Batch object (`"hfbatch"`): OpenAI's readers ignore it."""

    version: str
    engine: str
    state: RunState
    stop_reason: StopReason | None
    unsent: int
    abandoned: int
    elapsed_seconds: float
    requests_per_second: float | None
    http_requests: int
    retries: int
    latency_ms: LatencyMs
    estimated_cost_usd: float | None
    cost: dict[str, Any] | None
    providers: dict[str, int]
    concurrency: dict[str, int]
    pace_rps: dict[str, float]
    fallbacks: int
    savings: Savings
    models: dict[str, int]
    endpoints: dict[str, int]
    jobs: list[JobFigures]
    shards: NotRequired[list[ShardRow]]  # --engine ray
    workers: NotRequired[int]


def batch_object(info: BatchInfo, stats: Stats, window_seconds: int = 86400) -> dict[str, Any]:
    """The Batch object, valid for `openai.types.Batch.model_validate` (our figures under "hfbatch")."""
    stamps = {key: info.stamps.get(status) for status, key in _STAMP_KEYS.items()}
    elapsed = time.monotonic() - info.started
    endpoint = stats.endpoints.most_common(1)[0][0] if stats.endpoints else "/v1/chat/completions"
    errors = None
    if info.errors:
        data: list[dict[str, Any]] = [
            {"code": e.code, "line": e.line_no, "message": e.message, "param": e.param} for e in info.errors
        ]
        if info.errors_dropped:
            data.append(
                {"code": "too_many_errors", "line": None, "param": None,
                 "message": f"{info.errors_dropped} more invalid lines are not listed"}
            )
        errors = {"object": "list", "data": data}
    p50, p95 = stats.latency.quantile(0.5), stats.latency.quantile(0.95)
    cost = stats.cost.summary() if stats.cost is not None else None
    figures: HfbatchFigures = {
        "version": __version__,
        "engine": info.engine,
        "state": info.state,
        "stop_reason": info.stop_reason,
        "unsent": info.unsent,
        "abandoned": stats.abandoned,
        "elapsed_seconds": round(elapsed, 3),
        "requests_per_second": round((stats.completed + stats.failed) / elapsed, 2) if elapsed > 0 else None,
        "http_requests": stats.sent,
        "retries": stats.retries,
        "latency_ms": {
            "p50": round(p50 * 1000, 1) if p50 is not None else None,
            "p95": round(p95 * 1000, 1) if p95 is not None else None,
        },
        "estimated_cost_usd": cost["estimated_cost_usd"] if cost else None,
        "cost": cost,
        "providers": dict(stats.providers),
        "concurrency": stats.concurrency,
        "pace_rps": stats.pace,
        "fallbacks": stats.fallbacks,
        "savings": {
            "deduped_requests": stats.deduped,
            "coalesced_requests": stats.coalesced,
            "cache_hits": stats.cache_hits,
            "saved_input_tokens": stats.saved_input_tokens,
            "saved_output_tokens": stats.saved_output_tokens,
            "max_tokens_capped": stats.capped,
            "estimated_saved_usd": round(stats.saved_usd, 10),
        },
        "models": dict(stats.models),
        "endpoints": dict(stats.endpoints),
        "jobs": stats.jobs,
    }
    if stats.shards is not None:
        figures["shards"] = stats.shards
        figures["workers"] = stats.workers or 0
    return {
        "id": info.id,
        "object": "batch",
        "endpoint": endpoint,
        "model": stats.models.most_common(1)[0][0] if len(stats.models) == 1 else None,
        "errors": errors,
        "input_file_id": info.input_file_id,
        "completion_window": info.completion_window,
        "status": info.status,
        "output_file_id": info.output_file_id,
        "error_file_id": info.error_file_id,
        "created_at": info.created_at,
        "in_progress_at": stamps["in_progress_at"],
        "expires_at": info.created_at + window_seconds,
        **{k: v for k, v in stamps.items() if k != "in_progress_at"},
        "request_counts": {"total": stats.total, "completed": stats.completed, "failed": stats.failed},
        "usage": {
            "input_tokens": stats.input_tokens,
            "input_tokens_details": {"cached_tokens": stats.cached_tokens},
            "output_tokens": stats.output_tokens,
            "output_tokens_details": {"reasoning_tokens": stats.reasoning_tokens},
            "total_tokens": stats.input_tokens + stats.output_tokens,
        },
        "metadata": info.metadata,
        "hfbatch": figures,
    }
