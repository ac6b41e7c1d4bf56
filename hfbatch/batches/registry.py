"""Batch registry: $HFBATCH_HOME/batches/<id>/{batch.json, meta.json, lock, cancel, input.jsonl, log}.

Directories are 0700 and files 0600 whatever the umask: they hold prompts. JSON files are
replaced atomically (write a temp file, fsync, rename), so a reader, or a process that crashed
mid-write, never sees half a file. A run holds an exclusive flock on `lock` for its lifetime:
that is how "is it running?" is answered, even after kill -9 (the kernel drops the lock).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..errors import UsageError

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})


def home() -> Path:
    """$HFBATCH_HOME, else $XDG_DATA_HOME/hfbatch, else ~/.local/share/hfbatch.

    Created 0700 when missing. An existing folder is never chmod'ed (it is not ours to change: with
    HFBATCH_HOME=/tmp that would lock every other user out); what hfbatch writes inside is 0700/0600.
    A folder others can write to (/tmp, a 1777 or group-writable folder) gets a private subfolder
    `hfbatch-<uid>` instead; a folder owned by another user is refused."""
    env = os.environ.get("HFBATCH_HOME")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        root = Path(xdg) / "hfbatch"
    return _private_root(root)


def _private_root(root: Path) -> Path:
    try:
        st = root.stat()
    except FileNotFoundError:
        root.parent.mkdir(parents=True, exist_ok=True)
        return private_dir(root)
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"HFBATCH_HOME {root} is not a folder; point it at a folder of yours")
    shared = bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    if st.st_uid != os.getuid() and not shared:
        raise UsageError(f"the registry folder {root} is owned by another user; point HFBATCH_HOME at a folder "
                         "of yours")
    if not shared:
        return root
    own = root / f"hfbatch-{os.getuid()}"
    private_dir(own)
    st = own.lstat()  # not followed: in a shared folder anyone could have planted a link
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UsageError(f"{own} is not a private folder of yours (owned by another user, a link, or open to "
                         "others); remove it or point HFBATCH_HOME elsewhere")
    return own


def private_dir(path: Path) -> Path:
    """`path`, created 0700 whatever the umask if missing; an existing folder is left as it is."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return path
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)  # missing parents as `mkdir -p` makes them
        return private_dir(path)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask; chmod is not
    return path


def write_json(path: Path, obj: Any) -> None:
    """Atomically replace `path` with `obj` as JSON, mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


@dataclass
class BatchDir:
    """One registered batch."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def batch_file(self) -> Path:
        return self.path / "batch.json"

    @property
    def meta_file(self) -> Path:
        return self.path / "meta.json"

    @property
    def cancel_file(self) -> Path:
        return self.path / "cancel"

    def batch(self) -> dict[str, Any]:
        obj: dict[str, Any] = read_json(self.batch_file)
        return obj

    def meta(self) -> dict[str, Any]:
        obj: dict[str, Any] = read_json(self.meta_file)
        return obj

    def save_batch(self, batch: dict[str, Any]) -> None:
        write_json(self.batch_file, batch)

    def save_meta(self, meta: dict[str, Any]) -> None:
        write_json(self.meta_file, meta)

    def lock(self, wait: bool = False, tries: int = 5) -> int | None:
        """Take the run lock; returns its fd, or None if another process holds it (wait=False).

        `running()` probes by taking the lock for an instant, so a busy lock is tried a few times
        over ~50 ms before it counts as held by a run."""
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        if wait:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        for attempt in range(tries):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if attempt + 1 < tries:
                    time.sleep(0.01)
        os.close(fd)
        return None

    def running(self) -> bool:
        """Is a process running this batch right now? (Asks the lock, not a pid file.)"""
        fd = self.lock(tries=1)
        if fd is None:
            return True
        os.close(fd)
        return False

    def request_cancel(self) -> None:
        fd = os.open(self.cancel_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    def cancel_requested(self) -> bool:
        return self.cancel_file.exists()


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the fd releases the flock


class Registry:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or home()
        self.batches = private_dir(self.root / "batches")

    def create(self, batch_id: str) -> BatchDir:
        return BatchDir(private_dir(self.batches / batch_id))

    def get(self, batch_id: str) -> BatchDir | None:
        if not batch_id.startswith("batch_") or "/" in batch_id or batch_id in (".", ".."):
            return None
        path = self.batches / batch_id
        return BatchDir(path) if (path / "meta.json").exists() else None

    def all(self) -> Iterator[BatchDir]:
        for p in self.batches.iterdir():
            if (p / "meta.json").exists():
                yield BatchDir(p)

    def find(self, key: str) -> BatchDir | None:
        """The most recent batch with this identity (input content + output paths)."""
        best: tuple[float, BatchDir] | None = None
        for b in self.all():
            try:
                meta = b.meta()
            except (OSError, orjson.JSONDecodeError):
                continue
            if meta.get("key") == key:
                created = float(meta.get("created_at", 0))
                if best is None or created > best[0]:
                    best = (created, b)
        return best[1] if best else None

    def lock(self) -> int:
        """The registry-wide lock (held briefly): finding and creating a batch is one step, so two
        identical submits started at once register one batch, not two."""
        fd = os.open(self.root / "registry.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def tmp_dir(self) -> Path:
        return private_dir(self.root / "tmp")

    # -- output claims: one unfinished batch per output / error file ---------------------------------

    def _claim_file(self, path: str) -> Path:
        return private_dir(self.root / "claims") / (hashlib.sha256(path.encode()).hexdigest()[:40] + ".json")

    def claimant(self, path: str) -> str | None:
        """The unfinished batch that owns `path` (absolute), if any. Call under lock()."""
        try:
            holder = read_json(self._claim_file(path)).get("batch")
        except (OSError, ValueError, AttributeError):
            return None
        b = self.get(holder) if isinstance(holder, str) else None
        if b is None:
            return None  # removed from the registry: a stale claim
        try:
            if b.batch().get("status") in TERMINAL_STATUSES:
                return None  # ended without releasing (a crash right at the end)
        except (OSError, ValueError):
            pass
        return holder  # type: ignore[no-any-return]

    def claim(self, path: str, batch_id: str) -> None:
        """Make `batch_id` the owner of `path` (absolute). Call under lock(), after claimant()."""
        write_json(self._claim_file(path), {"path": path, "batch": batch_id})

    def release(self, paths: list[str], batch_id: str) -> None:
        """Drop `batch_id`'s claims on `paths` (the batch ended). Takes the registry lock."""
        fd = self.lock()
        try:
            for path in paths:
                f = self._claim_file(path)
                try:
                    if read_json(f).get("batch") == batch_id:
                        f.unlink()
                except (OSError, ValueError, AttributeError):
                    continue
        finally:
            unlock(fd)
