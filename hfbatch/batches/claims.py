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


def same_file(a: str, b: str) -> bool:
    """The same file, however each is spelled (relative, `..`, through a symlink)."""
    return os.path.realpath(a) == os.path.realpath(b)


def check_summary(cfg: RunConfig, reg: Registry, own: str | None) -> None:
    """--summary FILE is replaced at the end of the run: never a file a batch writes its lines to (its own
    -o/-e, or any registered batch's, finished or not). Call under the registry lock."""
    path = cfg.summary_path
    if not path or path == "-":
        return
    held = reg.claim_of(path)
    if held is not None and held[0] != own and held[1] == "file":
        raise UsageError(f"--summary {path} is a file batch {held[0]} writes its lines to; it would be replaced. "
                         "Choose another path for --summary; nothing was sent")
    for b in reg.all():
        m = meta_or_empty(b)
        for key, what in (("output_path", "output"), ("errors_path", "error")):
            p = m.get(key)
            if isinstance(p, str) and p != "-" and same_file(p, path):
                raise UsageError(f"--summary {path} is the {what} file of batch {b.id}; it would be replaced. "
                                 "Choose another path for --summary; nothing was sent")


def claim_summary(cfg: RunConfig, reg: Registry, batch_id: str) -> None:
    """The batch's --summary file is claimed too, so that no other batch takes it as -o/-e while this one
    is unfinished (it would replace those lines at its end). Batches may share a summary file."""
    if cfg.summary_path and cfg.summary_path != "-" and reg.claim_of(cfg.summary_path) is None:
        reg.claim(abs_path(cfg.summary_path), batch_id, kind="summary")


def take_outputs(cfg: RunConfig, reg: Registry, digest: str) -> list[BatchDir]:
    """A new batch may write its files unless another batch owns them. Under the registry lock, so two
    submits started at the same moment cannot both pass. Refused (exit 2, naming the owner): files a
    running batch writes, files of an unfinished batch, files holding another batch's lines. --overwrite
    takes over all but the first; returns the batches whose files are taken (to be marked)."""
    taken: dict[str, BatchDir] = {}
    check_summary(cfg, reg, None)
    for path in claimed_paths(cfg):
        held = reg.claim_of(path)
        holder = held[0] if held is not None else None
        owner = reg.get(holder) if holder is not None else None
        if owner is None:
            continue
        summary = held is not None and held[1] == "summary"
        if owner.running():
            what = "is the --summary file of" if summary else "is being written by"
            raise UsageError(f"{path} {what} batch {holder}, which is running; nothing was sent. "
                             f"Choose other paths with -o/-e, or wait for it: `hfbatch wait {holder}`")
        if summary and cfg.overwrite:
            continue  # its summary is replaced by our lines: that batch's own lines are elsewhere
        if summary:
            raise UsageError(f"{path} is the --summary file of batch {holder}, which has not finished; nothing "
                             "was sent. Choose other paths with -o/-e, or pass --overwrite to take the file")
        if not cfg.overwrite:
            raise UsageError(f"{path} belongs to batch {holder}, which has not finished; nothing was sent. "
                             f"Resume it (`hfbatch resume {holder}`), cancel it, choose other paths with -o/-e, "
                             "or pass --overwrite to take the files over")
        taken[owner.id] = owner
    for path in (cfg.output_path, cfg.errors_path):
        if path == "-" or not os.path.exists(path) or os.path.getsize(path) == 0:
            continue
        owner = next((b for b in reg.all() if any(
            isinstance(p, str) and p != "-" and same_file(p, path)
            for p in (meta_or_empty(b).get("output_path"), meta_or_empty(b).get("errors_path")))), None)
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
    check_summary(cfg, reg, found.id)  # a replay writes it too
    try:
        status = found.batch().get("status")
    except (OSError, ValueError):
        status = None
    if status in TERMINAL_STATUSES and not (cfg.retry_failed and status == BatchStatus.COMPLETED):
        return  # it will only be replayed: it writes nothing (but the summary)
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
    claim_summary(cfg, reg, found.id)


def meta_or_empty(b: BatchDir) -> dict[str, Any]:
    try:
        return b.meta()
    except (OSError, ValueError):
        return {}


