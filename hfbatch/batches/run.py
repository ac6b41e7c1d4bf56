"""BatchRun: one batch's life in this process. registry -> validate -> resume ledger -> engine -> conclude.

A batch's identity is its input content (sha256) plus its output and error paths: the same command
run again finds the same batch and resumes it, or replays its stored result when it has already ended,
sending nothing. The lifecycle is the same for every engine (engines/): a BatchRun registers or finds
the batch (start / resume / replay), validates the input, opens the output and error files (the
ledger), hands the pending requests to the engine, watches for cancel, expiry and shutdown while it
runs, and concludes: status, counts, the exit error.

The core never touches a terminal, stdin/stdout, signal handlers or the CLI's syntax: the caller passes
what only it knows in a RunIO (the CLI: stdin, stdout, a progress bar; serve: its shutdown event and
shared limits) and calls `interrupt(signum)` from its own signal handlers.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from ..config import RunConfig, parse_duration
from ..engines import Engine, Work, endpoint_rule, for_config
from ..errors import (
    AlreadyRunning,
    AuthError,
    EndedEarly,
    ExitCode,
    HfbatchError,
    InputError,
    Interrupted,
    SomeFailed,
    StoppedEarly,
    UsageError,
    WriteError,
    error_for_code,
)
from ..limits import Capacity, StopControl
from ..models import (
    TERMINAL_STATUSES,
    BatchStatus,
    LineError,
    NoAnswer,
    Request,
    RunResult,
    RunState,
    StopReason,
)
from ..plan import InputPlan, scan_input
from ..reader import iter_lines
from ..summary import BatchInfo, Stats, batch_object
from ..validate import validate_line
from ..writer import Answers, JsonlSink
from . import claims
from .ledger import Ledger, scan
from .registry import BatchDir, Registry, unlock

SAVE_EVERY = 2.0  # seconds between live batch.json updates
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


class ProgressView(Protocol):
    """A live view of a run (the CLI's progress bar): started once, updated every 100 ms, stopped."""

    def start(self, stats: Stats, live: Callable[[], dict[str, int]]) -> None: ...

    def update(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class RunIO:
    """What only the caller knows; the core touches nothing else of its process."""

    stdin: BinaryIO | None = None  # the input when input_path is "-"
    stdout: BinaryIO | None = None  # the output lines when output_path is "-"
    progress: ProgressView | None = None
    shutdown: asyncio.Event | None = None  # set: stop like SIGTERM (hfbatch serve is stopping)
    capacity: Capacity | None = None  # limits shared with other runs (hfbatch serve: -c is server-wide)
    engine: Callable[[RunConfig, int], Engine] | None = None  # (cfg, input size) -> engine; default by --engine
    # --detach: start the process that runs the batch (the CLI knows how) and return its pid; called once
    # the batch is registered and valid, while this process still holds the batch's lock.
    launch: Callable[[str], int] | None = None
    on_registered: Callable[[str], None] | None = None  # the batch exists in the registry (its id)


@dataclass
class _Batch:
    """The registered batch this run works on."""

    dir: BatchDir
    meta: dict[str, Any]
    info: BatchInfo
    stored: dict[str, Any] | None = None  # its Batch object as stored (None: just registered)
    resume: bool = False
    stats: Stats = field(default_factory=Stats)


class BatchRun:
    """Run (or resume, or replay) one batch: `await BatchRun(cfg, io).execute()` -> its RunResult."""

    def __init__(self, cfg: RunConfig, io: RunIO | None = None) -> None:
        self.cfg = cfg
        self.io = io or RunIO()
        self.stop = StopControl()
        self.signals: list[int] = []
        self.input_file = ""  # the batch's input (its own copy for stdin), once found or registered
        # New batches' windows are checked against the range where they come in (the CLI flag, serve's
        # POST /v1/batches); here a stored batch keeps the window it was created with.
        self.window = parse_duration(cfg.completion_window, "--completion-window")
        self.rule = endpoint_rule(cfg.engine, gpu=cfg.gpus_per_worker is not None)  # lines it cannot run: invalid

    def interrupt(self, signum: int) -> None:
        """SIGINT/SIGTERM (the caller's handler): dispatching stops, in-flight requests get the grace
        period; a second signal cancels them at once."""
        self.signals.append(signum)
        self.stop.stop(StopReason.SIGNAL, f"stopped by {signal.Signals(signum).name}", hard=len(self.signals) > 1)

    # -- start, resume or replay ----------------------------------------------------------------

    async def execute(self) -> RunResult:
        cfg = self.cfg
        reg = Registry()
        # Hashing (and the scan below) read the whole file: in a thread, so a server's loop stays responsive.
        input_file, digest = await asyncio.to_thread(self._materialize, reg)
        key = f"{digest}|{claims.abs_path(cfg.output_path)}|{claims.abs_path(cfg.errors_path)}"
        if cfg.output_path == "-":
            key += f"|stdout:{os.urandom(8).hex()}"  # no durable ledger for stdout: never resumed
        registry_fd = reg.lock()
        try:
            found = reg.get(cfg.batch_id) if cfg.batch_id else reg.find(key)
            if cfg.batch_id and (found is None or found.meta().get("input_sha256") != digest):
                raise UsageError(f"batch {cfg.batch_id}: not found, or its input changed since it was created")
            if found is not None:
                claims.keep_claims(cfg, reg, found)
                fd = found.lock()
            else:
                batch = self._register(reg, key, digest, input_file)
                fd = batch.dir.lock(wait=True)  # new: only an instant's probe (list/status) can hold it
        finally:
            unlock(registry_fd)
        if self.io.on_registered is not None:
            self.io.on_registered(found.id if found is not None else batch.info.id)
        if found is None:
            try:
                return await self._run(batch)
            finally:
                unlock(fd)
        if cfg.input_path == "-":
            os.unlink(input_file)  # the batch kept its own copy of this exact content
        if fd is None:
            pid = found.meta().get("pid")
            if not cfg.wait:
                raise AlreadyRunning(
                    f"batch {found.id} is already running (pid {pid}); nothing was sent. "
                    f"Follow it with `hfbatch wait {found.id}`, or pass --wait to block until it ends"
                )
            fd = await asyncio.to_thread(found.lock, True)
        try:
            meta = found.meta()
            stored = self._stored(found, meta)
            reopen = cfg.retry_failed and stored["status"] == BatchStatus.COMPLETED
            if stored["status"] in TERMINAL_STATUSES and not reopen:
                return self._replay(found, meta, stored)
            if cfg.output_path == "-":  # found by its id (`hfbatch resume`): its key is never found again
                raise UsageError(f"batch {found.id} wrote its answers to stdout, which keeps no record of what it "
                                 "delivered: resuming it would send (and pay for) every request again; nothing was "
                                 f"sent. Run the file again with -o FILE (which can be resumed), or cancel {found.id}")
            info = BatchInfo.from_stored(stored, cfg.completion_window)
            info.engine = cfg.engine
            if reopen:
                info.status, info.state = BatchStatus.IN_PROGRESS, RunState.RUNNING  # for the retryable lines
            return await self._run(_Batch(found, meta, info, stored, resume=True))
        finally:
            unlock(fd)

    def _register(self, reg: Registry, key: str, digest: str, input_file: str) -> _Batch:
        """A new batch (under the registry lock): claims its files, writes batch.json, then meta.json."""
        cfg = self.cfg
        replaced = claims.take_outputs(cfg, reg, digest)
        info = BatchInfo(input_file_id=cfg.input_path, completion_window=cfg.completion_window,
                         metadata=cfg.metadata, engine=cfg.engine)
        if cfg.new_batch_id:
            info.id = cfg.new_batch_id
        b = reg.create(info.id)
        if cfg.input_path == "-":
            shutil.move(input_file, b.path / "input.jsonl")
            input_file = str(b.path / "input.jsonl")
        meta: dict[str, Any] = {
            "id": info.id, "key": key, "input_path": cfg.input_path, "input_file": input_file,
            "input_sha256": digest, "output_path": claims.abs_path(cfg.output_path),
            "errors_path": claims.abs_path(cfg.errors_path), "options": cfg.options(),
            "created_at": info.created_at, "created_ns": time.time_ns(),
            "expires_at": info.created_at + self.window, "pid": os.getpid(), "exit_code": None, "total": None,
        }
        # batch.json first: meta.json is what makes a batch exist, so a crash in between leaves
        # nothing half-registered.
        b.save_batch(batch_object(info, Stats(), self.window))
        b.save_meta(meta)
        for path in claims.claimed_paths(cfg):
            reg.claim(path, info.id)  # released when the batch ends (_finish)
        claims.claim_summary(cfg, reg, info.id)
        for old in replaced:
            claims.supersede(old, info.id)
        return _Batch(b, meta, info)

    def _stored(self, b: BatchDir, meta: dict[str, Any]) -> dict[str, Any]:
        """The batch's stored object; rebuilt as freshly created if a crash left it missing or torn."""
        try:
            return b.batch()
        except (OSError, ValueError):
            info = BatchInfo(id=b.id, input_file_id=meta.get("input_path", "-"), created_at=meta["created_at"],
                             completion_window=meta.get("options", {}).get("completion_window", "24h"))
            batch = batch_object(info, Stats(), self.window)
            b.save_batch(batch)
            return batch

    def _materialize(self, reg: Registry) -> tuple[str, str]:
        """(a file to read, sha256 of its content); stdin is spooled to a private file first."""
        path = self.cfg.input_path
        h = hashlib.sha256()
        if path == "-":
            stdin = self.io.stdin
            if stdin is None:
                raise UsageError("the input is - (stdin) but no standard input was given")
            tmp = reg.tmp_dir() / f"stdin-{os.getpid()}-{os.urandom(4).hex()}.jsonl"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                while chunk := stdin.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
            return str(tmp), h.hexdigest()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
        return os.path.abspath(path), h.hexdigest()

    def _replay(self, b: BatchDir, meta: dict[str, Any], stored: dict[str, Any]) -> RunResult:
        code = int(meta.get("exit_code") or 0)
        note = (f"batch {b.id} already ended ({stored['status']}); nothing was sent. "
                + ("Pass --retry-failed to re-send its retryable failures" if code == ExitCode.SOME_FAILED else
                   "Its stored result follows"))
        return RunResult(stored, error_for_code(code, note), replayed=True)

    # -- run -----------------------------------------------------------------------------------

    async def _run(self, batch: _Batch) -> RunResult:
        cfg, b, meta, info, stats = self.cfg, batch.dir, batch.meta, batch.info, batch.stats
        meta["pid"] = os.getpid()
        b.save_meta(meta)
        input_file = self.input_file = meta["input_file"]
        size = os.path.getsize(input_file)
        make = self.io.engine or (lambda c, n: for_config(c, input_size=n, capacity=self.io.capacity,
                                                          warm=not c.detach))
        # While the input is scanned (a thread), the engine warms up (prices, connections).
        async with make(cfg, size) as engine:
            validating = info.status == BatchStatus.VALIDATING
            plan = await asyncio.to_thread(scan_input, input_file, strict=validating and not cfg.skip_invalid,
                                           dedupe=cfg.dedupe, pass_through=cfg.base_url is not None,
                                           endpoint=cfg.endpoint, ids=cfg.skip_invalid, rule=self.rule)
            if validating:
                info.errors, info.errors_dropped = plan.errors, plan.errors_dropped
                if info.errors:
                    info.set_status(BatchStatus.FAILED)
                    info.state = RunState.FAILED
                    stats.total = plan.total
                    return self._finish(batch, InputError(self._invalid_message(info)))
                meta["total"] = plan.total
                b.save_meta(meta)
                info.set_status(BatchStatus.IN_PROGRESS)
            stats.total = int(meta.get("total") or 0)
            if cfg.detach:
                if self.io.launch is None:
                    raise UsageError("--detach: this caller cannot start a background run")
                if engine.remote:
                    # An engine that runs elsewhere (Jobs) launches its work here, so that a refused model or
                    # flavor fails now; the background process follows what runs (_detached).
                    return await self._start(batch, engine, plan, detach=True)
                result = batch_object(info, stats, self.window)
                b.save_batch(result)
                meta["pid"] = self.io.launch(info.id)
                b.save_meta(meta)
                return RunResult(result, None, detached=True)
            return await self._start(batch, engine, plan)

    async def _start(self, batch: _Batch, engine: Engine, plan: InputPlan, detach: bool = False) -> RunResult:
        """Read the ledger back (a resumed batch), look for a cancel, then let the engine run."""
        cfg, b, info, stats = self.cfg, batch.dir, batch.info, batch.stats
        ledger = Ledger()
        if batch.resume:
            ledger = scan(None if cfg.output_path == "-" else cfg.output_path, cfg.errors_path, stats,
                          retry_failed=cfg.retry_failed)
        if b.cancel_requested():
            info.set_status(BatchStatus.CANCELLING)
            self.stop.stop(StopReason.CANCELLED, "cancelled")
        b.save_batch(batch_object(info, stats, self.window))
        return await self._execute(batch, engine, plan, ledger, detach=detach)

    async def _execute(self, batch: _Batch, engine: Engine, plan: InputPlan, ledger: Ledger,
                       detach: bool = False) -> RunResult:
        cfg, stop, stats = self.cfg, self.stop, batch.stats

        def write_failed(sink: JsonlSink, e: OSError) -> None:
            # Like an interruption: dispatching stops at once, in-flight answers are kept in memory and
            # retried to disk until the grace ends; the batch stays resumable.
            stop.stop(StopReason.WRITE_ERROR, sink.describe_error())

        if cfg.output_path == "-":
            if self.io.stdout is None:
                raise UsageError("-o - (stdout) but no standard output was given")
            out = JsonlSink.stream(self.io.stdout, on_error=write_failed)
        else:
            out = JsonlSink.open(cfg.output_path, append=batch.resume, on_error=write_failed)
        err = JsonlSink.open(cfg.errors_path, append=batch.resume, on_error=write_failed)
        answers = Answers(out, err, stats)
        work = Work(self._pending(plan, ledger, answers), answers, stats, stop, plan.duplicates, batch.stored,
                    batch_dir=batch.dir.path, answered=ledger.done, detach=detach)
        progress = self.io.progress
        failure: BaseException | None = None
        try:
            task = asyncio.create_task(engine.run(work))
            ticker = asyncio.create_task(self._tick(batch, answers, progress))
            guard = asyncio.create_task(self._guard(task))
            if progress is not None:
                progress.start(stats, engine.live)
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
            except Exception as e:  # noqa: BLE001 - an engine's bug: the run ends resumable, exit 1
                failure = e
                if isinstance(e, HfbatchError) and e.exit_code != ExitCode.INTERNAL:
                    # A known refusal that stops the run (a model too big for the flavor, the Hub refusing a
                    # Job): not a bug. Its own words and exit code (_conclude); the batch stays resumable.
                    stop.stop(StopReason.ENGINE_FAILED, str(e)[:300])
                else:
                    stop.stop(StopReason.INTERNAL_ERROR, f"internal error: {type(e).__name__}: {e}"[:300])
            finally:
                guard.cancel()
                ticker.cancel()
                if progress is not None:
                    progress.stop()
            if stop.reason in (StopReason.EXPIRED, StopReason.CANCELLED) and not answers.broken:
                out.flush()
                err.flush()
                self._close_unanswered(plan, answers, stop.reason)
        finally:
            out.close()
            err.close()
        if answers.broken:
            self._recount(stats, out, err)
        if detach and failure is None and stop.reason is None and not answers.broken:
            return self._detached(batch)
        return self._conclude(batch, answers, failure)

    def _detached(self, batch: _Batch) -> RunResult:
        """--detach with a remote engine: its work is launched; a background process follows it."""
        assert self.io.launch is not None
        result = batch_object(batch.info, batch.stats, self.window)
        batch.dir.save_batch(result)
        batch.meta["pid"] = self.io.launch(batch.info.id)
        batch.dir.save_meta(batch.meta)
        return RunResult(result, None, detached=True)

    def _pending(self, plan: InputPlan, ledger: Ledger, answers: Answers) -> Iterator[Request]:
        """The requests with no line yet, read lazily in file order; lines refused under --skip-invalid get
        their error line here (once: a resume knows them by line number)."""
        cfg, stats = self.cfg, answers.stats
        seen = plan.unique_ids() if cfg.skip_invalid else None
        done, rejected = ledger.done, ledger.rejected
        with open(self.input_file, "rb") as f:
            for n, (line_no, raw) in enumerate(iter_lines(f), 1):
                if n > plan.total:
                    return  # lines appended under the run: the batch is the file as it was scanned
                r = validate_line(line_no, raw, seen, pass_through=cfg.base_url is not None, endpoint=cfg.endpoint,
                                  rule=self.rule)
                if isinstance(r, LineError):
                    if not cfg.skip_invalid:
                        # Every line was valid when the run started (strict mode): the file changed under
                        # it (a line torn by a rewrite). Read no further; the run ends as input_changed.
                        return
                    if line_no not in rejected:
                        answers.write(r.custom_id, NoAnswer(r.code, f"line {r.line_no}: {r.message}"))
                    continue
                if r.custom_id in done:
                    continue
                stats.endpoints[r.url] += 1
                stats.models[r.model] += 1
                yield r

    async def _tick(self, batch: _Batch, answers: Answers, progress: ProgressView | None) -> None:
        """Every 100 ms: hand finished lines to the OS, refresh the progress bar, and look for a cancel
        request (one stat), the completion window and a shutdown. Every 2 s: publish live counts."""
        b, info, stop = batch.dir, batch.info, self.stop
        expires_at = info.created_at + self.window
        shutdown = self.io.shutdown
        loop = asyncio.get_running_loop()
        last_save = loop.time()
        while True:
            await asyncio.sleep(0.1)
            answers.out.flush()
            answers.err.flush()
            if progress is not None:
                progress.update()
            now = loop.time()
            if stop.reason is None and shutdown is not None and shutdown.is_set():
                stop.stop(StopReason.SHUTDOWN, "the server is stopping")
            elif stop.reason is None and b.cancel_requested():
                stop.stop(StopReason.CANCELLED, "cancelled")
                info.set_status(BatchStatus.CANCELLING)
                self._save(batch)
                last_save = now
            elif stop.reason is None and time.time() >= expires_at:
                stop.stop(StopReason.EXPIRED, "the completion window expired")
            if now - last_save >= SAVE_EVERY:
                last_save = now
                self._save(batch)

    def _save(self, batch: _Batch) -> None:
        try:
            batch.dir.save_batch(batch_object(batch.info, batch.stats, self.window))
        except OSError as e:
            self.stop.stop(StopReason.WRITE_ERROR, f"cannot write {e.filename or batch.dir.batch_file}: "
                           f"{e.strerror or e}")

    async def _guard(self, work: asyncio.Task[None]) -> None:
        """How a stop ends in-flight requests: at once (auth, second signal), after the grace period
        (signal, expiry, budget, shutdown, write error, internal error), or when they finish by themselves
        (credits, cancel)."""
        stop = self.stop
        await stop.event.wait()
        loop = asyncio.get_running_loop()
        if stop.reason in (StopReason.CREDITS, StopReason.CANCELLED):
            while not stop.hard and not work.done():
                await asyncio.sleep(0.05)
            work.cancel()
            return
        deadline = loop.time() + (0 if stop.reason == StopReason.AUTH else self.cfg.grace)
        while not stop.hard and loop.time() < deadline and not work.done():
            await asyncio.sleep(0.05)
        work.cancel()

    def _close_unanswered(self, plan: InputPlan, answers: Answers, reason: StopReason) -> None:
        """Expiry or cancel: every valid request with no line yet gets batch_expired / batch_cancelled."""
        cfg = self.cfg
        answer = (NoAnswer("batch_expired", EXPIRED_MESSAGE) if reason == StopReason.EXPIRED
                  else NoAnswer("batch_cancelled", CANCELLED_MESSAGE))
        done = scan(None if cfg.output_path == "-" else cfg.output_path, cfg.errors_path, Stats()).done
        seen = plan.unique_ids()
        with open(self.input_file, "rb") as f:
            for n, (line_no, raw) in enumerate(iter_lines(f), 1):
                if n > plan.total:
                    return  # lines appended under the run: the batch is the file as it was scanned
                r = validate_line(line_no, raw, seen, pass_through=cfg.base_url is not None, endpoint=cfg.endpoint,
                                  rule=self.rule)
                if isinstance(r, Request) and r.custom_id not in done:
                    answers.write(r.custom_id, answer)

    def _recount(self, stats: Stats, out: JsonlSink, err: JsonlSink) -> None:
        """After a failed write the files, not the counters, say what is done: count their lines again (a
        torn last line is cut, as a rerun would), so the summary never claims a line that is not on disk."""
        cfg = self.cfg
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

    # -- conclude ------------------------------------------------------------------------------

    def _conclude(self, batch: _Batch, answers: Answers, failure: BaseException | None) -> RunResult:
        cfg, info, stats, stop = self.cfg, batch.info, batch.stats, self.stop
        info.unsent = max(0, stats.total - stats.completed - stats.failed)
        error: HfbatchError | None = None
        if answers.broken or stop.reason == StopReason.WRITE_ERROR:
            # Whatever else happened (even expiry or a cancel), lines that did not reach the disk keep the
            # batch resumable: a rerun with space sends exactly what has no line.
            info.state, info.stop_reason = RunState.INTERRUPTED, StopReason.WRITE_ERROR
            what = next((s.describe_error() for s in (answers.out, answers.err) if s.error is not None),
                        stop.message)
            if cfg.output_path == "-":
                error = WriteError(f"stopped: {what}; {stats.completed} answers reached stdout, {info.unsent} "
                                   f"requests have no line. {STDOUT_NO_RESUME}")
            else:
                error = WriteError(f"stopped: {what}; {info.unsent} requests have no line yet. Fix that, then "
                                   f"rerun the same command (or `hfbatch resume {info.id}`) to send only those")
        elif stop.reason == StopReason.INTERNAL_ERROR or (failure is not None and
                                                          stop.reason == StopReason.ENGINE_FAILED):
            info.state, info.stop_reason = RunState.INTERRUPTED, stop.reason
            if isinstance(failure, HfbatchError):
                error = failure  # a known failure that stops the run (a dependency's API changed...): its words
            else:
                error = HfbatchError(f"{stop.message} (set HFBATCH_DEBUG=1 for the traceback, and please report "
                                     f"it); the batch is resumable: {_unanswered(info.unsent, stats.abandoned)}")
                error.__cause__ = failure
        elif stop.reason is None and info.unsent:
            # The engine ran out of requests before the plan did: the input file (read as requests are
            # dispatched) was rewritten or truncated under the run. Never a completed batch.
            info.state, info.stop_reason = RunState.INTERRUPTED, StopReason.INPUT_CHANGED
            error = StoppedEarly(
                f"the input file {cfg.input_path} changed while the batch ran: {info.unsent} of its {stats.total} "
                f"requests were never read, so the batch is not complete. Put the file back as it was and rerun "
                f"the same command (or `hfbatch resume {info.id}`) to send only those, or cancel the batch")
        elif stop.reason is None:
            info.set_status(BatchStatus.FINALIZING)
            info.set_status(BatchStatus.COMPLETED)
            info.state = RunState.FINISHED
            if stats.failed:
                error = SomeFailed(f"{stats.failed} of {stats.total} requests failed; see {cfg.errors_path}")
        elif stop.reason == StopReason.EXPIRED:
            info.set_status(BatchStatus.EXPIRED)
            info.state = RunState.FINISHED
            error = EndedEarly(f"the completion window ({info.completion_window}) expired; requests not "
                               f"run are in {cfg.errors_path} as batch_expired")
        elif stop.reason == StopReason.CANCELLED:
            info.set_status(BatchStatus.CANCELLED)
            info.state = RunState.FINISHED
            error = EndedEarly(f"batch {info.id} was cancelled; requests not run are in {cfg.errors_path} "
                               "as batch_cancelled")
        else:
            # Stopped early: the batch stays in_progress (resumable); our state says why.
            info.state, info.stop_reason = RunState.INTERRUPTED, stop.reason
            unanswered = _unanswered(info.unsent, stats.abandoned)
            message = (f"{stop.message}; {unanswered}. Rerun the same command "
                       f"(or `hfbatch resume {info.id}`) to send only those")
            if cfg.output_path == "-":
                message = f"{stop.message}; {stats.completed} answers reached stdout, {unanswered}. {STDOUT_NO_RESUME}"
            if stop.reason == StopReason.AUTH:
                error = AuthError(message)
            elif stop.reason == StopReason.SIGNAL:
                error = Interrupted(self.signals[0] if self.signals else signal.SIGTERM, message)
            elif stop.reason == StopReason.BUDGET:
                error = StoppedEarly(f"{stop.message} ({unanswered})")
            else:
                error = StoppedEarly(message)
        return self._finish(batch, error, answers)

    def _finish(self, batch: _Batch, error: HfbatchError | None, answers: Answers | None = None) -> RunResult:
        b, meta, info, stats = batch.dir, batch.meta, batch.info, batch.stats
        out_path, err_path = meta["output_path"], meta["errors_path"]
        if info.status != BatchStatus.FAILED:
            out_lines = answers.out.lines if answers is not None else 0
            err_lines = answers.err.lines if answers is not None else 0
            info.output_file_id = out_path if (stats.completed or out_lines) else None
            info.error_file_id = err_path if (stats.failed or err_lines) else None
        result = batch_object(info, stats, self.window)
        try:
            b.save_batch(result)
            meta["exit_code"] = int(error.exit_code) if error is not None else int(ExitCode.OK)
            meta["pid"] = None
            b.save_meta(meta)
            if info.status in TERMINAL_STATUSES:
                Registry(b.path.parent.parent).release([p for p in (out_path, err_path) if p != "-"], b.id)
        except OSError as e:
            # The registry says the batch still runs: the rerun resumes it from its files.
            raise WriteError(f"cannot write {e.filename or b.path}: {e.strerror or e}; the batch's lines are "
                             f"in its files. Fix that, then rerun the same command") from None
        return RunResult(result, error)

    def _invalid_message(self, info: BatchInfo) -> str:
        first = info.errors[0]
        n = len(info.errors) + info.errors_dropped
        where = "<stdin>" if self.cfg.input_path == "-" else self.cfg.input_path
        more = f" (and {n - 1} more invalid lines, listed in the summary's errors)" if n > 1 else ""
        return (f"{where}:{first.line_no}: {first.message}{more}; nothing was sent. Fix the file, "
                "or pass --skip-invalid to run the valid lines")


# Output on stdout keeps no ledger (the batch's key is never found again): a rerun is a new batch.
STDOUT_NO_RESUME = ("Output on stdout cannot be resumed: a rerun sends every request again (give -o a file "
                    "to be able to resume)")


def _unanswered(unsent: int, abandoned: int) -> str:
    """How many requests have no line, telling the ones sent and never answered from the ones never sent."""
    if not abandoned:
        return f"{unsent} requests were not sent"
    return (f"{unsent} requests have no answer: {abandoned} were sent and got no answer before the stop, "
            f"{max(0, unsent - abandoned)} were not sent")
