"""The one seam for what only Hugging Face's storage backend (xet) can serve: moving a part's files in and out of
a bucket. Production: huggingface_hub's real calls (`batch_bucket_files`, `download_bucket_files`). Tests and
`make demo-gpu`: a local folder (HFBATCH_BUCKETS_DIR) that the fake Hub mounts in its Jobs, so a Job reads and
writes the very files this side puts and takes. Everything else about buckets (create, info) is plain HTTP and
goes through huggingface_hub against the Hub (or the fake Hub) like any other call.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol

BUCKETS_DIR_ENV = "HFBATCH_BUCKETS_DIR"


class BucketFiles(Protocol):
    def upload(self, bucket_id: str, local: Path, remote: str) -> None: ...

    def download(self, bucket_id: str, remote: str, local: Path) -> bool:
        """Copy a bucket file here (0600); False when it does not exist."""
        ...

    def delete(self, bucket_id: str, remotes: list[str]) -> None: ...


class HubBucketFiles:
    """huggingface_hub's bucket transfers (through xet)."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def upload(self, bucket_id: str, local: Path, remote: str) -> None:
        self.api.batch_bucket_files(bucket_id, add=[(str(local), remote)])

    def download(self, bucket_id: str, remote: str, local: Path) -> bool:
        found = list(self.api.get_bucket_paths_info(bucket_id, [remote]))
        if not found:
            return False
        tmp = local.with_name(local.name + ".part")
        self.api.download_bucket_files(bucket_id, [(found[0], str(tmp))], raise_on_missing_files=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, local)
        return True

    def delete(self, bucket_id: str, remotes: list[str]) -> None:
        self.api.batch_bucket_files(bucket_id, delete=remotes)


class LocalBucketFiles:
    """A folder standing for the buckets: `<root>/<namespace>/<bucket>/<path>` (tests, the demo)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, bucket_id: str, remote: str) -> Path:
        return self.root / bucket_id / remote

    def upload(self, bucket_id: str, local: Path, remote: str) -> None:
        dest = self._path(bucket_id, remote)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)

    def download(self, bucket_id: str, remote: str, local: Path) -> bool:
        src = self._path(bucket_id, remote)
        if not src.exists():
            return False
        tmp = local.with_name(local.name + ".part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out)
        os.replace(tmp, local)
        return True

    def delete(self, bucket_id: str, remotes: list[str]) -> None:
        for remote in remotes:
            try:
                os.unlink(self._path(bucket_id, remote))
            except FileNotFoundError:
                pass


def bucket_files(api: Any) -> BucketFiles:
    """The local folder when HFBATCH_BUCKETS_DIR is set (tests, the demo), else the Hub's storage."""
    root = os.environ.get(BUCKETS_DIR_ENV)
    return LocalBucketFiles(Path(root)) if root else HubBucketFiles(api)
