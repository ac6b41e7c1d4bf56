"""Execute a registered batch: sinks, transport, executor, live state, then its end (status, exit error)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from ..batches.ledger import Ledger, scan
from ..batches.registry import TERMINAL_STATUSES, BatchDir, Registry
from ..cli.ui import Progress
from ..config import RunConfig
from ..cost.estimate import DEFAULT_MAX_OUTPUT
from ..cost.spend import Budget, CostLedger
from ..errors import (
    AuthError,
    EndedEarly,
    ExitCode,
    HfbatchError,
    Interrupted,
    SomeFailed,
    StoppedEarly,
    WriteError,
)
from ..executor import Executor, Limits
from ..http.transport import Transport
from ..limits import StopControl
from ..models import LineError, Request, RunResult
from ..plan import InputPlan, RunHooks
from ..reader import iter_lines
from ..retry import RetryPolicy
from ..routing import Router, router_root
from ..summary import BatchInfo, Stats, batch_object
from ..validate import validate_line
from ..writer import JsonlSink, error_line

SAVE_EVERY = 2.0  # seconds between live batch.json updates
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


def first_limit(concurrency: int, base_url: str | None) -> int:
    """Where each provider's AIMD limit starts. The router's providers are shared and their limits
    unknown: 64, doubling per round trip. A --base-url server is yours and -c is your number for it:
    start there (a 429/503 still shrinks it)."""
    return concurrency if base_url else min(concurrency, 64)


class Warmup:
    """What a run can do while its input is being scanned: open the connection pool, load the prices
    (a GET of the router's catalog) and open the first connections (TLS handshakes included), as many
    as the first wave will use. Closed (connections and all) when the run ends or fails validation."""

    def __init__(self, cfg: RunConfig, stored_cost: dict[str, Any] | None, input_size: int, *,
                 enabled: bool = True) -> None:
        self.cfg, self.stored_cost, self.enabled = cfg, stored_cost, enabled
        # A batch line is at least ~100 bytes: never more connections than the file can use.
        self.connections = max(1, min(first_limit(cfg.concurrency, cfg.base_url), input_size // 100))
        self.transport = Transport(cfg.concurrency, cfg.timeout, cfg.token, _extra_headers(cfg),
                                   max_response_bytes=cfg.max_response_bytes)
        self._prices: asyncio.Task[CostLedger] | None = None
        self._connect: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Warmup:
        await self.transport.__aenter__()
        if self.enabled:
            self._prices = asyncio.create_task(_cost_ledger(self.cfg, self.transport, self.stored_cost))
            url = self.cfg.base_url or router_root()
            self._connect = asyncio.create_task(self.transport.prewarm(url, self.connections))
        return self

    async def prices(self) -> CostLedger:
        if self._prices is None:
            self._prices = asyncio.create_task(_cost_ledger(self.cfg, self.transport, self.stored_cost))
        return await self._prices

    async def __aexit__(self, *exc: object) -> None:
        for t in (self._prices, self._connect):
            if t is not None and not t.done():
                t.cancel()
        for t in (self._prices, self._connect):
            if t is not None:
                await asyncio.gather(t, return_exceptions=True)
        await self.transport.__aexit__(*exc)


async def execute(cfg: RunConfig, b: BatchDir, meta: dict[str, Any], info: BatchInfo, stats: Stats,
                  ledger: Ledger, window: int, resume: bool, plan: InputPlan, warm: Warmup) -> RunResult:
    stop = StopControl()

    def write_failed(sink: JsonlSink, e: OSError) -> None:
        # Like an interruption: dispatching stops at once, in-flight answers are kept in memory and
        # retried to disk until the grace ends; the batch stays resumable.
        stop.stop("write_error", sink.describe_error())

    if cfg.output_path == "-":
        out = JsonlSink.stream(sys.stdout.buffer, on_error=write_failed)
    else:
        out = JsonlSink.open(cfg.output_path, append=resume, on_error=write_failed)
    err = JsonlSink.open(cfg.errors_path, append=resume, on_error=write_failed)
    progress = Progress(enabled=not cfg.quiet, stats=stats)
    loop = asyncio.get_running_loop()
    signals_seen: list[int] = []
    expires_at = info.created_at + window
    if info.status == "cancelling":
        stop.stop("cancelled", "cancelled")

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        stop.stop("signal", f"stopped by {signal.Signals(signum).name}", hard=len(signals_seen) > 1)

    signals = (signal.SIGINT, signal.SIGTERM) if cfg.handle_signals else ()
    for s in signals:
        loop.add_signal_handler(s, on_signal, s)
    pass_through = cfg.base_url is not None

    def requests() -> Iterator[Request]:
        seen = plan.unique_ids() if cfg.skip_invalid else None
        done, rejected = ledger.done, ledger.rejected
        with open(meta["input_file"], "rb") as f:
            for line_no, raw in iter_lines(f):
                r = validate_line(line_no, raw, seen, pass_through=pass_through, endpoint=cfg.endpoint)
                if isinstance(r, LineError):
                    if line_no not in rejected:
                        err.write(error_line(r.custom_id, r.code, f"line {r.line_no}: {r.message}"))
                        stats.failed += 1
                    continue
                if r.custom_id in done:
                    continue
                stats.endpoints[r.url] += 1
                stats.models[r.model] += 1
                yield r

    def save() -> None:
        try:
            b.save_batch(batch_object(info, stats, window))
        except OSError as e:
            stop.stop("write_error", f"cannot write {e.filename or b.batch_file}: {e.strerror or e}")

    try:
        transport = warm.transport
        router = Router(cfg.base_url, route_suffix=cfg.route, max_tokens=cfg.max_tokens,
                        estimate=_token_estimator() if cfg.tpm else None,
                        default_max_tokens=DEFAULT_MAX_OUTPUT if cfg.budget is not None else None)
        spend = await warm.prices()
        stats.cost = spend
        budget = Budget(cfg.budget, spend) if cfg.budget is not None else None
        limits = Limits(concurrency=cfg.concurrency, rpm=cfg.rpm, tpm=cfg.tpm, adapt=cfg.adapt,
                        fallback=cfg.fallback, coalesce=cfg.coalesce, start=first_limit(cfg.concurrency, cfg.base_url))
        hooks = RunHooks(cache=_open_cache() if cfg.cache else None, server=cfg.base_url or "router",
                         ledger=spend, budget=budget, stop=stop)
        executor = Executor(
            transport=transport, router=router, out=out, err=err, stats=stats, stop=stop,
            limits=limits, policy=RetryPolicy(max_attempts=cfg.max_attempts, base=_retry_base()),
            dedupe_keys=plan.duplicates or None, hooks=hooks, capacity=cfg.capacity,
        )
        progress.concurrency = executor.concurrency_now
        work = asyncio.create_task(executor.run(requests()))
        ticker = asyncio.create_task(_tick(out, err, progress, b, stop, info, expires_at, save, cfg.shutdown))
        guard = asyncio.create_task(_guard(stop, work, cfg.grace))
        progress.start()
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            if not work.cancelled():
                raise
        finally:
            guard.cancel()
            ticker.cancel()
            progress.stop()
            hooks.close()
            stats.saved_usd = hooks.saved_usd
            stats.capped = router.capped
            stats.concurrency = executor.concurrency_now()
        if stop.reason in ("expired", "cancelled"):
            out.flush()
            err.flush()
            if out.error is None and err.error is None:
                _close_unanswered(cfg, meta, err, stats, stop.reason, pass_through, plan)
    finally:
        for s in signals:
            loop.remove_signal_handler(s)
        out.close()
        err.close()
    if out.error is not None or err.error is not None:
        _recount(cfg, stats, out, err)
    return _conclude(cfg, b, meta, info, stats, window, stop, signals_seen, out, err)


def _recount(cfg: RunConfig, stats: Stats, out: JsonlSink, err: JsonlSink) -> None:
    """After a failed write the files, not the counters, say what is done: count their lines again (a
    torn last line is cut, as a rerun would), so the summary never claims a line that is not on disk."""
    try:
        disk = Stats()
        scan(None if cfg.output_path == "-" else cfg.output_path, cfg.errors_path, disk)
    except OSError:
        stats.completed -= out.unwritten_lines()
        stats.failed -= err.unwritten_lines()
        return
    if cfg.output_path == "-":
        disk.completed = stats.completed - out.unwritten_lines()
        disk.input_tokens, disk.output_tokens = stats.input_tokens, stats.output_tokens
        disk.cached_tokens, disk.reasoning_tokens = stats.cached_tokens, stats.reasoning_tokens
    stats.completed, stats.failed = disk.completed, disk.failed
    stats.input_tokens, stats.output_tokens = disk.input_tokens, disk.output_tokens
    stats.cached_tokens, stats.reasoning_tokens = disk.cached_tokens, disk.reasoning_tokens


def _close_unanswered(cfg: RunConfig, meta: dict[str, Any], err: JsonlSink, stats: Stats, reason: str,
                      pass_through: bool, plan: InputPlan) -> None:
    """Expiry or cancel: every valid request with no line yet gets batch_expired / batch_cancelled."""
    code, message = (("batch_expired", EXPIRED_MESSAGE) if reason == "expired"
                     else ("batch_cancelled", CANCELLED_MESSAGE))
    done = scan(None if cfg.output_path == "-" else cfg.output_path, cfg.errors_path, Stats()).done
    seen = plan.unique_ids()
    with open(meta["input_file"], "rb") as f:
        for line_no, raw in iter_lines(f):
            r = validate_line(line_no, raw, seen, pass_through=pass_through, endpoint=cfg.endpoint)
            if isinstance(r, Request) and r.custom_id not in done:
                err.write(error_line(r.custom_id, code, message))
                stats.failed += 1


def _conclude(cfg: RunConfig, b: BatchDir, meta: dict[str, Any], info: BatchInfo, stats: Stats,
              window: int, stop: StopControl, signals_seen: list[int], out: JsonlSink,
              err: JsonlSink) -> RunResult:
    info.unsent = max(0, stats.total - stats.completed - stats.failed)
    error: HfbatchError | None = None
    broken = out.error is not None or err.error is not None
    if broken or stop.reason == "write_error":
        # Whatever else happened (even expiry or a cancel), lines that did not reach the disk keep the
        # batch resumable: a rerun with space sends exactly what has no line.
        info.state, info.stop_reason = "interrupted", "write_error"
        what = next((s.describe_error() for s in (out, err) if s.error is not None), stop.message)
        error = WriteError(f"stopped: {what}; {info.unsent} requests have no line yet. Fix that, then rerun "
                           f"the same command (or `hfbatch resume {info.id}`) to send only those")
    elif stop.reason is None:
        info.set_status("finalizing")
        info.set_status("completed")
        info.state = "finished"
        if stats.failed:
            error = SomeFailed(f"{stats.failed} of {stats.total} requests failed; see {cfg.errors_path}")
    elif stop.reason == "expired":
        info.set_status("expired")
        info.state = "finished"
        error = EndedEarly(f"the completion window ({info.completion_window}) expired; requests not "
                           f"run are in {cfg.errors_path} as batch_expired")
    elif stop.reason == "cancelled":
        info.set_status("cancelled")
        info.state = "finished"
        error = EndedEarly(f"batch {info.id} was cancelled; requests not run are in {cfg.errors_path} "
                           "as batch_cancelled")
    else:
        # Stopped early: the batch stays in_progress (resumable); our state says why.
        info.state, info.stop_reason = "interrupted", stop.reason
        message = (f"{stop.message}; {_unanswered(info.unsent, stats.abandoned)}. Rerun the same command "
                   f"(or `hfbatch resume {info.id}`) to send only those")
        if stop.reason == "auth":
            error = AuthError(message)
        elif stop.reason == "signal":
            error = Interrupted(signals_seen[0], message)
        elif stop.reason == "shutdown":
            error = StoppedEarly(message)
        elif stop.reason == "budget":
            error = StoppedEarly(f"{stop.message} ({_unanswered(info.unsent, stats.abandoned)})")
        else:
            error = StoppedEarly(message)
    return finish(b, meta, info, stats, window, error, out_lines=out.lines, err_lines=err.lines)


def _unanswered(unsent: int, abandoned: int) -> str:
    """How many requests have no line, telling the ones sent and never answered from the ones never sent."""
    if not abandoned:
        return f"{unsent} requests were not sent"
    return (f"{unsent} requests have no answer: {abandoned} were sent and got no answer before the stop, "
            f"{max(0, unsent - abandoned)} were not sent")


def finish(b: BatchDir, meta: dict[str, Any], info: BatchInfo, stats: Stats, window: int,
            error: HfbatchError | None, out_lines: int = 0, err_lines: int = 0) -> RunResult:
    out_path, err_path = meta["output_path"], meta["errors_path"]
    if info.status != "failed":
        info.output_file_id = out_path if (stats.completed or out_lines) else None
        info.error_file_id = err_path if (stats.failed or err_lines) else None
    batch = batch_object(info, stats, window)
    try:
        b.save_batch(batch)
        meta["exit_code"] = int(error.exit_code) if error is not None else int(ExitCode.OK)
        meta["pid"] = None
        b.save_meta(meta)
        if info.status in TERMINAL_STATUSES:
            Registry(b.path.parent.parent).release([p for p in (out_path, err_path) if p != "-"], b.id)
    except OSError as e:
        # The registry says the batch still runs: the rerun resumes it from its files.
        raise WriteError(f"cannot write {e.filename or b.path}: {e.strerror or e}; the batch's lines are "
                         f"in its files. Fix that, then rerun the same command") from None
    return RunResult(batch, error)


async def _tick(out: JsonlSink, err: JsonlSink, progress: Progress, b: BatchDir, stop: StopControl,
                info: BatchInfo, expires_at: int, save: Any, shutdown: Any) -> None:
    """Every 100 ms: hand finished lines to the OS and refresh the progress bar. Every 0.5 s: look
    for a cancel request and the completion window. Every 2 s: publish live counts."""
    last_save = last_check = time.monotonic()
    while True:
        await asyncio.sleep(0.1)
        out.flush()
        err.flush()
        progress.update()
        now = time.monotonic()
        if now - last_check >= 0.5:
            last_check = now
            if stop.reason is None and shutdown is not None and shutdown.is_set():
                stop.stop("shutdown", "the server is stopping")
            elif stop.reason is None and b.cancel_requested():
                stop.stop("cancelled", "cancelled")
                info.set_status("cancelling")
                save()
                last_save = now
            elif stop.reason is None and time.time() >= expires_at:
                stop.stop("expired", "the completion window expired")
        if now - last_save >= SAVE_EVERY:
            last_save = now
            save()


async def _guard(stop: StopControl, work: asyncio.Task[None], grace: float) -> None:
    """How a stop ends in-flight requests: at once (auth, second signal), after the grace period
    (signal, expiry), or when they finish by themselves (credits, cancel)."""
    await stop.event.wait()
    if stop.reason in ("credits", "cancelled"):
        while not stop.hard:
            await asyncio.sleep(0.05)
        work.cancel()
        return
    deadline = asyncio.get_running_loop().time() + (0 if stop.reason == "auth" else grace)
    while not stop.hard and asyncio.get_running_loop().time() < deadline and not work.done():
        await asyncio.sleep(0.05)
    work.cancel()


async def _cost_ledger(cfg: RunConfig, transport: Transport, stored: dict[str, Any] | None) -> CostLedger:
    """Prices for this run (router catalog, its cache when offline, or --prices), and the spend so far."""
    from ..cost.pricing import default_cache_path, load_catalog, models_url

    url = models_url(cfg.base_url)
    catalog = await load_catalog(transport.get_json, url, default_cache_path(url), cfg.prices)
    ledger = CostLedger(catalog)
    if stored:
        ledger.load(stored)
    return ledger


def _open_cache() -> Any:
    from ..cache import ResponseCache, default_path

    return ResponseCache(default_path())


def _token_estimator() -> Any:
    """What --tpm books before a request: the prompt estimate plus the output cap (estimate.py's rules)."""
    from ..cost.estimate import estimate_tokens

    def estimate(body: dict[str, Any], url: str) -> int:
        inp, out = estimate_tokens(body, url)
        return inp + out

    return estimate


def _retry_base() -> float:
    """Backoff base in seconds; HFBATCH_RETRY_BASE shortens it (tests, local servers)."""
    from ..config import env_float

    return env_float("HFBATCH_RETRY_BASE", 0.5)


def _extra_headers(cfg: RunConfig) -> dict[str, str]:
    return {"X-HF-Bill-To": cfg.bill_to} if cfg.bill_to else {}
