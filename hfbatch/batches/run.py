"""The pipeline for one `hfbatch submit`: registry -> validate -> resume ledger -> execute -> write -> summary.

A batch's identity is its input content (sha256) plus its output and error paths: the same
command run again finds the same batch and resumes it, or replays its stored result when it has
already ended, sending nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import time
from typing import Any

from ..config import RunConfig, parse_duration
from ..errors import AlreadyRunning, ExitCode, InputError, UsageError, error_for_code
from ..models import RunResult
from ..plan import scan_input
from ..summary import BatchInfo, Stats, batch_object
from .ledger import Ledger, scan
from .registry import TERMINAL_STATUSES, BatchDir, Registry, unlock


def submit(cfg: RunConfig) -> RunResult:
    """Run (or resume, or replay) one batch and return its Batch object."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(submit_async(cfg))


def _loop_factory() -> Any:
    """uvloop when installed (pip install "hfbatch[fast]"); no measurable CPU gain yet here
    (BENCHMARKS.md); HFBATCH_UVLOOP=0 turns it off."""
    if os.environ.get("HFBATCH_UVLOOP", "1") == "0":
        return None
    import importlib

    try:
        uvloop = importlib.import_module("uvloop")  # optional: not a static import
    except ImportError:
        return None
    return uvloop.new_event_loop


async def submit_async(cfg: RunConfig) -> RunResult:
    """The same as submit(), inside a running event loop (hfbatch serve)."""
    # New batches' windows are checked against the range where they come in (the CLI flag, serve's
    # POST /v1/batches); here a stored batch keeps the window it was created with.
    window = parse_duration(cfg.completion_window, "--completion-window")
    reg = Registry()
    # Hashing (and the scan below) read the whole file: in a thread, so a server's loop stays responsive.
    input_file, digest = await asyncio.to_thread(_materialize_input, cfg.input_path, reg)
    key = f"{digest}|{_abs(cfg.output_path)}|{_abs(cfg.errors_path)}"
    if cfg.output_path == "-":
        key += f"|stdout:{os.urandom(8).hex()}"  # no durable ledger for stdout: never resumed
    registry_fd = reg.lock()
    try:
        found = reg.get(cfg.batch_id) if cfg.batch_id else reg.find(key)
        if cfg.batch_id and (found is None or found.meta().get("input_sha256") != digest):
            raise UsageError(f"batch {cfg.batch_id}: not found, or its input changed since it was created")
        if found is not None:
            _keep_claims(cfg, reg, found)
            fd = found.lock()
        else:
            replaced = _take_outputs(cfg, reg, digest)
            info = BatchInfo(input_file_id=cfg.input_path, completion_window=cfg.completion_window,
                             metadata=cfg.metadata)
            if cfg.new_batch_id:
                info.id = cfg.new_batch_id
            b = reg.create(info.id)
            if cfg.input_path == "-":
                shutil.move(input_file, b.path / "input.jsonl")
                input_file = str(b.path / "input.jsonl")
            meta = {
                "id": info.id, "key": key, "input_path": cfg.input_path, "input_file": input_file,
                "input_sha256": digest, "output_path": _abs(cfg.output_path),
                "errors_path": _abs(cfg.errors_path), "options": cfg.options(), "created_at": info.created_at,
                "created_ns": time.time_ns(), "expires_at": info.created_at + window, "pid": os.getpid(),
                "exit_code": None, "total": None,
            }
            # batch.json first: meta.json is what makes a batch exist, so a crash in between leaves
            # nothing half-registered.
            b.save_batch(batch_object(info, Stats(), window))
            b.save_meta(meta)
            for path in _claimed_paths(cfg):
                reg.claim(path, info.id)  # released when the batch ends (engine.finish)
            for old in replaced:
                _supersede(old, info.id)
            fd = b.lock(wait=True)  # new: only an instant's probe (list/status) can hold it
    finally:
        unlock(registry_fd)
    if found is not None:
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
            stored = _stored_batch(found, meta, window)
            retry = cfg.retry_failed and stored["status"] == "completed"
            if stored["status"] in TERMINAL_STATUSES and not retry:
                return _replay(found, meta, stored)
            return await _run(cfg, found, meta, window, resume=True)
        finally:
            unlock(fd)
    try:
        return await _run(cfg, b, meta, window, resume=False, info=info)
    finally:
        unlock(fd)


def _stored_batch(b: BatchDir, meta: dict[str, Any], window: int) -> dict[str, Any]:
    """The batch's stored object; rebuilt as freshly created if a crash left it missing or torn."""
    try:
        return b.batch()
    except (OSError, ValueError):
        info = BatchInfo(id=b.id, input_file_id=meta.get("input_path", "-"), created_at=meta["created_at"],
                         completion_window=meta.get("options", {}).get("completion_window", "24h"))
        batch = batch_object(info, Stats(), window)
        b.save_batch(batch)
        return batch


def _materialize_input(path: str, reg: Registry) -> tuple[str, str]:
    """(a file to read, sha256 of its content); stdin is spooled to a private file first."""
    h = hashlib.sha256()
    if path == "-":
        tmp = reg.tmp_dir() / f"stdin-{os.getpid()}-{os.urandom(4).hex()}.jsonl"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := sys.stdin.buffer.read(1 << 20):
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


def _claimed_paths(cfg: RunConfig) -> list[str]:
    """The files a batch writes (and so owns while it is unfinished): absolute paths, stdout excluded."""
    return [_abs(p) for p in (cfg.output_path, cfg.errors_path) if p != "-"]


def _take_outputs(cfg: RunConfig, reg: Registry, digest: str) -> list[BatchDir]:
    """A new batch may write its files unless another batch owns them. Under the registry lock, so two
    submits started at the same moment cannot both pass. Refused (exit 2, naming the owner): files a
    running batch writes, files of an unfinished batch, files holding another batch's lines. --overwrite
    takes over all but the first; returns the batches whose files are taken (to be marked)."""
    taken: dict[str, BatchDir] = {}
    for path in _claimed_paths(cfg):
        holder = reg.claimant(path)
        owner = reg.get(holder) if holder is not None else None
        if owner is None:
            continue
        if owner.running():
            raise UsageError(f"{path} is being written by batch {holder}, which is running; nothing was sent. "
                             f"Choose other paths with -o/-e, or wait for it: `hfbatch wait {holder}`")
        if not cfg.overwrite:
            raise UsageError(f"{path} belongs to batch {holder}, which has not finished; nothing was sent. "
                             f"Resume it (`hfbatch resume {holder}`), cancel it, choose other paths with -o/-e, "
                             "or pass --overwrite to take the files over")
        taken[owner.id] = owner
    for path in (cfg.output_path, cfg.errors_path):
        if path == "-" or not os.path.exists(path) or os.path.getsize(path) == 0:
            continue
        owner = next((b for b in reg.all() if _abs(path) in (_abs(_meta_or_empty(b).get("output_path", "-")),
                                                             _abs(_meta_or_empty(b).get("errors_path", "-")))), None)
        if cfg.overwrite:
            if owner is not None:
                taken[owner.id] = owner
            continue
        if owner is None:
            whose = "no batch hfbatch knows of"
        else:
            m = _meta_or_empty(owner)
            changed = ", since changed" if m.get("input_sha256") != digest else ""
            whose = f"batch {owner.id} (input {m.get('input_path')}{changed})"
        raise UsageError(
            f"{path} already holds lines from {whose}; nothing was sent. Choose other paths "
            "with -o/-e, or pass --overwrite to replace them"
        )
    return list(taken.values())


def _supersede(old: BatchDir, by: str) -> None:
    """`old`'s files were taken over (--overwrite): it can never write to them again. Unfinished, it ends
    as cancelled (our stop_reason: overwritten); finished, it keeps its status but --retry-failed is refused."""
    try:
        meta = old.meta()
        meta["overwritten_by"] = by
        batch = old.batch()
    except (OSError, ValueError):
        return
    if batch.get("status") not in TERMINAL_STATUSES:
        now = int(time.time())
        batch["status"], batch["cancelled_at"] = "cancelled", now
        batch["cancelling_at"] = batch.get("cancelling_at") or now
        hb = batch.setdefault("hfbatch", {})
        hb["state"], hb["stop_reason"] = "finished", "overwritten"
        meta["exit_code"] = int(ExitCode.EXPIRED_OR_CANCELLED)
        old.save_batch(batch)
    old.save_meta(meta)


def _keep_claims(cfg: RunConfig, reg: Registry, found: BatchDir) -> None:
    """A batch about to run again still owns its files, unless another batch took them over (--overwrite)."""
    meta = _meta_or_empty(found)
    try:
        status = found.batch().get("status")
    except (OSError, ValueError):
        status = None
    if status in TERMINAL_STATUSES and not (cfg.retry_failed and status == "completed"):
        return  # it will only be replayed: it writes nothing
    if meta.get("overwritten_by"):
        raise UsageError(f"batch {found.id} cannot run again: its files now hold batch {meta['overwritten_by']}'s "
                         "lines (taken over with --overwrite); nothing was sent")
    for path in _claimed_paths(cfg):
        holder = reg.claimant(path)
        if holder is None:
            reg.claim(path, found.id)
        elif holder != found.id:
            raise UsageError(f"batch {found.id} cannot run again: {path} now belongs to batch {holder}; "
                             "nothing was sent")


def _meta_or_empty(b: BatchDir) -> dict[str, Any]:
    try:
        return b.meta()
    except (OSError, ValueError):
        return {}


def _replay(b: BatchDir, meta: dict[str, Any], stored: dict[str, Any]) -> RunResult:
    code = int(meta.get("exit_code") or 0)
    note = (f"batch {b.id} already ended ({stored['status']}); nothing was sent. "
            + ("Pass --retry-failed to re-send its retryable failures" if code == 3 else
               "Its stored result follows"))
    return RunResult(stored, error_for_code(code, note), replayed=True)


async def _run(cfg: RunConfig, b: BatchDir, meta: dict[str, Any], window: int, *, resume: bool,
               info: BatchInfo | None = None) -> RunResult:
    stored = b.batch() if info is None else None
    if info is None:
        info = _info_from(stored or {}, cfg)
    stats = Stats()
    meta["pid"] = os.getpid()
    b.save_meta(meta)
    stored_cost = ((stored or {}).get("hfbatch") or {}).get("cost") if resume else None
    from ..engines.http import Warmup

    # While the input is scanned (a thread), the prices load and the first connections open.
    async with Warmup(cfg, stored_cost, os.path.getsize(meta["input_file"]), enabled=not cfg.detach) as warm:
        return await _scan_and_execute(cfg, b, meta, window, info, stats, warm, resume=resume)


async def _scan_and_execute(cfg: RunConfig, b: BatchDir, meta: dict[str, Any], window: int, info: BatchInfo,
                            stats: Stats, warm: Any, *, resume: bool) -> RunResult:
    input_file, pass_through = meta["input_file"], cfg.base_url is not None
    validating = info.status == "validating"
    plan = await asyncio.to_thread(scan_input, input_file, strict=validating and not cfg.skip_invalid,
                                   dedupe=cfg.dedupe, pass_through=pass_through, endpoint=cfg.endpoint,
                                   ids=cfg.skip_invalid)
    if validating:
        info.errors, info.errors_dropped = plan.errors, plan.errors_dropped
        if info.errors:
            info.set_status("failed")
            info.state = "failed"
            stats.total = plan.total
            from ..engines.http import finish

            return finish(b, meta, info, stats, window, InputError(_invalid_message(cfg, info)))
        meta["total"] = plan.total
        b.save_meta(meta)
        info.set_status("in_progress")
    stats.total = int(meta.get("total") or 0)
    if cfg.detach:
        return _detach(cfg, b, meta, info, stats, window)
    ledger = Ledger()
    if resume:
        ledger = scan(None if cfg.output_path == "-" else cfg.output_path, cfg.errors_path, stats,
                      retry_failed=cfg.retry_failed)
        if cfg.retry_failed and info.status == "completed":
            info.status, info.state = "in_progress", "running"  # reopened for the retryable lines
    if b.cancel_requested():
        info.set_status("cancelling")
    b.save_batch(batch_object(info, stats, window))
    from ..engines.http import execute

    return await execute(cfg, b, meta, info, stats, ledger, window, resume, plan, warm)


def _info_from(stored: dict[str, Any], cfg: RunConfig) -> BatchInfo:
    info = BatchInfo(
        id=stored["id"], input_file_id=stored["input_file_id"],
        completion_window=stored.get("completion_window", cfg.completion_window),
        created_at=stored["created_at"], status=stored["status"], metadata=stored.get("metadata"),
    )
    for status, key in (("in_progress", "in_progress_at"), ("cancelling", "cancelling_at")):
        if stored.get(key):
            info.stamps[status] = stored[key]
    return info


def _invalid_message(cfg: RunConfig, info: BatchInfo) -> str:
    first = info.errors[0]
    n = len(info.errors) + info.errors_dropped
    where = "<stdin>" if cfg.input_path == "-" else cfg.input_path
    more = f" (and {n - 1} more invalid lines, listed in the summary's errors)" if n > 1 else ""
    return (f"{where}:{first.line_no}: {first.message}{more}; nothing was sent. Fix the file, "
            "or pass --skip-invalid to run the valid lines")


def _detach(cfg: RunConfig, b: BatchDir, meta: dict[str, Any], info: BatchInfo, stats: Stats,
            window: int) -> RunResult:
    """Start `hfbatch resume ID` in its own session (it survives the terminal and its hang-up)."""
    import subprocess

    batch = batch_object(info, stats, window)
    b.save_batch(batch)
    env = dict(os.environ)
    if cfg.token:
        env["HF_TOKEN"] = cfg.token  # handed over in the child's environment only, never a file
    log = os.open(b.path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "hfbatch", "resume", b.id, "--quiet", "--wait"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True,
        )
    finally:
        os.close(log)
    meta["pid"] = child.pid
    b.save_meta(meta)
    return RunResult(batch, None)


def _abs(path: str) -> str:
    return path if path == "-" else os.path.abspath(path)

