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
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..errors import UsageError

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})

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
