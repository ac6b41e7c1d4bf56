"""A local fake of the Hugging Face Hub's endpoints that the GPU engines call through huggingface_hub's real
client (point HF_ENDPOINT at it): Jobs (create, inspect, list with label filters, logs and metrics as
server-sent events, cancel, the hardware list with prices), whoami, model info (any model id, with a
configurable parameter count) and auth-check, and buckets (create, info). Any token is accepted; none is 401.

A "Job" runs its command here as a process: `vllm` is found on PATH (`bin_dir` first: the stand-in of
hfbatch/testing/vllm.py), a bucket volume is a folder `<storage>/<bucket id>/<path>` (the same folder the
engine's local bucket seam writes: HFBATCH_BUCKETS_DIR), and an argument under the volume's mount path is
rewritten to that folder. Its secrets and environment are its process's environment (nothing else of this
process's environment but PATH and HOME), plus `job_env` (the stand-in's knobs, set by tests).

    hfbatch fake-hub --port 8766 --storage DIR [--bin-dir DIR] [--params MODEL=N ...]
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from .threaded import OnAThread, listen

# (name, pretty name, GPU model, count, VRAM, USD per hour): the prices of hub-docs' jobs-pricing page.
HARDWARE = [
    ("cpu-basic", "CPU Basic", None, 0, "", 0.01), ("cpu-upgrade", "CPU Upgrade", None, 0, "", 0.03),
    ("t4-small", "Nvidia T4 - small", "T4", 1, "16 GB", 0.40),
    ("t4-medium", "Nvidia T4 - medium", "T4", 1, "16 GB", 0.60),
    ("l4x1", "1x Nvidia L4", "L4", 1, "24 GB", 0.80), ("l4x4", "4x Nvidia L4", "L4", 4, "96 GB", 3.80),
    ("a10g-small", "Nvidia A10G - small", "A10G", 1, "24 GB", 1.00),
    ("a10g-large", "Nvidia A10G - large", "A10G", 1, "24 GB", 1.50),
    ("a10g-largex2", "2x Nvidia A10G - large", "A10G", 2, "48 GB", 3.00),
    ("a10g-largex4", "4x Nvidia A10G - large", "A10G", 4, "96 GB", 5.00),
    ("l40sx1", "1x Nvidia L40S", "L40S", 1, "48 GB", 1.80), ("l40sx4", "4x Nvidia L40S", "L40S", 4, "192 GB", 8.30),
    ("l40sx8", "8x Nvidia L40S", "L40S", 8, "384 GB", 23.50),
    ("a100-large", "Nvidia A100 - large", "A100", 1, "80 GB", 2.50),
    ("a100x4", "4x Nvidia A100", "A100", 4, "320 GB", 10.0), ("a100x8", "8x Nvidia A100", "A100", 8, "640 GB", 20.0),
    ("h200", "Nvidia H200", "H200", 1, "141 GB", 5.0), ("h200x2", "2x Nvidia H200", "H200", 2, "282 GB", 10.0),
    ("h200x4", "4x Nvidia H200", "H200", 4, "564 GB", 20.0), ("h200x8", "8x Nvidia H200", "H200", 8, "1128 GB", 40.0),
    ("rtx-pro-6000", "Nvidia RTX PRO 6000", "RTX PRO 6000", 1, "96 GB", 2.75),
]
# Sizes of the sample files' models (safetensors dtype -> count), so that the demo's fit and estimates are real.
KNOWN_MODELS: dict[str, dict[str, int]] = {
    "meta-llama/Llama-3.1-8B-Instruct": {"BF16": 8_030_261_248},
    "openai/gpt-oss-120b": {"BF16": 1_800_000_000, "U8": 59_000_000_000},
    "Qwen/Qwen3-Embedding-0.6B": {"BF16": 595_776_512},
}
TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class FakeHubConfig:
    user: str = "test-user"
    storage: str = ""  # the buckets' folder (default: a temporary one)
    bin_dir: str = ""  # put first on the Jobs' PATH (the stand-in vllm)
    default_params: int = 1_000_000_000  # a model's parameters when neither `params` nor KNOWN_MODELS say
    params: dict[str, int] = field(default_factory=dict)
    gated: dict[str, bool] = field(default_factory=dict)  # model -> this token has access
    schedule_seconds: float = 0.0  # how long a Job stays SCHEDULING
    metrics_interval: float = 0.5
    job_env: dict[str, str] = field(default_factory=dict)  # the stand-in's knobs, in every Job's environment


@dataclass
class FakeJob:
    id: str
    namespace: str
    spec: dict[str, Any]
    created: float
    stage: str = "SCHEDULING"
    message: str | None = None
    started: float | None = None
    finished: float | None = None
    proc: asyncio.subprocess.Process | None = None
    logs: list[tuple[float, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    def info(self, endpoint: str) -> dict[str, Any]:
        spec = self.spec
        now = self.finished or time.time()
        running = None if self.started is None else round(now - self.started, 3)
        return {
            "id": self.id, "createdAt": _iso(self.created), "startedAt": _iso(self.started),
            "finishedAt": _iso(self.finished), "dockerImage": spec.get("dockerImage"), "spaceId": spec.get("spaceId"),
            "command": spec.get("command"), "arguments": spec.get("arguments"), "environment": spec.get("environment"),
            "secrets": dict.fromkeys(spec.get("secrets") or {}),  # names only, as the Hub shows them
            "flavor": spec.get("flavor"), "labels": spec.get("labels"), "volumes": spec.get("volumes"),
            "timeoutSeconds": spec.get("timeoutSeconds"),
            "status": {"stage": self.stage, "message": self.message},
            "durations": {"schedulingSecs": int((self.started or now) - self.created), "runningSecs": running,
                          "totalSecs": int(now - self.created)},
            "owner": {"id": hashlib.sha1(self.namespace.encode()).hexdigest()[:24], "name": self.namespace,
                      "type": "user"},
        }


class FakeHub:
    def __init__(self, config: FakeHubConfig | None = None) -> None:
        self.config = config or FakeHubConfig()
        if not self.config.storage:
            import tempfile

            self.config.storage = tempfile.mkdtemp(prefix="hfbatch-fake-hub-")
        self.jobs: dict[str, FakeJob] = {}
        self.buckets: dict[str, dict[str, Any]] = {}
        self.calls: dict[str, int] = {}
        self.specs: list[dict[str, Any]] = []  # every Job spec received (secrets' values replaced)
        self.secrets_seen: list[dict[str, str]] = []  # the secrets as received (for tests' own checks)
        self.endpoint = ""
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._n = 0

    # -- server --------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        add = app.router.add_route
        add("GET", "/api/whoami-v2", self._whoami)
        add("GET", "/api/jobs/hardware", self._hardware)
        add("POST", "/api/jobs/{ns}", self._create)
        add("GET", "/api/jobs/{ns}", self._list)
        add("GET", "/api/jobs/{ns}/{id}", self._inspect)
        add("GET", "/api/jobs/{ns}/{id}/logs", self._logs)
        add("GET", "/api/jobs/{ns}/{id}/metrics", self._metrics)
        add("POST", "/api/jobs/{ns}/{id}/cancel", self._cancel)
        for path in ("{org}/{name}", "{org}/{name}/revision/{rev}"):
            add("GET", "/api/models/" + path, self._model)
        add("GET", "/api/models/{org}/{name}/auth-check", self._auth_check)
        add("POST", "/api/buckets/{ns}/{name}", self._create_bucket)
        add("GET", "/api/buckets/{ns}/{name}", self._bucket_info)
        add("GET", "/__stats", self._stats)
        add("POST", "/__config", self._set_config)
        add("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._runner, bound = await listen(self.app(), host, port)
        self.endpoint = f"http://{host}:{bound}"
        return bound

    async def stop(self) -> None:
        for job in self.jobs.values():
            if job.proc is not None and job.proc.returncode is None:
                _kill(job.proc)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json",
                            headers=headers)

    def _auth(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("authorization", "")
        if not (auth[:7].lower() == "bearer " and auth[7:].strip()):
            return self._json({"error": "Invalid credentials in Authorization header"}, 401)
        return None

    # -- who, what hardware, which model --------------------------------------------------------------

    async def _whoami(self, request: web.Request) -> web.Response:
        self._count("whoami")
        if (refused := self._auth(request)) is not None:
            return refused
        return self._json({"type": "user", "id": "1" * 24, "name": self.config.user, "fullname": "Test User",
                           "orgs": [], "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    async def _hardware(self, request: web.Request) -> web.Response:
        self._count("hardware")
        out = []
        for name, pretty, gpu, n, vram, usd_h in HARDWARE:
            per_min = usd_h / 60
            item: dict[str, Any] = {"name": name, "prettyName": pretty, "cpu": "8 vCPU", "ram": "30 GB",
                                    "ephemeralStorage": "100 GB", "unitCostMicroUSD": round(per_min * 1e6),
                                    "unitCostUSD": per_min, "unitLabel": "minute"}
            if gpu:
                item["accelerator"] = {"type": "gpu", "model": gpu, "quantity": str(n), "vram": vram,
                                       "manufacturer": "Nvidia"}
            out.append(item)
        return self._json(out)

    def _param_counts(self, repo: str) -> dict[str, int]:
        if repo in self.config.params:
            return {"BF16": int(self.config.params[repo])}
        return dict(KNOWN_MODELS.get(repo) or {"BF16": self.config.default_params})

    async def _model(self, request: web.Request) -> web.Response:
        self._count("model_info")
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo.rpartition("/")[2].startswith("NonExist"):
            return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
        counts = self._param_counts(repo)
        return self._json({"_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
                           "private": False, "gated": "manual" if repo in self.config.gated else False,
                           "sha": hashlib.sha1(repo.encode()).hexdigest(), "pipeline_tag": "text-generation",
                           "tags": [], "safetensors": {"parameters": counts, "total": sum(counts.values())}})

    async def _auth_check(self, request: web.Request) -> web.Response:
        self._count("auth_check")
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if self.config.gated.get(repo) is False:
            return self._json({"error": f"Access to model {repo} is restricted. You must have access to it and "
                                        "be authenticated to access it. Please log in."}, 403,
                              {"X-Error-Code": "GatedRepo"})
        return self._json({"ok": True})

    # -- buckets --------------------------------------------------------------------------------------

    async def _create_bucket(self, request: web.Request) -> web.Response:
        self._count("create_bucket")
        if (refused := self._auth(request)) is not None:
            return refused
        bid = f"{request.match_info['ns']}/{request.match_info['name']}"
        body = orjson.loads(await request.read() or b"{}")
        if bid in self.buckets:  # huggingface_hub reads the url of a 409 too (create_bucket(exist_ok=True))
            return self._json({"error": "You already created this bucket", "url": f"{self.endpoint}/buckets/{bid}"},
                              409)
        self.buckets[bid] = {"id": bid, "private": body.get("visibility") == "private",
                             "createdAt": _iso(time.time()), "size": 0, "totalFiles": 0}
        (Path(self.config.storage) / bid).mkdir(parents=True, exist_ok=True)
        return self._json({"url": f"{self.endpoint}/buckets/{bid}", "name": bid, "id": bid})

    async def _bucket_info(self, request: web.Request) -> web.Response:
        self._count("bucket_info")
        bid = f"{request.match_info['ns']}/{request.match_info['name']}"
        if bid not in self.buckets:
            return self._json({"error": "Bucket not found"}, 404, {"X-Error-Code": "RepoNotFound"})
        return self._json(self.buckets[bid])

    # -- Jobs -----------------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        self._count("run_job")
        if (refused := self._auth(request)) is not None:
            return refused
        spec = orjson.loads(await request.read())
        for key in ("command", "flavor", "dockerImage"):
            if key not in spec and not (key == "dockerImage" and "spaceId" in spec):
                return self._json({"error": f"'{key}' is required"}, 400)
        if spec["flavor"] not in {h[0] for h in HARDWARE}:
            return self._json({"error": f"Unknown flavor {spec['flavor']}"}, 400)
        self._n += 1
        job = FakeJob(id=hashlib.sha1(f"{self._n}{time.time()}".encode()).hexdigest()[:24],
                      namespace=request.match_info["ns"], spec=spec, created=time.time())
        self.jobs[job.id] = job
        self.specs.append({**spec, "secrets": dict.fromkeys(spec.get("secrets") or {}, "<secret>")})
        self.secrets_seen.append(dict(spec.get("secrets") or {}))
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return self._json(job.info(self.endpoint))

    def _job(self, request: web.Request) -> FakeJob | None:
        job = self.jobs.get(request.match_info["id"])
        return job if job is not None and job.namespace == request.match_info["ns"] else None

    async def _inspect(self, request: web.Request) -> web.Response:
        self._count("inspect_job")
        if (refused := self._auth(request)) is not None:
            return refused
        job = self._job(request)
        if job is None:
            return self._json({"error": "Job not found"}, 404)
        return self._json(job.info(self.endpoint))

    async def _list(self, request: web.Request) -> web.Response:
        self._count("list_jobs")
        if (refused := self._auth(request)) is not None:
            return refused
        ns = request.match_info["ns"]
        stages = request.query.getall("stage", [])
        labels = [lb.split("=", 1) for lb in request.query.getall("label", [])]
        out = [j.info(self.endpoint) for j in self.jobs.values() if j.namespace == ns
               and (not stages or j.stage in stages)
               and all((j.spec.get("labels") or {}).get(k) == v for k, v in labels)]
        return self._json(out)

    async def _cancel(self, request: web.Request) -> web.Response:
        self._count("cancel_job")
        if (refused := self._auth(request)) is not None:
            return refused
        job = self._job(request)
        if job is None:
            return self._json({"error": "Job not found"}, 404)
        if job.stage not in TERMINAL:
            job.cancelled = True
            if job.proc is not None and job.proc.returncode is None:
                _kill(job.proc)
            else:
                self._end(job, "CANCELED", None)
        return self._json({})

    def _end(self, job: FakeJob, stage: str, message: str | None) -> None:
        if job.stage in TERMINAL:
            return
        job.stage, job.message, job.finished = stage, message, time.time()
        job.changed.set()

    def _log(self, job: FakeJob, text: str) -> None:
        job.logs.append((time.time(), text))
        job.changed.set()

    async def _run(self, job: FakeJob) -> None:
        """SCHEDULING for a while, then RUNNING: the command as a local process; then its stage."""
        cfg, spec = self.config, job.spec
        if cfg.schedule_seconds:
            await asyncio.sleep(cfg.schedule_seconds)
        if job.cancelled:
            self._end(job, "CANCELED", None)
            return
        argv = list(spec.get("command") or []) + list(spec.get("arguments") or [])
        for vol in spec.get("volumes") or []:
            if vol.get("type") != "bucket":
                continue
            local = Path(cfg.storage) / vol["source"] / (vol.get("path") or "")
            local.mkdir(parents=True, exist_ok=True)
            mount = vol["mountPath"].rstrip("/")
            argv = [str(local) + a[len(mount):] if a == mount or a.startswith(mount + "/") else a for a in argv]
        env = {"PATH": os.pathsep.join(p for p in (cfg.bin_dir, os.environ.get("PATH", "")) if p),
               "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8", **(spec.get("environment") or {}),
               **(spec.get("secrets") or {}), **cfg.job_env}
        job.stage, job.started = "RUNNING", time.time()
        job.changed.set()
        self._log(job, "===== Job started at " + (_iso(job.started) or "") + " =====")
        try:
            proc = job.proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            self._log(job, f"exec {argv[0] if argv else ''}: {e.strerror or e}")
            self._end(job, "ERROR", "the container's command could not start")
            return
        timeout = spec.get("timeoutSeconds")
        try:
            await asyncio.wait_for(self._pump(job, proc), timeout)
        except TimeoutError:
            _kill(proc)
            await proc.wait()
            self._end(job, "ERROR", f"Job timeout after {timeout} seconds")
            return
        code = await proc.wait()
        if job.cancelled:
            self._end(job, "CANCELED", None)
        elif code == 0:
            self._end(job, "COMPLETED", None)
        else:
            self._end(job, "ERROR", f"Job failed with exit code: {code}")

    async def _pump(self, job: FakeJob, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            self._log(job, line.decode("utf-8", "replace").rstrip("\n"))
        await proc.wait()

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events `data: {"timestamp", "data"}`: what was logged, then what comes, until the Job ends."""
        self._count("logs")
        if (refused := self._auth(request)) is not None:
            return refused
        job = self._job(request)
        if job is None:
            return self._json({"error": "Job not found"}, 404)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        tail = request.query.get("tail")
        sent = max(0, len(job.logs) - int(tail)) if tail and tail.isdigit() else 0
        idle = 0.0
        while True:
            job.changed.clear()
            while sent < len(job.logs):
                ts, text = job.logs[sent]
                sent += 1
                await resp.write(b"data: " + orjson.dumps({"timestamp": _iso(ts), "data": text}) + b"\n\n")
            if job.stage in TERMINAL:
                break
            try:  # a short wait: another stream of the same Job may clear the event first
                await asyncio.wait_for(job.changed.wait(), 0.25)
            except TimeoutError:
                idle += 0.25
                if idle >= 15:
                    idle = 0.0
                    await resp.write(b": keep-alive\n\n")
        await resp.write_eof()
        return resp

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        """Server-sent `event: metric` samples while the Job runs (406 once it has ended)."""
        self._count("metrics")
        if (refused := self._auth(request)) is not None:
            return refused
        job = self._job(request)
        if job is None:
            return self._json({"error": "Job not found"}, 404)
        if job.stage in TERMINAL:
            return self._json({"error": "Job is not running"}, 406)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = 0
        while job.stage not in TERMINAL:
            if job.stage == "RUNNING":
                n += 1
                sample = {"cpu_usage_pct": 12, "cpu_millicores": 8000, "memory_used_bytes": 3 << 30,
                          "memory_total_bytes": 30 << 30, "rx_bps": 0, "tx_bps": 0, "replica": "fake0",
                          "gpus": {"fakegpu0": {"utilization": 60 + n % 30, "memory_used_bytes": 18_000_000_000,
                                                "memory_total_bytes": 22_836_000_000}}}
                await resp.write(b"event: metric\ndata: " + orjson.dumps(sample) + b"\n\n")
            await asyncio.sleep(self.config.metrics_interval)
        await resp.write_eof()
        return resp

    # -- control --------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "specs": [dict(s) for s in self.specs],
                "jobs": {j.id: {"stage": j.stage, "message": j.message, "labels": j.spec.get("labels"),
                                "flavor": j.spec.get("flavor")} for j in self.jobs.values()},
                "buckets": dict(self.buckets), "storage": self.config.storage}

    async def _stats(self, request: web.Request) -> web.Response:
        return self._json(self.snapshot())

    async def _set_config(self, request: web.Request) -> web.Response:
        values = orjson.loads(await request.read())
        names = {f.name for f in dataclasses.fields(FakeHubConfig)}
        if not isinstance(values, dict) or not set(values) <= names:
            return self._json({"error": f"bad config: use {sorted(names)}"}, 400)
        for k, v in values.items():
            setattr(self.config, k, v)
        return self._json(dataclasses.asdict(self.config))

    async def _not_found(self, request: web.Request) -> web.Response:
        return self._json({"error": f"no route for {request.method} {request.path}"}, 404)


def _kill(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class ThreadedFakeHub(OnAThread):
    """A FakeHub served from a daemon thread with its own event loop (for synchronous tests)."""

    def __init__(self, config: FakeHubConfig | None = None) -> None:
        self.hub = FakeHub(config)
        super().__init__(self.hub, "fake-hub")

    @property
    def config(self) -> FakeHubConfig:
        return self.hub.config

    def stats(self) -> dict[str, Any]:
        return dict(self.call(self.hub.snapshot))


def serve(port: int, host: str = "127.0.0.1", config: FakeHubConfig | None = None) -> None:
    """Blocking: run until SIGINT/SIGTERM; print 'fake hub listening on http://HOST:PORT' on stderr."""

    async def run() -> None:
        hub, stop, loop = FakeHub(config), asyncio.Event(), asyncio.get_running_loop()
        bound = await hub.start(host, port)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"fake hub listening on http://{host}:{bound} (buckets in {hub.config.storage})", file=sys.stderr,
              flush=True)
        try:
            await stop.wait()
        finally:
            await hub.stop()

    asyncio.run(run())
