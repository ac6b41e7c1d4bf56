"""A local fake of the Hugging Face Hub's files API (repos, trees, file bytes, commits) for tests of the data
commands: what huggingface_hub's HfFileSystem and HfApi call, over plain HTTP (run the client with
HF_HUB_DISABLE_XET=1; no entry carries a xetHash, so no client would take the Xet path anyway).

Served (for datasets, models and spaces alike):

    GET  /api/{type}s/{owner}/{name}[/revision/{rev}]           repo_info
    GET  /api/{type}s/{owner}/{name}/tree/{rev}[/{path}]        list_repo_tree (?recursive=, paged by Link)
    POST /api/{type}s/{owner}/{name}/paths-info/{rev}           get_paths_info (form: paths, expand)
    GET  /{type}s/{owner}/{name}/resolve/{rev}/{path}           file bytes, Range requests (HEAD too);
         /{owner}/{name}/resolve/...                            a model's
    POST /api/repos/create                                      create_repo (409 when it exists)
    POST /api/validate-yaml                                     a README's metadata (before a commit)
    POST /api/{type}s/{owner}/{name}/preupload/{rev}            every file "regular" (inline in the commit)
    POST /api/{type}s/{owner}/{name}/commit/{rev}               create_commit (NDJSON: header, file, deletedFile)

A private repo answers as the Hub does to a missing or wrong token (401, X-Error-Code: RepoNotFound); every
write needs the token. `routes()` returns the aiohttp routes alone, so another fake (the Jobs API of
fake_hub.py) can serve them from the same application.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from .threaded import OnAThread, listen

_TYPES = {"datasets": "dataset", "models": "model", "spaces": "space"}
_API_RE = re.compile(r"^/api/(datasets|models|spaces)/([^/]+)/([^/]+)(?:/(revision|tree|paths-info|preupload|commit)"
                     r"(?:/([^/]+))?(/.*)?)?$")
_RESOLVE_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
PAGE_SIZE = 1000  # the Hub's tree page (without expand)


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@dataclass
class Repo:
    """One repository: its files per branch (commits keep no history beyond the sha)."""

    repo_id: str
    repo_type: str = "dataset"
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    shas: dict[str, str] = field(default_factory=dict)  # branch -> its head commit

    def commit(self, branch: str) -> str:
        sha = _sha1(f"{self.repo_id}@{branch}:{time.monotonic_ns()}".encode())
        self.shas[branch] = sha
        return sha

    def files(self, revision: str) -> dict[str, bytes] | None:
        """The files at a branch name or a head commit sha."""
        if revision in self.branches:
            return self.branches[revision]
        for branch, sha in self.shas.items():
            if sha == revision:
                return self.branches[branch]
        return None

    def sha(self, revision: str) -> str:
        return self.shas.get(revision, revision)


class FakeHubFiles:
    """The repos and the handlers. Add repos with add_repo(); read back what was pushed with files()."""

    def __init__(self, token: str | None = None, user: str = "tester") -> None:
        self.token, self.user = token, user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.page_size = PAGE_SIZE
        self.url = ""
        self._runner: web.AppRunner | None = None

    # -------------------------------------------------------------- test API

    def add_repo(self, repo_id: str, files: dict[str, bytes | str], *, repo_type: str = "dataset",
                 private: bool = False, revision: str = "main") -> Repo:
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_id, repo_type, private))
        repo.private = private
        repo.branches[revision] = {p: c.encode() if isinstance(c, str) else c for p, c in files.items()}
        repo.commit(revision)
        return repo

    def files(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[(repo_type, repo_id)].branches[revision])

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        app = web.Application(client_max_size=1 << 30)
        app.add_routes(self.routes())
        self._runner, bound = await listen(app, host, port)
        self.url = f"http://{host}:{bound}"
        return bound

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def routes(self) -> list[web.RouteDef]:
        """Its routes only (no catch-all), so that another fake's routes (the Jobs API's /api/jobs/...) can be
        added to the same application."""
        h = self.handle
        return [web.route("*", f"/api/{kind}/{{tail:.*}}", h) for kind in _TYPES] + [
            web.post("/api/repos/create", h), web.post("/api/validate-yaml", h),
            *(web.route("*", f"/{kind}/{{owner}}/{{name}}/resolve/{{tail:.*}}", h) for kind in ("datasets", "spaces")),
            web.route("*", "/{owner}/{name}/resolve/{tail:.*}", h)]

    # -------------------------------------------------------------- HTTP

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        self.requests.append((request.method, path, request.headers.get("Range", "")))
        if path == "/api/repos/create" and request.method == "POST":
            return await self._create(request)
        if path == "/api/validate-yaml" and request.method == "POST":
            return await self._validate_yaml(request)
        if m := _API_RE.match(path):
            kind, owner, name, action, rev, rest = m.groups()
            repo_type, repo_id = _TYPES[kind], f"{unquote(owner)}/{unquote(name)}"
            revision = unquote(rev) if rev else "main"
            sub = unquote(rest[1:]) if rest else ""
            if action in ("preupload", "commit"):
                return await self._write(request, repo_type, repo_id, revision, action)
            repo, denied = self._readable(request, repo_type, repo_id)
            if denied is not None:
                return denied
            assert repo is not None
            files = repo.files(revision)
            if files is None:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if action in (None, "revision") and request.method == "GET":
                return self._info(repo, revision, files)
            if action == "tree" and request.method == "GET":
                return self._tree(request, repo, revision, files, sub)
            if action == "paths-info" and request.method == "POST":
                form = await request.post()
                paths = [str(p) for p in form.getall("paths", [])]
                return _json([_entry(p, files) for p in paths if _exists(p, files)])
        elif (m := _RESOLVE_RE.match(path)) and request.method in ("GET", "HEAD"):
            kind, owner, name, rev, file_path = m.groups()
            repo_type = {"datasets": "dataset", "spaces": "space"}.get(kind or "", "model")
            repo, denied = self._readable(request, repo_type, f"{unquote(owner)}/{unquote(name)}")
            if denied is not None:
                return denied
            assert repo is not None
            files = repo.files(unquote(rev))
            if files is None:
                return _error(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
            data = files.get(unquote(file_path))
            if data is None:
                return _error(404, "Entry not found", "EntryNotFound")
            return _bytes(request, data, repo.sha(unquote(rev)))
        return _error(404, f"no route for {request.method} {path}")

    def _authorized(self, request: web.Request) -> bool:
        return self.token is not None and request.headers.get("Authorization") == f"Bearer {self.token}"

    def _readable(self, request: web.Request, repo_type: str, repo_id: str) -> tuple[Repo | None, web.Response | None]:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized(request)):
            # The Hub does not tell a private repo from a missing one.
            status = 401 if "Authorization" not in request.headers else 404
            return None, _error(status, "Repository not found", "RepoNotFound")
        return repo, None

    def _info(self, repo: Repo, revision: str, files: dict[str, bytes]) -> web.Response:
        return _json({
            "_id": _sha1(repo.repo_id.encode())[:24], "id": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": repo.sha(revision), "private": repo.private, "gated": False, "disabled": False,
            "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": p} for p in sorted(files)],
        })

    def _tree(self, request: web.Request, repo: Repo, revision: str, files: dict[str, bytes],
              sub: str) -> web.Response:
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            return _error(404, f"Entry not found: {sub}", "EntryNotFound")
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        entries: dict[str, dict[str, Any]] = {}
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": _sha1(folder.encode()), "path": folder})
            if recursive or len(parts) == 1:
                entries[p] = _entry(p, files)
        listing = list(entries.values())
        start = int(request.query.get("cursor", "0"))
        page = listing[start:start + self.page_size]
        headers = {}
        if start + self.page_size < len(listing):
            query = dict(request.query, cursor=str(start + self.page_size))
            headers["Link"] = f'<{request.url.with_query(query)}>; rel="next"'
        return _json(page, headers=headers)

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "Invalid credentials in Authorization header")
        body = orjson.loads(await request.read())
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        url = f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return _json({"error": "You already created this repo", "url": url}, status=409)
        private = body.get("private") is True or body.get("visibility") == "private"
        repo = Repo(repo_id, repo_type, private)
        repo.commit("main")
        self.repos[(repo_type, repo_id)] = repo
        return _json({"url": url, "name": repo_id, "id": _sha1(repo_id.encode())[:24]})

    async def _validate_yaml(self, request: web.Request) -> web.Response:
        """A README's metadata (its YAML front matter) must parse to a mapping, as the Hub requires."""
        import yaml

        content = str(orjson.loads(await request.read()).get("content", ""))
        if not content.startswith("---"):
            return _json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            meta = yaml.safe_load(content.split("---", 2)[1])
        except (yaml.YAMLError, IndexError) as e:
            return _json({"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}, status=400)
        if not isinstance(meta, dict):
            return _json({"errors": [{"message": "the metadata must be a YAML mapping"}], "warnings": []}, status=400)
        return _json({"errors": [], "warnings": []})

    async def _write(self, request: web.Request, repo_type: str, repo_id: str, revision: str,
                     action: str) -> web.Response:
        repo = self.repos.get((repo_type, repo_id))
        if not self._authorized(request):
            return _error(401, "Invalid credentials in Authorization header")
        if repo is None:
            return _error(404, "Repository not found", "RepoNotFound")
        if action == "preupload":
            body = orjson.loads(await request.read())
            return _json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                    for f in body.get("files", [])]})
        files = dict(repo.branches.get(revision) or {})
        summary = ""
        for raw in (await request.read()).splitlines():
            if not raw.strip():
                continue
            item = orjson.loads(raw)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                return _error(400, f"unsupported commit operation {key!r} in this fake")
        repo.branches[revision] = files
        sha = repo.commit(revision)
        base = f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        return _json({"commitUrl": f"{base}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None,
                      "summary": summary})


def _exists(path: str, files: dict[str, bytes]) -> bool:
    return path in files or any(p.startswith(path.rstrip("/") + "/") for p in files)


def _entry(path: str, files: dict[str, bytes]) -> dict[str, Any]:
    if path in files:
        return {"type": "file", "oid": _sha1(files[path]), "size": len(files[path]), "path": path}
    return {"type": "directory", "oid": _sha1(path.encode()), "path": path}


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json", headers=headers)


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _json({"error": message}, status=status, headers=headers)


def _bytes(request: web.Request, data: bytes, sha: str) -> web.Response:
    headers = {"ETag": f'"{_sha1(data)}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
    status, body = 200, data
    if m := _RANGE_RE.match(request.headers.get("Range", "")):
        first, last = m.groups()
        if first == "":  # the last N bytes
            start, end = max(0, len(data) - int(last)), len(data) - 1
        else:
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        if start >= len(data):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        status, body = 206, data[start:end + 1]
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(body))
        return web.Response(status=status, headers=headers)
    return web.Response(status=status, body=body, headers=headers)


class ThreadedFakeHubFiles(OnAThread):
    """A FakeHubFiles served from a daemon thread with its own event loop (for synchronous tests):
    `with ThreadedFakeHubFiles(token) as hub: hub.url ...; hub.hub.add_repo(...)`."""

    def __init__(self, token: str | None = None) -> None:
        self.hub = FakeHubFiles(token)
        super().__init__(self.hub, "fake-hub-files")
