"""Registry commands: list, status, cancel, wait, results (what `client.batches.*` does for OpenAI)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from ..errors import EndedEarly, UsageError
from ..models import TERMINAL_STATUSES, BatchStatus, RunState, StopReason
from .registry import BatchDir, NewerSchema, Registry, pid_alive


def get(batch_id: str, reg: Registry | None = None) -> BatchDir:
    b = (reg or Registry()).get(batch_id)
    if b is None:
        raise UsageError(f"no batch {batch_id!r} in the registry; `hfbatch list` shows the known batches")
    return b


def live_batch(b: BatchDir) -> dict[str, Any]:
    """The stored Batch object, with our state corrected when its process died without a word."""
    batch = b.batch()
    hb = batch.setdefault("hfbatch", {})
    if batch["status"] not in TERMINAL_STATUSES and hb.get("state") in (None, RunState.RUNNING):
        if not b.running() and not pid_alive(_meta(b).get("pid")):
            hb["state"] = RunState.INTERRUPTED
            hb["stop_reason"] = StopReason.PROCESS_EXITED
    return batch


def _meta(b: BatchDir) -> dict[str, Any]:
    try:
        return b.meta()
    except (OSError, ValueError):
        return {}


def list_batches(limit: int | None = None, *, newer: list[NewerSchema] | None = None) -> Iterator[dict[str, Any]]:
    """Newest first; unreadable entries (a crash mid-creation) are skipped. A batch written by a newer
    hfbatch is never silently left out: it raises NewerSchema (one line, exit 2), unless the caller passes
    `newer`, a list that collects them while the readable batches are listed (for a note after the rows)."""
    rows = []
    for b in Registry().all():
        try:
            batch = live_batch(b)
            order = _meta(b).get("created_ns") or batch.get("created_at", 0) * 10**9
        except NewerSchema as e:
            if newer is None:
                raise
            newer.append(e)
            continue
        except (OSError, ValueError, KeyError):
            continue
        rows.append((order, batch))
    rows.sort(key=lambda r: r[0], reverse=True)
    yield from (batch for _, batch in (rows[:limit] if limit else rows))


async def cancel(batch_id: str, token: str | None = None) -> dict[str, Any]:
    """Cancel a batch: the process running it stops dispatching (in-flight requests finish); when none
    runs it, it is closed out here (sends nothing, writes the batch_cancelled lines). Its Batch object."""
    batch, finish_here = request_cancel(batch_id)
    if not finish_here:
        return batch
    from ..config import RunConfig
    from .run import BatchRun

    result = await BatchRun(RunConfig.from_meta(get(batch_id).meta(), quiet=True, token=token)).execute()
    if result.error is not None and not isinstance(result.error, EndedEarly):
        raise result.error
    return result.batch


def request_cancel(batch_id: str) -> tuple[dict[str, Any], bool]:
    """Ask for a cancel. Returns (batch, finish_here): True when no process runs it, so the caller
    closes it out (writes batch_cancelled lines) by running it: the run sees the request at once."""
    b = get(batch_id)
    batch = live_batch(b)
    status = batch["status"]
    if status == BatchStatus.CANCELLED:
        return batch, False
    if status in TERMINAL_STATUSES:
        raise UsageError(f"batch {batch_id} already ended ({status}); there is nothing to cancel")
    b.request_cancel()
    if b.running() or pid_alive(_meta(b).get("pid")):
        batch["status"] = "cancelling"  # the running process notices within a second
        batch["cancelling_at"] = batch.get("cancelling_at") or int(time.time())
        return batch, False
    return batch, True


def wait(batch_id: str, poll: float = 0.1, timeout: float | None = None) -> tuple[dict[str, Any], int]:
    """Block until the batch ends (or its process is gone); returns (batch, its exit code)."""
    b = get(batch_id)
    start = time.monotonic()
    while True:
        batch = live_batch(b)
        meta = _meta(b)
        ended = batch["status"] in TERMINAL_STATUSES
        if ended or (batch["hfbatch"].get("state") == RunState.INTERRUPTED and not b.running()
                     and not pid_alive(meta.get("pid"))):
            code = meta.get("exit_code")
            return batch, int(code) if code is not None else 5
        if timeout is not None and time.monotonic() - start > timeout:
            raise UsageError(f"batch {batch_id} still {batch['status']} after {timeout:g} s")
        time.sleep(poll)


def results_path(batch_id: str, errors: bool) -> str | None:
    meta = _meta(get(batch_id))
    path: str | None = meta.get("errors_path" if errors else "output_path")
    return None if path in (None, "-") else path
