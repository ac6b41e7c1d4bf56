"""Batch registry: $HFBATCH_HOME/batches/<id>/{batch.json, meta.json, lock, cancel, input.jsonl, log}.

Directories are 0700 and files 0600 whatever the umask: they hold prompts. JSON files are
replaced atomically (write a temp file, fsync, rename), so a reader, or a process that crashed
mid-write, never sees half a file. A run holds an exclusive flock on `lock` for its lifetime:
that is how "is it running?" is answered, even after kill -9 (the kernel drops the lock).

Versioned state: meta.json carries a top-level "schema", batch.json (an OpenAI Batch object: its top
level is OpenAI's) carries it at batch["hfbatch"]["schema"], and $HFBATCH_HOME/registry.json records the
folder layout. A file without a version predates versioning: version 1. Reading migrates in memory
through MIGRATIONS; a file is upgraded on disk only when it is saved again. A file (or layout) newer than
this hfbatch knows is refused with NewerSchema (exit 2), never guessed at or rewritten.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..models import TERMINAL_STATUSES
from ..storage import home, private_dir, read_json, write_json

# -- versions: the one place that knows them (DESIGN rule 16) --------------------------------------

Doc = dict[str, Any]


def _same(obj: Doc) -> Doc:
    return obj


@dataclass(frozen=True, slots=True)
class Migration:
    """Registry schema N -> N + 1: how a meta.json and a batch.json (without their "schema") change.
    Each function gets the old dict and returns the new one; a file a step leaves alone keeps `_same`."""

    meta: Callable[[Doc], Doc] = _same
    batch: Callable[[Doc], Doc] = _same


# MIGRATIONS[i] turns schema i + 1 into i + 2. A new schema is one appended Migration (and its test).
MIGRATIONS: list[Migration] = []

# LAYOUT_MIGRATIONS[i] turns folder layout i + 1 into i + 2 (moves files under the root it is given); run
# once per $HFBATCH_HOME, under the registry lock, registry.json rewritten after each step.
LAYOUT_MIGRATIONS: list[Callable[[Path], None]] = []
LAYOUT_FILE = "registry.json"


def registry_schema() -> int:
    """The schema of meta.json and batch.json this hfbatch writes, and the newest it reads."""
    return 1 + len(MIGRATIONS)


def registry_layout() -> int:
    """The folder layout of $HFBATCH_HOME this hfbatch writes, and the newest it reads."""
    return 1 + len(LAYOUT_MIGRATIONS)


class NewerSchema(UsageError):
    """A registry file, or the registry itself, written by a newer hfbatch: not read, never rewritten."""

    def __init__(self, what: str, kind: str, found: int, known: int) -> None:
        super().__init__(f"{what} was written by a newer hfbatch (registry {kind} {found}, this one reads up "
                         f"to {known}): upgrade hfbatch (pip install -U hfbatch)")
        self.found, self.known = found, known


def _version(value: object, path: Path) -> int:
    """A stored version: missing means 1 (written before versions existed); anything but an int >= 1 is a
    damaged file (ValueError, as for torn JSON)."""
    if value is None:
        return 1
    if type(value) is not int or value < 1:
        raise ValueError(f"{path}: schema {value!r} is not a version")
    return value


def _upgrade(obj: Doc, found: int, step: Callable[[Migration], Callable[[Doc], Doc]], batch_id: str) -> Doc:
    known = registry_schema()
    if found > known:
        raise NewerSchema(f"batch {batch_id}", "schema", found, known)
    for migration in MIGRATIONS[found - 1:]:
        obj = step(migration)(obj)
    return obj


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
        """The stored Batch object, migrated to this hfbatch's schema (its hfbatch.schema says which).
        NewerSchema if a newer hfbatch wrote it; OSError / ValueError if it is missing or damaged."""
        obj = self._read(self.batch_file)
        hb = obj.get("hfbatch")
        found = _version(hb.pop("schema", None) if isinstance(hb, dict) else None, self.batch_file)
        obj = _upgrade(obj, found, lambda m: m.batch, self.id)
        _stamp_batch(obj)
        return obj

    def meta(self) -> dict[str, Any]:
        """The stored meta.json, migrated to this hfbatch's schema; errors as batch()."""
        obj = self._read(self.meta_file)
        found = _version(obj.pop("schema", None), self.meta_file)
        obj = _upgrade(obj, found, lambda m: m.meta, self.id)
        obj["schema"] = registry_schema()
        return obj

    def save_batch(self, batch: dict[str, Any]) -> None:
        """Write the Batch object, stamped (in place: what is printed is what is stored) with the schema."""
        _stamp_batch(batch)
        write_json(self.batch_file, batch)

    def save_meta(self, meta: dict[str, Any]) -> None:
        """Write meta.json, stamped (in place) with the schema."""
        meta["schema"] = registry_schema()
        write_json(self.meta_file, meta)

    @staticmethod
    def _read(path: Path) -> Doc:
        obj = read_json(path)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: not a JSON object")
        return obj

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


def _stamp_batch(batch: Doc) -> None:
    hb = batch.get("hfbatch")
    if not isinstance(hb, dict):
        hb = batch["hfbatch"] = {}
    hb["schema"] = registry_schema()


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the fd releases the flock


class Registry:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or home()
        self._check_layout()
        self.batches = private_dir(self.root / "batches")

    def _layout(self) -> int | None:
        """The layout recorded in registry.json; None when there is none (a new registry, or one made before
        layouts were recorded: both are layout 1)."""
        path = self.root / LAYOUT_FILE
        try:
            obj = read_json(path)
            return _version(obj.get("layout") if isinstance(obj, dict) else "?", path)
        except FileNotFoundError:
            return None
        except ValueError as e:  # written atomically: only a hand edit gets here
            raise UsageError(f"{path} is damaged ({e}); delete it and hfbatch writes it again") from None

    def _check_layout(self) -> None:
        """Refuse a registry laid out by a newer hfbatch; bring an older one up to date (under the registry
        lock); record the layout when it is not recorded yet."""
        known = registry_layout()
        found = self._layout()
        self._refuse_newer(found or 1, known)
        if (found or 1) < known:
            fd = self.lock()
            try:
                found = self._layout() or 1  # again: another process may have done it meanwhile
                self._refuse_newer(found, known)
                for step, migrate in enumerate(LAYOUT_MIGRATIONS[found - 1:], start=found):
                    migrate(self.root)
                    write_json(self.root / LAYOUT_FILE, {"layout": step + 1})
            finally:
                unlock(fd)
        elif found is None:
            write_json(private_dir(self.root) / LAYOUT_FILE, {"layout": known})

    def _refuse_newer(self, found: int, known: int) -> None:
        if found > known:
            raise NewerSchema(f"the registry {self.root}", "layout", found, known)

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
        """The most recent batch with this identity (input content + output paths). NewerSchema if a newer
        hfbatch wrote any batch: this one cannot tell whether that is the same job (re-sending it would pay
        twice), so it refuses rather than guess."""
        best: tuple[float, BatchDir] | None = None
        for b in self.all():
            try:
                meta = b.meta()
            except (OSError, ValueError):  # damaged (a crash mid-creation): not a batch to resume
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
        # The file, however it is spelled: `out.jsonl`, its absolute path, `sub/../out.jsonl`, a symlink to it.
        real = os.path.realpath(path)
        return private_dir(self.root / "claims") / (hashlib.sha256(real.encode()).hexdigest()[:40] + ".json")

    def claimant(self, path: str) -> str | None:
        """The unfinished batch that owns `path` (absolute), if any. Call under lock()."""
        held = self.claim_of(path)
        return held[0] if held is not None else None

    def claim_of(self, path: str) -> tuple[str, str] | None:
        """The unfinished batch that owns `path` and how: "file" (its -o/-e) or "summary" (its --summary)."""
        try:
            doc = read_json(self._claim_file(path))
            holder, kind = doc.get("batch"), doc.get("kind", "file")
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
        return holder, str(kind)

    def claim(self, path: str, batch_id: str, kind: str = "file") -> None:
        """Make `batch_id` the owner of `path` (absolute). Call under lock(), after claimant()."""
        write_json(self._claim_file(path), {"path": path, "batch": batch_id, "kind": kind})

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
