"""Output claims: one unfinished batch per output / error file.

A batch owns its files from its registration to its end (claimed in `$HFBATCH_HOME/claims` under the
registry lock, so two submits started at the same moment cannot both pass). A second batch is refused
while the first runs or is unfinished; --overwrite takes the files of a batch that is not running,
which then ends (cancelled, stop_reason overwritten) and never writes to them again.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..config import RunConfig
from ..errors import ExitCode, UsageError
from ..models import TERMINAL_STATUSES, BatchStatus, RunState, StopReason
from .registry import BatchDir, Registry


def abs_path(path: str) -> str:
    return path if path == "-" else os.path.abspath(path)


def claimed_paths(cfg: RunConfig) -> list[str]:
    """The files a batch writes (and so owns while it is unfinished): absolute paths, stdout excluded."""
    return [abs_path(p) for p in (cfg.output_path, cfg.errors_path) if p != "-"]


def take_outputs(cfg: RunConfig, reg: Registry, digest: str) -> list[BatchDir]:
    """A new batch may write its files unless another batch owns them. Under the registry lock, so two
    submits started at the same moment cannot both pass. Refused (exit 2, naming the owner): files a
    running batch writes, files of an unfinished batch, files holding another batch's lines. --overwrite
    takes over all but the first; returns the batches whose files are taken (to be marked)."""
    taken: dict[str, BatchDir] = {}
    for path in claimed_paths(cfg):
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
        owner = next((b for b in reg.all() if abs_path(path) in (abs_path(meta_or_empty(b).get("output_path", "-")),
                                                             abs_path(meta_or_empty(b).get("errors_path", "-")))), None)
        if cfg.overwrite:
            if owner is not None:
                taken[owner.id] = owner
            continue
        if owner is None:
            whose = "no batch hfbatch knows of"
        else:
            m = meta_or_empty(owner)
            changed = ", since changed" if m.get("input_sha256") != digest else ""
            whose = f"batch {owner.id} (input {m.get('input_path')}{changed})"
        raise UsageError(
            f"{path} already holds lines from {whose}; nothing was sent. Choose other paths "
            "with -o/-e, or pass --overwrite to replace them"
        )
    return list(taken.values())


def supersede(old: BatchDir, by: str) -> None:
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
        batch["status"], batch["cancelled_at"] = BatchStatus.CANCELLED, now
        batch["cancelling_at"] = batch.get("cancelling_at") or now
        hb = batch.setdefault("hfbatch", {})
        hb["state"], hb["stop_reason"] = RunState.FINISHED, StopReason.OVERWRITTEN
        meta["exit_code"] = int(ExitCode.EXPIRED_OR_CANCELLED)
        old.save_batch(batch)
    old.save_meta(meta)


def keep_claims(cfg: RunConfig, reg: Registry, found: BatchDir) -> None:
    """A batch about to run again still owns its files, unless another batch took them over (--overwrite)."""
    meta = meta_or_empty(found)
    try:
        status = found.batch().get("status")
    except (OSError, ValueError):
        status = None
    if status in TERMINAL_STATUSES and not (cfg.retry_failed and status == BatchStatus.COMPLETED):
        return  # it will only be replayed: it writes nothing
    if meta.get("overwritten_by"):
        raise UsageError(f"batch {found.id} cannot run again: its files now hold batch {meta['overwritten_by']}'s "
                         "lines (taken over with --overwrite); nothing was sent")
    for path in claimed_paths(cfg):
        holder = reg.claimant(path)
        if holder is None:
            reg.claim(path, found.id)
        elif holder != found.id:
            raise UsageError(f"batch {found.id} cannot run again: {path} now belongs to batch {holder}; "
                             "nothing was sent")


def meta_or_empty(b: BatchDir) -> dict[str, Any]:
    try:
        return b.meta()
    except (OSError, ValueError):
        return {}


