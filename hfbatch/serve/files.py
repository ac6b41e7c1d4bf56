"""Files stage (hfbatch serve): OpenAI Files API requests -> $HFBATCH_HOME/files/<file-id>.{jsonl,json}.

Each file is its data (`<id>.jsonl`) plus a sidecar (`<id>.json`, OpenAI's File object): the
sidecar is written last, so a file exists once it is complete. Uploads stream into a private
`.<id>.part` file and are renamed into place. Batches created by the server are linked to their
file ids in `$HFBATCH_HOME/serve/<batch-id>.json` (input, output and error file ids, endpoint,
metadata): the registry stores local paths, the API answers with these ids. Directories are 0700
and files 0600, like the registry. Ids are checked against strict patterns before they touch a path.
An upload is refused (413) as soon as it passes the size limit, while it streams in.

Every sidecar and link also records its `owner` (owners.py; never sent to clients): a caller sees
only what it owns, and another owner's object answers exactly like a missing one (404, or the 400
of a missing input file), so its existence is not revealed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from ..storage import home, private_dir, read_json, write_json
from .owners import Caller

FILE_ID_RE = re.compile(r"^file-[A-Za-z0-9]+$")
BATCH_ID_RE = re.compile(r"^batch_[0-9a-f]+$")
OWNER_SALT = "owner.salt"  # in the links directory ($HFBATCH_HOME/serve)


@dataclass(frozen=True, slots=True)
class StoredFile:
    obj: dict[str, Any]  # OpenAI's File object: what the API answers
    owner: str | None  # owners.py; None: stored before owners were recorded


def new_file_id() -> str:
    return "file-" + os.urandom(12).hex()


def new_batch_id() -> str:
    return "batch_" + os.urandom(12).hex()


class ApiError(Exception):
    """An answer in OpenAI's error envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return json_response(body, self.status)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def page(rows: list[dict[str, Any]], q: Any, *, default: int, most: int) -> dict[str, Any]:
    """OpenAI's cursor page: `after` (an id of the previous page), `limit` -> data, first/last id, has_more."""
    try:
        limit = int(q.get("limit", default))
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise ApiError(400, f"Invalid 'limit': use an integer from 1 to {most}.", param="limit", code="invalid_value")
    after = q.get("after")
    if after:
        at = next((i for i, r in enumerate(rows) if r["id"] == after), None)
        rows = rows[at + 1:] if at is not None else []
    data = rows[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


class Upload:
    """One file being received: bytes go to a private temp file, refused past `limit` bytes."""

    def __init__(self, store: FileStore, limit: int) -> None:
        self.store, self.limit, self.size = store, limit, 0
        self.file_id = new_file_id()
        self.tmp = store.root / f".{self.file_id}.part"
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._f: BinaryIO | None = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> bool:
        """Append a chunk; False (and nothing written) when it would pass the limit."""
        self.size += len(chunk)
        if self.size > self.limit or self._f is None:
            return False
        self._f.write(chunk)
        return True

    def commit(self, filename: str, purpose: str, owner: str) -> dict[str, Any]:
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self.tmp, self.store.data_path(self.file_id))
        return self.store.save(self.file_id, filename, purpose, owner)

    def discard(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self.tmp.unlink(missing_ok=True)


class FileStore:
    def __init__(self, root: Path | None = None) -> None:
        base = root or home()
        self.root = private_dir(base / "files")
        self.links_dir = private_dir(base / "serve")

    # ------------------------------------------------------------------ files

    def data_path(self, file_id: str) -> Path:
        if not FILE_ID_RE.match(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / f"{file_id}.jsonl"

    def _sidecar(self, file_id: str) -> Path:
        return self.data_path(file_id).with_suffix(".json")

    def create_empty(self, file_id: str) -> str:
        """A private empty data file (a batch's output or error file, filled by the engine)."""
        path = self.data_path(file_id)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        return str(path)

    def save(self, file_id: str, filename: str, purpose: str, owner: str | None) -> dict[str, Any]:
        """Write the sidecar (the file then exists); returns the File object (without the owner)."""
        obj: dict[str, Any] = {
            "id": file_id, "object": "file", "bytes": self.data_path(file_id).stat().st_size,
            "created_at": int(time.time()), "filename": filename[:255], "purpose": purpose,
            "status": "processed", "expires_at": None, "status_details": None,
        }
        write_json(self._sidecar(file_id), obj if owner is None else {**obj, "owner": owner})
        return obj

    def get(self, file_id: str) -> StoredFile | None:
        if not FILE_ID_RE.match(file_id):
            return None
        try:
            obj = read_json(self._sidecar(file_id))
        except (OSError, ValueError):
            return None
        if not isinstance(obj, dict):
            return None
        owner = obj.pop("owner", None)
        return StoredFile(obj, owner if isinstance(owner, str) else None)

    def register_output(self, file_id: str, filename: str, owner: str | None) -> None:
        """A finished batch's output or error file becomes a File object (purpose batch_output) of the
        batch's owner, once."""
        if self.get(file_id) is None and self.data_path(file_id).exists():
            self.save(file_id, filename, "batch_output", owner)

    def all(self) -> list[StoredFile]:
        out = []
        for p in self.root.glob("file-*.json"):
            obj = self.get(p.stem)
            if obj is not None:
                out.append(obj)
        return out

    def delete(self, file_id: str) -> bool:
        if self.get(file_id) is None:
            return False
        self._sidecar(file_id).unlink(missing_ok=True)  # first: the file stops existing at once
        self.data_path(file_id).unlink(missing_ok=True)
        return True

    def clean_partial(self) -> None:
        """Uploads cut short by a crash."""
        for p in self.root.glob(".file-*.part"):
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ batch links

    def _link_path(self, batch_id: str) -> Path:
        if not BATCH_ID_RE.match(batch_id):
            raise ValueError(f"not a batch id: {batch_id!r}")
        return self.links_dir / f"{batch_id}.json"

    def save_link(self, link: dict[str, Any]) -> None:
        write_json(self._link_path(link["id"]), link)

    def link(self, batch_id: str) -> dict[str, Any] | None:
        if not BATCH_ID_RE.match(batch_id):
            return None
        try:
            obj: dict[str, Any] = orjson.loads(self._link_path(batch_id).read_bytes())
        except (OSError, ValueError):
            return None
        return obj

    def links(self) -> list[dict[str, Any]]:
        """Every batch the server created, newest first."""
        out = [link for p in self.links_dir.glob("batch_*.json") if (link := self.link(p.stem)) is not None]
        out.sort(key=lambda link: int(link.get("created_ns", 0)), reverse=True)
        return out


class FilesApi:
    """The /v1/files routes; `ended(batch_id)` says whether a batch has ended (an input in use is kept),
    `caller(request)` who a request comes from (the server has authenticated it)."""

    def __init__(self, store: FileStore, max_upload: int, ended: Callable[[str], bool],
                 caller: Callable[[web.Request], Caller]) -> None:
        self.store, self.max_upload, self.ended, self.caller = store, max_upload, ended, caller

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/files", self.create_file), web.get("/v1/files", self.list_files),
                web.get("/v1/files/{id}", self.get_file), web.get("/v1/files/{id}/content", self.file_content),
                web.delete("/v1/files/{id}", self.delete_file)]

    async def create_file(self, request: web.Request) -> web.Response:
        owner = self.caller(request).owner
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "Send the file as multipart/form-data with the fields 'purpose' and 'file'.")
        if (request.content_length or 0) > self.max_upload + (1 << 16):
            raise _too_large(self.max_upload)
        purpose, filename, upload = None, "upload.jsonl", None
        try:
            try:
                reader = await request.multipart()
                while (part := await reader.next()) is not None:
                    if not isinstance(part, BodyPartReader):
                        raise ApiError(400, "Nested multipart bodies are not supported.")
                    if part.name == "file" and upload is None:
                        upload, filename = Upload(self.store, self.max_upload), part.filename or filename
                        while chunk := await part.read_chunk(1 << 16):
                            if not upload.write(chunk):
                                raise _too_large(self.max_upload)
                    elif part.name == "purpose":
                        purpose = (await _small(part)).decode("utf-8", "replace").strip()
                    else:
                        await _small(part)  # fields we ignore (expires_after[...])
            except ValueError as e:  # a malformed multipart body
                raise ApiError(400, f"Malformed multipart body: {e}") from None
            except (ConnectionError, HttpProcessingError):
                raise ApiError(400, "The upload was cut short.") from None
            if upload is None:
                raise ApiError(400, "Missing required parameter: 'file'.", param="file")
            if purpose != "batch":
                raise ApiError(400, f"Invalid value for 'purpose': {purpose!r}; this server accepts 'batch' only.",
                               param="purpose", code="invalid_value")
            obj = upload.commit(filename, purpose, owner)
            upload = None
            return json_response(obj)
        finally:
            if upload is not None:
                upload.discard()

    async def list_files(self, request: web.Request) -> web.Response:
        q = request.query
        purpose, caller = q.get("purpose"), self.caller(request)
        rows = [f.obj for f in self.store.all()
                if caller.owns(f.owner) and (purpose is None or f.obj["purpose"] == purpose)]
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, "Invalid value for 'order': use 'asc' or 'desc'.", param="order")
        rows.sort(key=lambda f: (f["created_at"], f["id"]), reverse=order == "desc")
        return json_response(page(rows, q, default=10_000, most=10_000))

    def _file(self, request: web.Request) -> dict[str, Any]:
        fid = request.match_info["id"]
        f = self.store.get(fid)
        if f is None or not self.caller(request).owns(f.owner):  # another owner's: as if missing
            raise ApiError(404, f"No such File object: {fid}", "not_found_error", param="id")
        return f.obj

    async def get_file(self, request: web.Request) -> web.Response:
        return json_response(self._file(request))

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        obj = self._file(request)
        return web.FileResponse(self.store.data_path(obj["id"]), headers={"Content-Type": "application/octet-stream"})

    async def delete_file(self, request: web.Request) -> web.Response:
        fid, caller = self._file(request)["id"], self.caller(request)
        for link in self.store.links():
            if link["input_file_id"] == fid and not self.ended(link["id"]):
                # A batch the --api-key key made from this file is not the caller's to name.
                which = f"batch {link['id']}" if caller.owns(link.get("owner")) else "a batch"
                raise ApiError(400, f"File {fid} is the input of {which}, which has not ended; "
                               "delete it once the batch ends (or cancel the batch).", param="file_id")
        self.store.delete(fid)
        return json_response({"id": fid, "object": "file", "deleted": True})


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"File too large: the limit is {limit:,} bytes (--max-upload).", param="file",
                    code="file_too_large")


async def _small(part: BodyPartReader, limit: int = 1 << 16) -> bytes:
    """A form field's value, read in bounded chunks."""
    data = b""
    while chunk := await part.read_chunk(1 << 12):
        data += chunk
        if len(data) > limit:
            raise ApiError(400, f"Form field {part.name!r} is too long.", param=part.name)
    return data
