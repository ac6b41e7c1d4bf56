"""The Ray engine (`--engine ray`): one batch over a Ray cluster, with the same files and Batch object as on one
machine. `ray` is imported here only, and this module only for `--engine ray` (the `ray` extra).

The driver (this process, under BatchRun) splits the pending requests into shards (--shards) in the batch's folder
or under --ray-storage, starts one small actor holding the cluster-wide limits (ray_limits.LimitsBook) and one Ray
task per shard (ray_shard.shard_task: hfbatch's own engine over the shard, the shard's files its ledger), merges
the shards' lines into -o/-e as they are written (each custom_id once: ray_merge), shows one progress bar from the
workers' figures, and stops every worker on Ctrl-C, cancel or expiry (the book tells them on their next sync).

Ray's retries, chosen deliberately: a shard's task is retried only when its worker dies (max_retries=3,
retry_exceptions=False: a bug or a refusal would only repeat), and each retry resumes from the shard's files, so a
death re-sends at most what that shard had in flight. The actor is never restarted (max_restarts=0): a fresh book
would not know the slots workers hold; if it dies the run stops, resumable. A rerun of the same command merges what
an earlier run's shards wrote and shards only what still has no line (the earlier run's tasks died with its driver:
Ray ends a job's tasks and actors with it, and its book with them, which fences any straggler).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import signal
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import orjson

from ..config import RunConfig
from ..errors import ExitCode, HfbatchError, StoppedEarly, UsageError
from ..fingerprints import IdSet, canonical_request, request_fingerprint
from ..models import StopReason
from ..storage import private_dir, read_json, write_json
from ..summary import LatencyHistogram, ShardRow
from .base import Work
from .ray_limits import SAVINGS, LimitsBook, Snapshot
from .ray_merge import ClusterCost, Merger
from .ray_shard import ShardResult, ShardSpec, shard_task
from .vllm_store import create_private

STATE_SCHEMA = 1
MAX_RETRIES = 3  # a shard's task re-run when its worker dies (each re-run resumes from the shard's files)
SAVE_EVERY = 2.0  # seconds between saves of the engine's state while shards run
POLL = 0.1  # seconds between the driver's looks at the shards (merge, figures, ends)
DRAIN = 5.0  # seconds workers get to return after a hard stop before their processes are killed
INSTALL = "pip install 'hfbatch[ray]'"
_FORWARD = ("HFBATCH_", "HF_")  # the driver's settings the workers take (never the token: it travels in the spec)
_NEVER = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def require_ray() -> None:
    """UsageError (exit 2) with the install command when `ray` is not importable; imports nothing."""
    if importlib.util.find_spec("ray") is None:
        raise UsageError(f"--engine ray needs Ray, which is not installed here: {INSTALL} (on every node of the "
                         "cluster, the same hfbatch version)")


def check_storage(storage: str | None) -> None:
    """--ray-storage: a folder (every node mounts it at the same path); URLs are refused, saying why."""
    if storage and "://" in storage:
        raise UsageError(f"--ray-storage {storage}: give a folder mounted at the same path on every node (NFS, EFS, "
                         "Lustre, CephFS: a file system that appends; an object store cannot hold a shard's ledger)")


def default_shards(input_size: int, cpus: float) -> int:
    """One shard per CPU while the file is more than a MB per CPU, and at most ~256 MB of input per shard."""
    return max(1, min(max(2, int(cpus)), 1 + input_size // (1 << 20)), -(-input_size // (256 << 20)))


def task_cpus(shards: int, cpus: float) -> float:
    """The CPUs a shard's task asks for: up to one (a worker saturates about a core), less on a small cluster so that
    at least four run at once (whole-CPU tasks queue behind each other on one or two cores)."""
    return round(max(0.05, min(1.0, cpus / max(1, min(shards, max(4, int(cpus)))))), 3)


def worker_env() -> dict[str, str]:
    """The settings a worker takes from the driver: HFBATCH_*, HF_* (not the token), proxies, and the variables
    named in HFBATCH_RAY_ENV (comma-separated)."""
    extra = {n.strip() for n in os.environ.get("HFBATCH_RAY_ENV", "").split(",") if n.strip()}
    return {k: v for k, v in os.environ.items() if k not in _NEVER and (
        k.startswith(_FORWARD) or k.upper() in _PROXIES or k in extra)}


@dataclass
class Shard:
    """One shard's record in the batch's engine state (what the Batch object's hfbatch.shards shows)."""

    id: str
    requests: int = 0
    status: str = "written"  # written, running, done, stopped, failed, merged (an earlier run's, kept)
    attempts: int = 0
    completed: int = 0
    failed: int = 0
    sent: int = 0
    retries: int = 0
    node: str | None = None
    seconds: float | None = None
    message: str | None = None

    def row(self) -> ShardRow:
        return {"shard": self.id, "requests": self.requests, "status": self.status, "attempts": self.attempts,
                "completed": self.completed, "failed": self.failed, "sent": self.sent, "retries": self.retries,
                "node": self.node, "seconds": self.seconds, "message": self.message}


class RayState:
    """`<batch>/engine/ray.json` (versioned): where the shards live and each shard's record."""

    def __init__(self, path: Path, storage: str) -> None:
        self.path, self.storage = path, storage
        self.shards: list[Shard] = []

    @classmethod
    def open(cls, folder: Path, storage: str) -> RayState:
        private_dir(folder)
        state = cls(folder / "ray.json", storage)
        try:
            obj = read_json(state.path)
        except FileNotFoundError:
            return state
        except (OSError, ValueError) as e:
            raise UsageError(f"{state.path} is damaged ({e}): the output and error files hold every merged answer; "
                             "delete it and rerun to send the rest") from None
        schema = obj.get("schema") if isinstance(obj, dict) else None
        if not isinstance(schema, int) or schema > STATE_SCHEMA:
            raise UsageError(f"{state.path} was written by a newer hfbatch (schema {schema}): upgrade hfbatch")
        names = {f.name for f in fields(Shard)}
        state.shards = [Shard(**{k: v for k, v in s.items() if k in names}) for s in obj.get("shards") or []]
        state.storage = str(obj.get("storage") or storage)
        return state

    def save(self) -> None:
        write_json(self.path, {"schema": STATE_SCHEMA, "engine": "ray", "storage": self.storage,
                               "shards": [asdict(s) for s in self.shards]})

    def folder(self, shard: Shard) -> Path:
        return Path(self.storage) / shard.id


class RayEngine:
    """A batch's pending requests as shards on a Ray cluster (see the module docstring)."""

    name = "ray"
    remote = False  # the driver runs here (its shards run on the cluster): --detach runs it in the background

    def __init__(self, cfg: RunConfig, *, input_size: int) -> None:
        require_ray()
        check_storage(cfg.ray_storage)
        self.cfg, self.input_size = cfg, input_size
        self.connected = False
        self.cpus = 1.0
        self.nodes = 1
        self.snapshot: Snapshot | None = None
        self.peak = 0  # the most shard tasks running at once
        self.limits_now: dict[str, int] = {}

    async def __aenter__(self) -> RayEngine:
        if not self.cfg.detach:
            self._connect()  # while BatchRun scans the input in its thread
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.connected:
            import ray

            await asyncio.to_thread(ray.shutdown)

    def _connect(self) -> None:
        """Join the cluster (--ray-address, `auto`) or start a local Ray. In the main thread (Ray wants it) and
        blocking: the input is being scanned meanwhile. Ray's SIGTERM handler is taken back (ours stops cleanly)."""
        if self.connected:
            return
        # No address: a Ray of its own for this run (never a stale or unrelated cluster Ray would find on its own).
        address = self.cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
        if address is not None:
            # Not a line per second while a cluster is unreachable. (Setting it prints a line of its own, so not for
            # a local Ray, where stderr would otherwise stay clean.)
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
        import ray

        for name in ("ray", "ray._private", "ray.runtime_env"):
            logging.getLogger(name).setLevel(logging.ERROR)
        before = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address or "local", log_to_driver=False,
                     include_dashboard=False if address is None else None,
                     logging_level=logging.ERROR, configure_logging=True, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = "start a local Ray" if address is None else f"reach the Ray cluster at {address}"
            hint = ("" if address is None or os.environ.get("RAY_AUTH_MODE") else " (a cluster with token "
                    "authentication: set RAY_AUTH_MODE=token, with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN)")
            raise UsageError(f"--engine ray: cannot {where}: {str(e).splitlines()[0][:300]}{hint}") from None
        finally:
            if before is not None:
                signal.signal(signal.SIGTERM, before)
        self.connected = True
        self.cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self.nodes = sum(1 for n in ray.nodes() if n.get("Alive"))

    def live(self) -> dict[str, int]:
        return self.limits_now  # the running shards' adaptive limits per provider, summed

    # -- the run ------------------------------------------------------------------------------------

    async def run(self, work: Work) -> None:
        import ray

        if work.batch_dir is None:
            raise UsageError("--engine ray keeps its shards in the batch's folder; this caller has none")
        cfg = self.cfg
        self._connect()
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        if cfg.gpus_per_worker and gpus < cfg.gpus_per_worker:
            raise UsageError(f"--gpus-per-worker {cfg.gpus_per_worker:g}: this Ray cluster has {gpus:g} GPUs")
        if self.nodes > 1 and not cfg.ray_storage:
            raise UsageError(f"this Ray cluster has {self.nodes} nodes: its workers must read and write the shard "
                             "files where the driver does. Pass --ray-storage /a/folder/every/node/mounts (NFS, EFS, "
                             "Lustre, CephFS)")
        storage = (Path(cfg.ray_storage) / work.batch_dir.name if cfg.ray_storage
                   else work.batch_dir / "engine" / "shards")
        state = RayState.open(work.batch_dir / "engine", str(storage))
        stored = ((work.stored or {}).get("hfbatch") or {}).get("cost")
        cost = ClusterCost(stored if isinstance(stored, dict) else None)
        work.stats.cost = cost
        merger = Merger(work)
        for shard in state.shards:  # an earlier run's shards: keep what they wrote, send the rest anew
            if shard.status != "merged":
                folder = state.folder(shard)
                try:  # its last attempt (the state may be older: that driver was killed between two saves)
                    shard.attempts = max(shard.attempts, int(read_json(folder / "attempt.json")["epoch"]))
                except (OSError, ValueError, KeyError, TypeError):
                    pass
                got = merger.take(shard.id, folder)
                shard.completed += got[0]
                shard.failed += got[1]
                shard.status = "merged"
                shutil.rmtree(folder, ignore_errors=True)
        self._rows(work, state)
        state.save()
        shards, copies = await self._split(work, state, merger.merged)
        if not shards or work.stop.reason is not None:
            for shard in shards:
                shutil.rmtree(state.folder(shard), ignore_errors=True)
            state.shards = [s for s in state.shards if s not in shards]
            state.save()
            return
        await self._drive(work, state, merger, cost, shards, copies)

    async def _split(self, work: Work, state: RayState, skip: IdSet) -> tuple[list[Shard], list[bool]]:
        """The pending requests (no line yet, not merged just now) -> shard input files, round-robin; identical
        requests (dedupe) in one shard, so each is sent once."""
        n = self.cfg.shards or default_shards(self.input_size, self.cpus)
        first = len(state.shards) + 1
        made = [Shard(id=f"s{first + i:04d}") for i in range(n)]
        files: list[BinaryIO | None] = [None] * n
        copies = [False] * n
        private_dir(Path(state.storage))
        i = 0
        try:
            for k, req in enumerate(work.requests, 1):
                if k % 4096 == 0:
                    await asyncio.sleep(0)  # the progress bar moves, a Ctrl-C is seen
                    if work.stop.reason is not None:
                        break
                if req.custom_id in skip:
                    continue
                at = i % n
                i += 1
                if work.duplicates:
                    fp = request_fingerprint(canonical_request(req.url, req.body))
                    if fp in work.duplicates:
                        at = fp % n
                        copies[at] = True
                f = files[at]
                if f is None:
                    folder = state.folder(made[at])
                    private_dir(folder)
                    f = files[at] = os.fdopen(create_private(folder / "input.jsonl"), "wb")
                f.write(orjson.dumps({"custom_id": req.custom_id, "method": "POST", "url": req.url,
                                      "body": req.body}) + b"\n")
                made[at].requests += 1
        finally:
            for f in files:
                if f is not None:
                    f.close()
        keep = [(s, c) for s, c in zip(made, copies, strict=True) if s.requests]
        state.shards.extend(s for s, _ in keep)
        state.save()
        return [s for s, _ in keep], [d for _, d in keep]

    async def _drive(self, work: Work, state: RayState, merger: Merger, cost: ClusterCost, shards: list[Shard],
                     copies: list[bool]) -> None:
        import ray

        cfg = self.cfg
        spent_before = cost.spent
        book = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(LimitsBook).remote(
            cfg.concurrency, cfg.rpm, cfg.tpm, cfg.budget, spent_before)
        task = ray.remote(shard_task).options(
            num_cpus=task_cpus(len(shards), self.cpus), num_gpus=cfg.gpus_per_worker or 0,
            max_retries=MAX_RETRIES, retry_exceptions=False)
        env = worker_env()
        gpu = cfg.gpus_per_worker is not None
        refs: dict[Any, Shard] = {}
        for shard, dups in zip(shards, copies, strict=True):
            spec = ShardSpec(shard.id, str(state.folder(shard)), cfg, dups, env, gpu=gpu)
            refs[task.remote(spec, book)] = shard
            shard.status = "running"
        state.save()
        failures: list[tuple[Shard, BaseException]] = []
        try:
            await self._follow(work, state, merger, cost, book, refs, failures)
        finally:
            await self._wind_down(work, state, merger, cost, book, refs, failures)
        self._conclude(work, failures)

    async def _follow(self, work: Work, state: RayState, merger: Merger, cost: ClusterCost, book: Any,
                      refs: dict[Any, Shard], failures: list[tuple[Shard, BaseException]]) -> None:
        """Until every shard's task has ended: merge their lines, show their figures, carry stops both ways."""
        import ray

        told: tuple[StopReason, bool] | None = None
        stop = work.stop
        loop = asyncio.get_running_loop()
        saved = loop.time()
        while refs:
            if loop.time() - saved >= SAVE_EVERY:
                saved = loop.time()
                state.save()  # attempts and figures, for a rerun after this driver is killed
            self._merge(state, merger, refs.values())
            try:
                self.snapshot = await book.snapshot.remote()
            except ray.exceptions.RayActorError as e:
                raise StoppedEarly(f"the Ray actor holding the batch's limits died ({str(e).splitlines()[0]}); "
                                   "every answered line is kept: rerun the same command to send the rest") from None
            self._figures(work, state, cost)
            s = self.snapshot.stopped if self.snapshot is not None else None
            if s is not None and stop.reason is None:
                stop.stop(StopReason(s.reason), s.message, s.hard)  # a worker stopped the run: auth, credits...
            if stop.reason is not None and (told is None or (stop.hard and not told[1])):
                await book.stop.remote(stop.reason.value, stop.message, stop.hard)
                told = (stop.reason, stop.hard)
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            for ref in ready:
                self._ended(refs.pop(ref), ref, book, state, merger, failures)
            if refs:
                await asyncio.sleep(POLL)

    async def _wind_down(self, work: Work, state: RayState, merger: Merger, cost: ClusterCost, book: Any,
                         refs: dict[Any, Shard], failures: list[tuple[Shard, BaseException]]) -> None:
        """The run ends (or is cancelled past its grace): every worker stops at once, returns or is killed; every
        line they wrote is merged."""
        import ray

        if refs:
            reason = work.stop.reason or StopReason.SHUTDOWN
            try:
                await book.stop.remote(reason.value, work.stop.message, True)
            except ray.exceptions.RayActorError:
                pass
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DRAIN
            while refs and loop.time() < deadline:
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
                for ref in ready:
                    self._ended(refs.pop(ref), ref, book, state, merger, failures)
                if refs:
                    await asyncio.sleep(POLL)
            for ref, shard in refs.items():
                ray.cancel(ref, force=True)  # its requests in flight get no line: the rerun sends them
                shard.status = "stopped"
        self._merge(state, merger, state.shards)
        try:
            self.snapshot = await book.snapshot.remote()  # the workers' last reports
        except ray.exceptions.RayActorError:
            pass
        self._figures(work, state, cost)
        work.stats.in_flight = 0
        state.save()

    def _ended(self, shard: Shard, ref: Any, book: Any, state: RayState, merger: Merger,
               failures: list[tuple[Shard, BaseException]]) -> None:
        import ray

        try:
            result: ShardResult = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else e
            shard.status, shard.message = "failed", f"{type(cause).__name__}: {cause}"[:500]
            failures.append((shard, cause))
            book.leave.remote(shard.id)
        except ray.exceptions.RayError as e:  # the worker died more than MAX_RETRIES times, the node is gone
            shard.status, shard.message = "failed", f"{type(e).__name__}: {str(e).splitlines()[0]}"[:500]
            failures.append((shard, e))
            book.leave.remote(shard.id)
        else:
            shard.status = "done" if result.stop is None else "stopped"
            shard.attempts, shard.node, shard.seconds = result.epoch, result.node, result.seconds
            f = result.figures
            shard.sent, shard.retries = f.sent, f.retries
        self._merge(state, merger, [shard])
        self._attempts_seen(shard)
        state.save()

    def _attempts_seen(self, shard: Shard) -> None:
        """Every attempt the book saw of it (a worker that died before returning counts too)."""
        if self.snapshot is not None:
            epochs = [e for (s, e) in self.snapshot.figures if s == shard.id]
            shard.attempts = max([shard.attempts, *epochs])

    def _merge(self, state: RayState, merger: Merger, shards: Any) -> None:
        for shard in shards:
            if shard.status == "merged":
                continue
            got = merger.take(shard.id, state.folder(shard))
            shard.completed += got[0]
            shard.failed += got[1]

    def _figures(self, work: Work, state: RayState, cost: ClusterCost) -> None:
        """The workers' figures -> stats: HTTP attempts, retries, in flight, providers, cost; each shard's row."""
        snap, stats = self.snapshot, work.stats
        if snap is None:
            return
        sent = retries = in_flight = abandoned = 0
        providers: dict[str, int] = {}
        savings = dict.fromkeys(SAVINGS, 0.0)
        concurrency: dict[str, int] = {}
        pace: dict[str, float] = {}
        by_shard = {s.id: s for s in state.shards}
        latest: dict[str, int] = {}
        for (sid, epoch), f in snap.figures.items():
            sent += f.sent
            retries += f.retries
            abandoned += f.abandoned
            for k, v in f.providers.items():
                providers[k] = providers.get(k, 0) + v
            for k, x in f.savings.items():
                savings[k] = savings.get(k, 0.0) + x
            if epoch >= latest.get(sid, 0):
                latest[sid] = epoch
            shard = by_shard.get(sid)
            if shard is not None and shard.status == "running":
                in_flight += f.in_flight
                for k, c in f.concurrency.items():
                    concurrency[k] = concurrency.get(k, 0) + c
                pace.update(f.pace)
            if f.cost is not None:
                cost.shards[f"{sid}.{epoch}"] = f.cost
        for sid, epoch in latest.items():
            shard = by_shard.get(sid)
            if shard is not None:
                shard.attempts = max(shard.attempts, epoch)
                shard.sent = sum(f.sent for (s, _), f in snap.figures.items() if s == sid)
                shard.retries = sum(f.retries for (s, _), f in snap.figures.items() if s == sid)
        stats.sent, stats.retries, stats.in_flight, stats.abandoned = sent, retries, in_flight, abandoned
        for k, x in savings.items():
            setattr(stats, k, x if k == "saved_usd" else int(x))
        stats.providers.clear()
        stats.providers.update(providers)
        if concurrency:
            stats.concurrency = concurrency
        self.limits_now = concurrency
        stats.pace = pace
        stats.jobs = [j for f in snap.figures.values() for j in f.jobs]  # type: ignore[misc]
        latency = LatencyHistogram()  # every attempt's answers (each figure is its attempt's running total)
        for f in snap.figures.values():
            latency.merge(f.latency)
        stats.latency = latency
        self.peak = max(self.peak, snap.running)
        self._rows(work, state)

    def _rows(self, work: Work, state: RayState) -> None:
        work.stats.shards = [s.row() for s in state.shards]
        work.stats.workers = self.peak

    def _conclude(self, work: Work, failures: list[tuple[Shard, BaseException]]) -> None:
        """Shards that failed: the run stops resumable (their answered lines are kept); a bug in a worker is exit 1."""
        if not failures or work.stop.reason is not None:
            return
        shard, cause = failures[0]
        more = f" (and {len(failures) - 1} more shards)" if len(failures) > 1 else ""
        what = f"shard {shard.id} failed{more}: {shard.message}"
        if isinstance(cause, HfbatchError) and cause.exit_code != ExitCode.INTERNAL:
            work.stop.stop(StopReason.ENGINE_FAILED, f"{what}; its answered lines are kept: rerun to send the rest")
        elif isinstance(cause, Exception) and not isinstance(cause, HfbatchError) and _is_bug(cause):
            if os.environ.get("HFBATCH_DEBUG"):
                raise cause  # debug means loud: the worker's traceback (Ray's error carries it)
            work.stop.stop(StopReason.INTERNAL_ERROR, f"internal error in a Ray worker: {what}")
        else:
            work.stop.stop(StopReason.ENGINE_FAILED, f"{what}; its answered lines are kept: rerun to send the rest")


def _is_bug(e: BaseException) -> bool:
    """An exception raised by hfbatch's code in a worker (not Ray losing the worker)."""
    return not type(e).__module__.startswith("ray.")
