"""Serve stage (`hfbatch serve`): OpenAI Files + Batches HTTP API -> batches run by the engine in this process.

Code written for OpenAI's Batch API runs here by changing only `base_url`. Uploads land in the
file store (files.py); each batch is an asyncio task running a BatchRun (the lifecycle, engine,
limits and registry of `hfbatch submit`, so `hfbatch list` shows them); answers read the
registry's live batch.json and rewrite local paths to file ids.

Auth. Without --api-key the client's API key is the Hugging Face token, passed through to the
router for the batches it creates; the server then binds loopback only. With --api-key every
request must present that key (hmac.compare_digest) and batches run on the server's own token.
A token is never logged nor written to any file: a client's token lives only in the memory of
its batch's task. So after a restart, unfinished batches resume with the server's own token
(--token, $HF_TOKEN, the saved login) when it has one; without one they stay interrupted until
the server is restarted with a token (or `hfbatch resume ID --token ...`), and can be cancelled.
A server stop (SIGINT/SIGTERM) cancels running batches at once, as a crash would: lines already
written are kept and the rest are sent after the restart.

Ownership (owners.py). Without --api-key every File and batch belongs to the token that created
it (a salted HMAC of the token is stored, never the token); a batch's output and error files
belong to the batch's owner, also when another server run finishes it. Every route checks it:
lists show only the caller's objects, and another token's file or batch answers like a missing
id (404; POST /v1/batches: the 400 of a missing input file), as OpenAI does across projects. With
--api-key the key owns everything in the store: objects of any owner, and objects stored before
owners were recorded (which no pass-through token sees); what it creates, no pass-through token
sees after a switch back. Resumed batches keep their owner.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from ..batches.control import live_batch, request_cancel
from ..batches.registry import BatchDir, NewerSchema, Registry
from ..batches.run import BatchRun, RunIO
from ..config import WINDOW_RANGE, RunConfig, parse_duration, parse_size, parse_window, resolve_token
from ..engines.http import first_limit
from ..errors import HfbatchError, UsageError
from ..limits import Capacity
from ..models import TERMINAL_STATUSES, BatchStatus, RunState
from ..summary import BatchInfo, Stats, batch_object
from ..validate import endpoints_hint, is_batch_endpoint, normalize_url
from .files import (
    BATCH_ID_RE,
    OWNER_SALT,
    ApiError,
    FilesApi,
    FileStore,
    json_response,
    new_batch_id,
    new_file_id,
    page,
)
from .owners import API_KEY_OWNER, Caller, Owners

GRACE_SECONDS = 10.0  # RunConfig.grace's default: in-flight requests' time to finish at shutdown
log = logging.getLogger("hfbatch.serve")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Auth:
    """An authenticated request: who it comes from, and the token its batches run on."""

    caller: Caller
    token: str | None = field(repr=False)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8787
    base_url: str | None = None
    max_upload: str = "200MB"
    concurrency: int = 32
    api_key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)  # --token (a flag; resolved at start)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BatchServer:
    def __init__(self, opts: ServeOptions, token: str | None, max_upload: int) -> None:
        self.opts, self.token, self.max_upload = opts, token, max_upload
        self.store, self.reg = FileStore(), Registry()
        self.owners = Owners(self.store.links_dir / OWNER_SALT)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.failures: dict[str, str] = {}  # batch id -> why its task ended without registering it
        self.registered: dict[str, asyncio.Event] = {}  # batch id -> set once its task registered it
        self.shutdown = asyncio.Event()  # set when the server stops: batches stop like on SIGTERM
        # -c is server-wide: every batch takes its slots from one gate (round-robin between batches),
        # and a provider's learned limit is shared by the batches that use it.
        self.capacity = Capacity(opts.concurrency, adapt=True, start=first_limit(opts.concurrency, opts.base_url))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.add_routes([
            *FilesApi(self.store, self.max_upload, lambda bid: self._status(bid) in TERMINAL_STATUSES,
                      lambda request: self._authenticate(request).caller).routes(),
            web.post("/v1/batches", self.create_batch), web.get("/v1/batches", self.list_batches),
            web.get("/v1/batches/{id}", self.get_batch), web.post("/v1/batches/{id}/cancel", self.cancel_batch),
        ])
        return app

    # ------------------------------------------------------------------ auth and errors

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            self._authenticate(request)
            return await handler(request)
        except ApiError as e:
            return e.response()
        except NewerSchema as e:  # a batch written by a newer hfbatch: this server cannot read it
            log.warning("%s %s: %s", request.method, request.path, e)
            return ApiError(500, str(e), "server_error").response()
        except web.HTTPException as e:
            if e.status == 404:
                return ApiError(404, f"Invalid URL ({request.method} {request.path})", "not_found_error").response()
            return ApiError(e.status, e.reason).response()
        except Exception as e:  # noqa: BLE001 - one line on stderr, an OpenAI-shaped 500 to the client
            log.error("%s %s: internal error: %s", request.method, request.path, type(e).__name__, exc_info=e)
            return ApiError(500, "The server had an error processing your request.", "server_error").response()

    def _authenticate(self, request: web.Request) -> Auth:
        """Who the request comes from and the token its batches run on; 401 unless it carries a valid key."""
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           "authentication_error", code="invalid_api_key")
        if self.opts.api_key is None:  # pass-through: the client's key is its Hugging Face token
            return Auth(Caller(self.owners.of(key)), key)
        if not hmac.compare_digest(key.encode(), self.opts.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", "authentication_error", code="invalid_api_key")
        return Auth(Caller(API_KEY_OWNER, sees_all=True), self.token)

    # ------------------------------------------------------------------ batches

    async def create_batch(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            raise ApiError(400, "The body must be a JSON object.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object.")
        auth = self._authenticate(request)
        fid = body.get("input_file_id")
        f = self.store.get(fid) if isinstance(fid, str) else None
        if f is None or not auth.caller.owns(f.owner) or f.obj["purpose"] != "batch":  # another's: as missing
            raise ApiError(400, f"Invalid 'input_file_id': {fid!r} is not a file uploaded with purpose 'batch'.",
                           param="input_file_id", code="invalid_value")
        endpoint = self._endpoint(body.get("endpoint"))
        window = body.get("completion_window")
        try:
            if not isinstance(window, str) or window != window.strip().lower():
                raise UsageError("not spelled as OpenAI does")  # " 24h", "24H": OpenAI takes "24h" only
            parse_window(window)
        except UsageError:
            raise ApiError(400, f"Invalid 'completion_window': {window!r}; use 24h, or a duration {WINDOW_RANGE}.",
                           param="completion_window", code="invalid_value") from None
        assert isinstance(window, str)
        metadata = _metadata(body.get("metadata"))
        link: dict[str, Any] = {
            "id": new_batch_id(), "input_file_id": fid, "output_file_id": new_file_id(),
            "error_file_id": new_file_id(), "endpoint": endpoint, "completion_window": window,
            "metadata": metadata, "created_at": int(time.time()), "created_ns": time.time_ns(),
            "owner": auth.caller.owner,
        }
        self.store.save_link(link)
        self._start(link["id"], self._new_config(link, auth.token))
        return json_response(self._fresh(link))

    def _endpoint(self, value: Any) -> str:
        url = normalize_url(value) if isinstance(value, str) else ""
        if not is_batch_endpoint(url, pass_through=self.opts.base_url is not None):
            raise ApiError(400, f"Invalid 'endpoint': {value!r}; {endpoints_hint(self.opts.base_url is not None)}.",
                           param="endpoint", code="invalid_value")
        return url

    async def get_batch(self, request: web.Request) -> web.Response:
        return json_response(self._render(self._link(request)))

    async def list_batches(self, request: web.Request) -> web.Response:
        caller = self._authenticate(request).caller
        rows = [link for link in self.store.links() if caller.owns(link.get("owner"))]
        answer = page(rows, request.query, default=20, most=100)
        answer["data"] = [self._render(link) for link in answer["data"]]
        return json_response(answer)

    async def cancel_batch(self, request: web.Request) -> web.Response:
        link = self._link(request)
        bid = link["id"]
        task, registered = self.tasks.get(bid), self.registered.get(bid)
        if task is not None and registered is not None and not registered.is_set():
            # A batch created a moment ago: its task registers it at its first step (or fails first).
            waiter = asyncio.ensure_future(registered.wait())
            await asyncio.wait((waiter, task), return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        b = self.reg.get(bid)
        if b is None:
            raise ApiError(409, f"Batch {bid} cannot be cancelled: it never started ({self.failures.get(bid)}).")
        status = live_batch(b)["status"]
        if status in TERMINAL_STATUSES and status != BatchStatus.CANCELLED:
            raise ApiError(409, f"Cannot cancel a batch with status '{status}'.")
        try:
            _, finish_here = request_cancel(bid)
        except UsageError:  # it ended a moment ago
            raise ApiError(409, f"Cannot cancel a batch with status '{live_batch(b)['status']}'.") from None
        if status != BatchStatus.CANCELLED and (finish_here or (bid not in self.tasks and not b.running())):
            # Nothing runs it: resume it here; the engine sees the cancel file and closes it out (sends nothing).
            self._start(bid, self._resume_config(b, self._authenticate(request).token))
        answer = self._render(link)
        if answer["status"] not in TERMINAL_STATUSES:
            answer["status"] = "cancelling"
            answer["cancelling_at"] = answer.get("cancelling_at") or int(time.time())
        return json_response(answer)

    def _link(self, request: web.Request) -> dict[str, Any]:
        bid = request.match_info["id"]
        link = self.store.link(bid) if BATCH_ID_RE.match(bid) else None
        if link is None or not self._authenticate(request).caller.owns(link.get("owner")):  # as if missing
            raise ApiError(404, f"No batch found with id '{bid}'.", "not_found_error", param="batch_id")
        return link

    def _status(self, bid: str) -> str:
        b = self.reg.get(bid)
        if b is None:
            return "failed" if bid in self.failures and bid not in self.tasks else "validating"
        try:
            return str(live_batch(b)["status"])
        except (OSError, ValueError, KeyError):
            return "validating"

    def _fresh(self, link: dict[str, Any], failed: str | None = None) -> dict[str, Any]:
        """The Batch object of a batch not registered yet (validating), or that could not be (failed)."""
        info = BatchInfo(id=link["id"], input_file_id=link["input_file_id"], created_at=link["created_at"],
                         completion_window=link["completion_window"], metadata=link["metadata"])
        if failed is not None:
            info.set_status(BatchStatus.FAILED)
            info.state = RunState.FAILED
        batch = batch_object(info, Stats(), parse_duration(link["completion_window"], "completion_window"))
        if failed is not None:
            batch["errors"] = {"object": "list", "data": [
                {"code": "server_error", "line": None, "param": None, "message": failed}]}
        batch["endpoint"] = link["endpoint"]
        return batch

    def _render(self, link: dict[str, Any]) -> dict[str, Any]:
        """The registry's live Batch object with file ids in place of local paths."""
        bid = link["id"]
        b = self.reg.get(bid)
        try:
            batch = live_batch(b) if b is not None else None
        except (OSError, ValueError, KeyError):
            batch = None
        if batch is None:
            return self._fresh(link, None if bid in self.tasks else self.failures.get(bid))
        batch["input_file_id"], batch["endpoint"] = link["input_file_id"], link["endpoint"]
        ended = batch["status"] in TERMINAL_STATUSES
        for key, kind in (("output_file_id", "output"), ("error_file_id", "error")):
            if batch.get(key):
                batch[key] = link[key]
                if ended:
                    self.store.register_output(link[key], f"{bid}_{kind}.jsonl", link.get("owner"))
        hb = batch.get("hfbatch") or {}
        if not ended and hb.get("state") == RunState.RUNNING and bid not in self.tasks and b is not None \
                and not b.running():
            hb["state"] = RunState.INTERRUPTED  # its task in this process ended without finishing it
        return batch

    # ------------------------------------------------------------------ running batches

    def _new_config(self, link: dict[str, Any], token: str | None) -> RunConfig:
        store = self.store
        return RunConfig(
            input_path=str(store.data_path(link["input_file_id"])),
            output_path=store.create_empty(link["output_file_id"]),
            errors_path=store.create_empty(link["error_file_id"]),
            base_url=self.opts.base_url, concurrency=self.opts.concurrency, endpoint=link["endpoint"],
            completion_window=link["completion_window"], metadata=link["metadata"], new_batch_id=link["id"],
            quiet=True, token=token,
        )

    def _resume_config(self, b: BatchDir, token: str | None) -> RunConfig:
        return RunConfig.from_meta(b.meta(), quiet=True, token=token)

    def _start(self, bid: str, cfg: RunConfig) -> None:
        self.failures.pop(bid, None)
        self.registered[bid] = asyncio.Event()
        self.tasks[bid] = asyncio.get_running_loop().create_task(self._run(bid, cfg), name=f"hfbatch {bid}")

    async def _run(self, bid: str, cfg: RunConfig) -> None:
        registered = self.registered[bid]
        io = RunIO(shutdown=self.shutdown, capacity=self.capacity, on_registered=lambda _: registered.set())
        try:
            result = await BatchRun(cfg, io).execute()
            hb = result.batch.get("hfbatch") or {}
            if result.error is not None and hb.get("state") == RunState.INTERRUPTED:
                log.warning("batch %s stopped early (%s): %s", bid, hb.get("stop_reason"), result.error,
                            exc_info=result.error.__cause__)
        except (HfbatchError, OSError) as e:
            self.failures[bid] = str(e)
            log.warning("batch %s: %s", bid, e)
        except Exception as e:  # noqa: BLE001 - the server outlives one batch's bug
            self.failures[bid] = f"internal error: {type(e).__name__}"
            log.error("batch %s: internal error: %s: %s", bid, type(e).__name__, e, exc_info=e)
        finally:
            if self.tasks.get(bid) is asyncio.current_task():
                del self.tasks[bid]
                self.registered.pop(bid, None)

    def resume_all(self) -> tuple[int, int]:
        """At start: run again every unfinished batch this server created. Returns (resumed, left)."""
        self.store.clean_partial()
        resumed = left = 0
        can_run = self.token is not None or self.opts.base_url is not None
        for link in self.store.links():
            b = self.reg.get(link["id"])
            try:
                status = b.batch()["status"] if b is not None else "validating"
            except NewerSchema as e:
                log.warning("%s", e)  # not resumed by this (older) hfbatch
                continue
            except (OSError, ValueError, KeyError):
                status = "validating"
            if status in TERMINAL_STATUSES or (b is not None and b.running()):
                continue
            if not can_run:
                left += 1
                continue
            self._start(link["id"], self._resume_config(b, self.token) if b is not None
                        else self._new_config(link, self.token))
            resumed += 1
        return resumed, left


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (not isinstance(value, dict) or len(value) > 16
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                       for k, v in value.items())):
        raise ApiError(400, "Invalid 'metadata': up to 16 string keys (64 characters) with string values "
                       "(512 characters).", param="metadata", code="invalid_value")
    return dict(value)


class OneLineFormatter(logging.Formatter):
    """One line per event; the traceback too (exc_info) only with HFBATCH_DEBUG=1: debug means loud."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"hfbatch serve: {record.getMessage()}"
        if record.exc_info and os.environ.get("HFBATCH_DEBUG"):
            line += "\n" + self.formatException(record.exc_info)
        return line


def serve(opts: ServeOptions) -> None:
    """Check the options, then serve until SIGINT/SIGTERM."""
    if opts.api_key is None and not is_loopback(opts.host):
        raise UsageError(f"refusing to serve on {opts.host} without --api-key: anyone who can reach it could "
                         "run batches on your token. Bind 127.0.0.1, or set a key (--api-key or $HFBATCH_API_KEY)")
    if opts.api_key is not None and not opts.api_key.strip():
        raise UsageError("--api-key is empty")
    if opts.base_url is not None and not opts.base_url.startswith(("http://", "https://")):
        raise UsageError(f"--base-url {opts.base_url!r} must start with http:// or https://")
    max_upload = parse_size(opts.max_upload, "--max-upload")
    if opts.api_key is not None:
        token = resolve_token(opts.token, opts.base_url)  # batches run on it: required against the router
    else:
        try:
            token = resolve_token(opts.token, opts.base_url)  # only to resume batches after a restart
        except UsageError:
            token = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    for name in ("hfbatch.serve", "aiohttp", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.WARNING)
    asyncio.run(_main(BatchServer(opts, token, max_upload)))


async def _main(server: BatchServer) -> None:
    opts = server.opts
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, opts.host, opts.port).start()
    host, port = runner.addresses[0][:2]
    resumed, left = server.resume_all()
    mode = "--api-key, the server's token" if opts.api_key else "pass-through, the client's key is its HF token"
    note = f"; {left} unfinished batches wait for a server token" if left else ""
    print(f"hfbatch serve: listening on http://{f'[{host}]' if ':' in host else host}:{port}/v1 "
          f"(auth: {mode}; {resumed} batches resumed{note})", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    try:
        await stop.wait()
    finally:
        # Like SIGTERM for submit: dispatching stops, in-flight requests get the grace period, files
        # are flushed and the batches stay resumable (the next start resumes them).
        server.shutdown.set()
        if server.tasks:
            await asyncio.wait(list(server.tasks.values()), timeout=GRACE_SECONDS + 2)
        await runner.cleanup()
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        for t in others:  # every batch and its requests at once; lines written are kept (resumed later)
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
