"""Serve ownership (hfbatch serve): a client's API key -> the owner id its files and batches carry.

In pass-through mode (no --api-key) each client's key is its Hugging Face token, and every File
and batch it creates records the token's owner id: HMAC-SHA256 of the token under a salt of 32
random bytes made once in `$HFBATCH_HOME/serve/owner.salt` (0600). The token itself is never
stored; without the salt the id cannot be tested against guessed tokens. A caller sees only the
objects whose owner id matches its own (hmac.compare_digest).

With --api-key the one key owns the whole store: it sees every object, whatever its owner (a
pass-through client's, or none), and what it creates records API_KEY_OWNER, which no token's id
can equal, so no pass-through client sees it after a switch back. Objects stored before owners
were recorded have no owner: only the --api-key key sees them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

SALT_BYTES = 32
API_KEY_OWNER = "api-key"  # not hex: never the id of a token


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from: the owner id its new objects record, and what it may see."""

    owner: str
    sees_all: bool = False  # --api-key: the server's one key owns every stored object

    def owns(self, owner: object) -> bool:
        """May this caller see (and act on) an object stored with `owner` (None: stored before owners)?"""
        if self.sees_all:
            return True
        return isinstance(owner, str) and hmac.compare_digest(owner.encode(), self.owner.encode())


class Owners:
    """Token -> owner id, under the store's salt (made on first use)."""

    def __init__(self, salt_path: Path) -> None:
        self._salt = _load_salt(salt_path)

    def of(self, token: str) -> str:
        return hmac.new(self._salt, token.encode(), hashlib.sha256).hexdigest()


def _load_salt(path: Path) -> bytes:
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, os.urandom(SALT_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a salt another server made a moment ago
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    salt = path.read_bytes()
    if len(salt) != SALT_BYTES:
        raise UsageError(f"{path} is damaged ({len(salt)} bytes, not {SALT_BYTES}). Delete it to make a new "
                         "one: the files and batches of pass-through clients then stay visible only with --api-key")
    return salt
