"""One shard on a Ray worker: its requests (a file the driver wrote) -> hfbatch's own engine (HTTP through the
executor, or vLLM's batch runner with --gpus-per-worker) -> the shard's output and error files, under the
cluster's limits (engines/ray_limits.py's book, in an actor, through a Lease).

The shard's files are its ledger. An attempt starts by reading them back (a torn last line is cut first) and
sends only what has no line there, so when Ray runs the task again (its worker died, its node was lost) the new
attempt resumes: what is re-sent is at most what the dead attempt had in flight, which its slots bound. An
attempt joins the book with a new epoch; an older attempt still alive is fenced (it stops at once).

`ray` itself is never imported here: the book's calls come in as an async callable (`Call`: the actor's methods
in a worker, a local LimitsBook in tests).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .. import __version__
from ..config import RunConfig
from ..cost.spend import Budget, CostLedger
from ..errors import DependencyChanged
from ..fingerprints import IdSet, RepeatFinder, canonical_request, request_fingerprint
from ..limits import Capacity, Gate, RateBucket, StopControl
from ..models import Request, StopReason
from ..reader import iter_lines
from ..storage import write_json
from ..summary import Stats
from ..validate import validate_line
from ..writer import Answers, JsonlSink, repair
from .base import Engine, Work
from .http import first_limit
from .ray_limits import SAVINGS, SYNC_EVERY, Reply, Report, ShardFigures, Stop

Call = Callable[..., Awaitable[Any]]  # (method name, *args) -> the book's answer


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """What the driver hands a shard's task."""

    id: str  # s0001, ...
    dir: str  # input.jsonl, output.jsonl, errors.jsonl (and engine/ in GPU mode)
    cfg: RunConfig
    copies: bool = False  # it holds identical requests (all copies of each: the driver shards them together)
    env: dict[str, str] = field(default_factory=dict)  # the driver's HFBATCH_*/HF_* settings (not the token)
    version: str = __version__
    gpu: bool = False


@dataclass(slots=True)
class ShardResult:
    id: str
    epoch: int
    figures: ShardFigures
    stop: Stop | None  # why the attempt stopped early; None: every request of the shard has its line
    node: str
    pid: int
    seconds: float


class LeasedGate(Gate):
    """-c's gate in a shard worker: its limit is the slots the book allotted (0 at first, possibly below the slots
    in use after a shrink: then none is handed out until enough requests end). A request that finds no free slot
    wakes the lease at once."""

    __slots__ = ("hungry",)

    def __init__(self) -> None:
        super().__init__(0)
        self.hungry = asyncio.Event()

    async def acquire(self, tenant: object = None, front: bool = False) -> None:
        if self.active >= self.limit:
            self.hungry.set()
        await super().acquire(tenant, front)

    def allot(self, slots: int) -> None:
        self.limit = slots
        self.wake()


class SharedBudget(Budget):
    """--budget in a shard worker: `limit` is its share (the book moves it). A request that does not fit the share
    waits while the cluster's remaining budget could still pay for it; the book then serves it first."""

    def __init__(self, ledger: CostLedger) -> None:
        super().__init__(0.0, ledger)
        self.left = 0.0  # the cluster's budget minus what every worker spent (the book's word at the last sync)
        self.need: float | None = None  # what it waits for, holding nothing reserved

    def try_reserve(self, amount: float | None) -> bool:
        ok = super().try_reserve(amount)
        self.need = None if ok or self.reserved > 0 else amount
        return ok

    def can_ever_fit(self, amount: float | None) -> bool:
        return amount is not None and amount <= self.left

    def may_free(self) -> bool:
        return True  # other workers' reservations settle too: the share grows


class Lease:
    """A shard worker's side of the book: reports its demand and figures every SYNC_EVERY (at once when a request
    waits for a slot), applies its allotment of -c, --rpm, --tpm and --budget, and obeys a stop or a fence."""

    def __init__(self, call: Call, shard: str, epoch: int, cfg: RunConfig, stats: Stats, stop: StopControl) -> None:
        self.call, self.shard, self.epoch = call, shard, epoch
        self.cfg, self.stats, self.stop = cfg, stats, stop
        self.gate = LeasedGate()
        self.capacity = Capacity(cfg.concurrency, cfg.adapt, first_limit(cfg.concurrency, cfg.base_url))
        self.capacity.gate = self.gate
        if cfg.rpm:
            self.capacity.rpm = RateBucket(cfg.rpm / 60.0)
        if cfg.tpm:
            self.capacity.tpm = RateBucket(cfg.tpm / 60.0, burst=cfg.tpm / 60.0)
        self.budget: SharedBudget | None = None
        self.engine: Engine | None = None
        self.done = False  # every request has been read: no more demand than what is in use
        self.from_book = False  # the stop came from the book (not ours to report)
        self.every = SYNC_EVERY  # until the next sync (the book says: longer when many workers share it)

    def make_budget(self, limit: float, ledger: CostLedger) -> Budget:
        self.budget = SharedBudget(ledger)
        return self.budget

    def report(self) -> Report:
        gate, stats, stop = self.gate, self.stats, self.stop
        figures = ShardFigures(sent=stats.sent, retries=stats.retries, in_flight=stats.in_flight,
                               completed=stats.completed, failed=stats.failed, abandoned=stats.abandoned,
                               concurrency=self.engine.live() if self.engine is not None else {},
                               providers=dict(stats.providers), pace=dict(stats.pace),
                               savings={k: getattr(stats, k) for k in SAVINGS},
                               cost=stats.cost.summary() if stats.cost is not None else None,
                               jobs=[dict(j) for j in stats.jobs], latency=stats.latency.counts())
        r = Report(self.shard, self.epoch, held=max(gate.limit, gate.active), want=gate.active + gate.waiting,
                   figures=figures)
        b = self.budget
        if b is not None:
            floor = b.ledger.spent + b.reserved
            r.usd_held, r.spent = max(b.limit, floor), b.ledger.spent
            r.usd_want = floor if self.done and not b.need else math.inf
            r.usd_blocked = b.need
        if stop.reason is not None and not self.from_book:
            r.stop = Stop(stop.reason.value, stop.message, stop.hard)
        return r

    def apply(self, reply: Reply) -> bool:
        """The book's answer; True when the allotment of slots grew."""
        stop = self.stop
        self.every = reply.every
        if reply.fenced:
            self.from_book = True
            stop.stop(StopReason.SHUTDOWN, f"shard {self.shard}: a newer attempt of it runs", hard=True)
            self.gate.allot(0)
            return False
        grew = reply.slots > self.gate.limit
        self.gate.allot(reply.slots)
        if reply.rpm and self.capacity.rpm is not None:
            self.capacity.rpm.rate = reply.rpm / 60.0
        if reply.tpm and self.capacity.tpm is not None:
            self.capacity.tpm.rate = reply.tpm / 60.0
        b = self.budget
        if b is not None and reply.usd is not None:
            b.limit = reply.usd
            b.left = reply.usd_left if reply.usd_left is not None else 0.0
            hooks = getattr(self.engine, "hooks", None)
            if hooks is not None:
                hooks.room()
        s = reply.stop
        if s is not None and (stop.reason is None or (s.hard and not stop.hard)):
            self.from_book = self.from_book or stop.reason is None
            stop.stop(StopReason(s.reason), s.message, hard=s.hard)
        return grew

    async def sync(self) -> bool:
        reply: Reply = await self.call("sync", self.report())
        return self.apply(reply)

    async def pump(self) -> None:
        """Sync until cancelled: at once when a request waits for a slot (unless the last sync brought none),
        else every `every` seconds."""
        loop = asyncio.get_running_loop()
        grew = True
        while True:
            if grew:
                try:
                    await asyncio.wait_for(self.gate.hungry.wait(), self.every)
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(self.every)  # nothing free in the cluster: no call storm while we wait
            self.gate.hungry.clear()
            started = loop.time()
            grew = await self.sync()
            if loop.time() - started > 1.0:
                grew = False  # a slow book: ease off


def read_ledger(out: Path, err: Path, stats: Stats) -> IdSet:
    """The custom_ids the shard's files already answer (counted into `stats`); a torn last line is cut first."""
    done = IdSet()
    for path, ok in ((out, True), (err, False)):
        if not path.exists():
            continue
        repair(str(path))
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    cid = orjson.loads(raw)["custom_id"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    raise DependencyChanged(f"{path}:{n}: not a batch line: the shard's file was damaged; delete the "
                                            "shard's folder and rerun (its requests are sent again)") from None
                done.add(str(cid))
                if ok:
                    stats.completed += 1
                else:
                    stats.failed += 1
    return done


def shard_requests(path: Path, cfg: RunConfig, done: IdSet) -> Iterator[Request]:
    """The shard's requests without a line yet, in order (the driver validated them: the same rules again)."""
    with open(path, "rb") as f:
        for line_no, raw in iter_lines(f):
            r = validate_line(line_no, raw, None, pass_through=cfg.base_url is not None, endpoint=cfg.endpoint)
            if isinstance(r, Request) and r.custom_id not in done:
                yield r


def repeats(path: Path, cfg: RunConfig) -> dict[int, int]:
    """The shard's identical requests: fingerprint -> occurrences (fingerprints are per process: the driver's mean
    nothing here, so the worker finds them again in its own file, all copies being in it)."""
    finder = RepeatFinder()
    for r in shard_requests(path, cfg, IdSet()):
        finder.add(request_fingerprint(canonical_request(r.url, r.body)))
    return finder.repeats()


def make_engine(spec: ShardSpec, lease: Lease, input_size: int) -> Engine:
    if spec.gpu:
        from .vllm import VllmEngine

        return VllmEngine(spec.cfg)
    from .http import HttpEngine

    return HttpEngine(spec.cfg, input_size=input_size, capacity=lease.capacity, budget=lease.make_budget)


async def run_shard(spec: ShardSpec, call: Call) -> ShardResult:
    """One attempt at a shard: resume from its files, run its engine under the lease, return its figures."""
    t0 = time.monotonic()
    d = Path(spec.dir)
    epoch: int = await call("join", spec.id)
    # Where this attempt runs (an operator's answer to "which process is shard s0003?"; tests kill it by its pid).
    write_json(d / "attempt.json", {"epoch": epoch, "pid": os.getpid(), "node": socket.gethostname()})
    stats, stop = Stats(), StopControl()
    done = read_ledger(d / "output.jsonl", d / "errors.jsonl", stats)
    lease = Lease(call, spec.id, epoch, spec.cfg, stats, stop)

    def write_failed(sink: JsonlSink, e: OSError) -> None:  # dispatch no more: what has no line is sent again
        stop.stop(StopReason.WRITE_ERROR, f"shard {spec.id}: {sink.describe_error()}")

    out = JsonlSink.open(str(d / "output.jsonl"), append=True, on_error=write_failed)
    err = JsonlSink.open(str(d / "errors.jsonl"), append=True, on_error=write_failed)
    answers = Answers(out, err, stats)

    def requests() -> Iterator[Request]:
        yield from shard_requests(d / "input.jsonl", spec.cfg, done)
        lease.done = True

    duplicates = repeats(d / "input.jsonl", spec.cfg) if spec.copies else {}
    work = Work(requests(), answers, stats, stop, duplicates=duplicates, batch_dir=d, answered=done)
    pump: asyncio.Task[None] | None = None
    try:
        engine = lease.engine = make_engine(spec, lease, os.path.getsize(d / "input.jsonl"))
        async with engine:
            await lease.sync()  # the first allotment before anything is sent
            pump = asyncio.create_task(lease.pump())
            task = asyncio.create_task(engine.run(work))
            guard = asyncio.create_task(_hard_stop(stop, task))
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
            finally:
                guard.cancel()
    finally:
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        out.close()
        err.close()
    lease.done = True
    final = lease.report()
    await call("sync", final)
    await call("leave", spec.id, epoch, final.spent)
    why = Stop(stop.reason.value, stop.message, stop.hard) if stop.reason is not None else None
    return ShardResult(spec.id, epoch, final.figures, why, socket.gethostname(), os.getpid(),
                       round(time.monotonic() - t0, 3))


async def _hard_stop(stop: StopControl, task: asyncio.Task[None]) -> None:
    """A hard stop (a second Ctrl-C, a 401, the driver past its grace, a fence) cancels the requests in flight; a
    soft one only stops dispatching (the driver's lifecycle decides when a soft stop turns hard)."""
    while True:
        await stop.event.wait()
        if stop.hard:
            task.cancel()
            return
        await asyncio.sleep(0.05)


def shard_task(spec: ShardSpec, book: Any) -> ShardResult:
    """The Ray task's body: check the version, take the driver's settings, run the attempt."""
    if spec.version != __version__:
        raise DependencyChanged(f"this Ray worker runs hfbatch {__version__}, the driver {spec.version}: install the "
                                f"same version on every node (pip install 'hfbatch[ray]=={spec.version}')")
    os.environ.update(spec.env)

    async def call(method: str, *args: Any) -> Any:
        return await getattr(book, method).remote(*args)

    return asyncio.run(run_shard(spec, call))
