"""Where hfbatch keeps its state ($HFBATCH_HOME) and how it writes it: private folders, atomic JSON files.

Directories are 0700 and files 0600 whatever the umask: they hold prompts. JSON files are replaced
atomically (write a temp file, fsync, rename), so a reader, or a process that crashed mid-write, never
sees half a file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import orjson

from .errors import UsageError


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
    """Atomically replace `path` with `obj` as JSON, mode 0600 (see replace_file)."""
    replace_file(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")


def replace_file(path: Path, data: bytes, *, private: bool = True) -> None:
    """Atomically replace `path` with `data` (fsync'ed), mode 0600 when `private` (else as the umask says). A
    failure (a full disk) leaves `path` as it was and no temp file, and raises the OSError with `path` as its
    filename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rest = memoryview(data)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
        try:
            if private:
                os.fchmod(fd, 0o600)
            while rest:  # a short write (a nearly full disk) is followed by the rest, or by its error
                rest = rest[os.write(fd, rest):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if e.filename is None or e.filename == str(tmp):
            e.filename = str(path)
        raise


def read_json(path: Path) -> Any:
    return orjson.loads(path.read_bytes())
