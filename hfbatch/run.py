"""The pipeline: reader -> validate -> execute -> write -> summary, for one `hfbatch submit`."""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from .config import RunConfig
from .errors import AuthError, Interrupted, SomeFailed, StoppedEarly
from .errors import HfbatchError, InputError, UsageError
from .executor import Executor, StopControl
from .models import LineError, Request
from .providers import Router
from .reader import iter_lines, open_input
from .retry import RetryPolicy
from .summary import MAX_REPORTED_ERRORS, BatchInfo, Stats, batch_object
from .transport import Transport
from .ui import Progress
from .validate import IdSet, validate_line
from .writer import JsonlSink, error_line

GRACE_SECONDS = 10.0


@dataclass
class RunResult:
    batch: dict[str, Any]
    error: HfbatchError | None  # raised by the CLI after the summary is printed


def submit(cfg: RunConfig) -> RunResult:
    """Run one batch to its end (or an early stop) and return the Batch object."""
    return asyncio.run(_submit(cfg))


async def _submit(cfg: RunConfig) -> RunResult:
    info, stats = BatchInfo(input_file_id=cfg.input_path), Stats()
    pass_through = cfg.base_url is not None
    try:
        src = open_input(cfg.input_path)
    except OSError as e:
        raise UsageError(f"cannot read {cfg.input_path}: {e.strerror or e}") from None
    spool: BinaryIO | None = None
    try:
        if not cfg.skip_invalid:
            # OpenAI's rule: validate the whole file before sending anything.
            if cfg.input_path == "-":
                spool = tempfile.TemporaryFile(prefix="hfbatch-stdin-")
            _prevalidate(src, cfg, info, stats, spool, pass_through)
            if info.errors or info.errors_dropped:
                info.set_status("failed")
                info.state = "failed"
                first = info.errors[0]
                n = len(info.errors) + info.errors_dropped
                return RunResult(batch_object(info, stats), InputError(
                    f"{_where(cfg.input_path)}:{first.line_no}: {first.message}"
                    + (f" (and {n - 1} more invalid lines, listed in the summary's errors)" if n > 1 else "")
                    + "; nothing was sent. Fix the file, or pass --skip-invalid to run the valid lines"
                ))
            if spool is not None:
                spool.seek(0)
                src = spool
            else:
                src.seek(0)
        elif cfg.input_path != "-":
            stats.total = _count_lines(cfg.input_path)
        return await _execute(cfg, info, stats, src, pass_through)
    finally:
        if src is not sys.stdin.buffer:
            src.close()
        if spool is not None and spool is not src:
            spool.close()


def _prevalidate(src: BinaryIO, cfg: RunConfig, info: BatchInfo, stats: Stats,
                 spool: BinaryIO | None, pass_through: bool) -> None:
    seen = IdSet()
    for line_no, raw in iter_lines(src, copy_to=spool):
        r = validate_line(line_no, raw, seen, pass_through=pass_through, endpoint=cfg.endpoint)
        stats.total += 1
        if isinstance(r, LineError):
            if len(info.errors) < MAX_REPORTED_ERRORS:
                info.errors.append(r)
            else:
                info.errors_dropped += 1
    if stats.total == 0:
        info.errors.append(LineError(0, None, "empty_file", "The input file is empty. Please ensure "
                                     "that the batch contains at least one request."))


def _count_lines(path: str) -> int:
    """The number of non-blank lines (request_counts.total, known before the first request)."""
    with open(path, "rb") as f:
        return sum(1 for _ in iter_lines(f))


async def _execute(cfg: RunConfig, info: BatchInfo, stats: Stats, src: BinaryIO,
                   pass_through: bool) -> RunResult:
    out = JsonlSink(None, sys.stdout.buffer) if cfg.output_path == "-" else JsonlSink(cfg.output_path)
    err = JsonlSink(cfg.errors_path)
    stop = StopControl()
    progress = Progress(enabled=not cfg.quiet, stats=stats)
    loop = asyncio.get_running_loop()
    signals_seen: list[int] = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        name = signal.Signals(signum).name
        stop.stop("signal", f"stopped by {name}", hard=len(signals_seen) > 1)

    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, on_signal, s)
    info.set_status("in_progress")

    def requests() -> Iterator[Request]:
        seen = IdSet() if cfg.skip_invalid else None
        for line_no, raw in iter_lines(src):
            r = validate_line(line_no, raw, seen, pass_through=pass_through, endpoint=cfg.endpoint)
            if isinstance(r, LineError):
                err.write(error_line(r.custom_id, r.code, f"line {r.line_no}: {r.message}"))
                stats.failed += 1
                continue
            stats.endpoints[r.url] += 1
            stats.models[r.model] += 1
            yield r

    try:
        async with Transport(cfg.concurrency, cfg.timeout, cfg.token, _extra_headers(cfg)) as transport:
            executor = Executor(
                transport=transport, router=Router(cfg.base_url), out=out, err=err, stats=stats,
                stop=stop, concurrency=cfg.concurrency, policy=RetryPolicy(max_attempts=cfg.max_attempts),
            )
            work = asyncio.create_task(executor.run(requests()))
            ticker = asyncio.create_task(_tick(out, err, progress))
            guard = asyncio.create_task(_guard(stop, work))
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
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)
        out.close()
        err.close()
    if cfg.skip_invalid and cfg.input_path == "-":
        stats.total = stats.completed + stats.failed + executor.unsent  # stdin: what was read
    info.unsent = stats.total - stats.completed - stats.failed
    info.output_file_id = cfg.output_path if out.lines else None
    info.error_file_id = cfg.errors_path if err.lines else None
    error: HfbatchError | None = None
    if stop.reason is None:
        info.set_status("finalizing")
        info.set_status("completed")
        info.state = "finished"
        if stats.failed:
            error = SomeFailed(f"{stats.failed} of {stats.total} requests failed; see {cfg.errors_path}")
    else:
        # Stopped early: the batch stays in_progress (resumable); our state says why.
        info.state, info.stop_reason = "stopped", stop.reason
        message = f"{stop.message}; {info.unsent} requests were not sent"
        if stop.reason == "auth":
            error = AuthError(message)
        elif stop.reason == "signal":
            error = Interrupted(signals_seen[0], message)
        else:
            error = StoppedEarly(message)
    batch = batch_object(info, stats)
    progress.final_table(batch)
    return RunResult(batch, error)


async def _tick(out: JsonlSink, err: JsonlSink, progress: Progress) -> None:
    """Hand finished lines to the OS every 100 ms and refresh the progress bar."""
    while True:
        await asyncio.sleep(0.1)
        out.flush()
        err.flush()
        progress.update()


async def _guard(stop: StopControl, work: asyncio.Task[None]) -> None:
    """Enforce how a stop ends in-flight requests: at once (auth, second signal), after a grace
    period (first signal), or when they finish by themselves (credits)."""
    await stop.event.wait()
    if stop.reason == "credits":
        return
    deadline = asyncio.get_running_loop().time() + GRACE_SECONDS
    while not stop.hard and asyncio.get_running_loop().time() < deadline and not work.done():
        await asyncio.sleep(0.05)
    work.cancel()


def _extra_headers(cfg: RunConfig) -> dict[str, str]:
    return {"X-HF-Bill-To": cfg.bill_to} if cfg.bill_to else {}


def _where(path: str) -> str:
    return "<stdin>" if path == "-" else path
