"""The Ray engine's cluster-wide limits (pure: no Ray, no clock): each shard worker's report -> its allotment of -c,
--rpm, --tpm and --budget, a stop every worker obeys, and the figures the driver shows. engines/ray_engine.py hosts
one `LimitsBook` in one small Ray actor; engines/ray_shard.py is the worker's side (it syncs every ~50 ms, and at
once when requests wait for a slot it does not hold).

Why leases and not one call per request: an actor call costs ~1 ms (BENCHMARKS.md), a request ~0.1 ms of a
worker's CPU. So a worker holds a block of slots (its local gate's limit) and syncs its demand; the book gives
each worker a max-min fair share of the capacity by demand, and unused slots come back on the next sync.

Exactly the capacity, never more: what a worker was given counts as held until it reports having shrunk (a worker
told to shrink lowers its gate's limit, and the slots in use drain as their requests end), so the sum of what
workers may have in flight never exceeds -c, whatever the order of syncs. The same pool shares --budget (in USD:
what a worker may have spent plus reserved). --rpm and --tpm are split evenly between the shards running (a
shard's bucket paces its sends; the split follows joins and leaves within a sync). The adaptive limit per
provider stays in each worker: AIMD flows sharing a bottleneck converge to a fair share of it (as TCP's do), and
its decisions read per-request latencies an actor round trip would blur; -c holds across them all.

Fencing: a shard's attempt joins with a new epoch; an older attempt still alive (a node cut off, not dead) is told
`fenced` on its next sync and stops at once, so two attempts of one shard never both send.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Stats counters a worker reports as they are and the driver sums (dedupe, cache, coalescing, fallbacks, caps).
SAVINGS = ("deduped", "cache_hits", "coalesced", "fallbacks", "capped", "saved_input_tokens", "saved_output_tokens",
           "saved_usd")


SYNC_EVERY = 0.05  # seconds between a worker's syncs with few workers (at once when a request waits for a slot)
SYNCS_PER_SECOND = 400  # what the book is held to: one actor serves ~500-900 syncs/s on a busy 2-core node


@dataclass(slots=True)
class ShardFigures:
    """A shard attempt's live counters (the driver sums them: the progress bar, the Batch object)."""

    sent: int = 0
    retries: int = 0
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    abandoned: int = 0
    concurrency: dict[str, int] = field(default_factory=dict)  # its adaptive limit per provider
    providers: dict[str, int] = field(default_factory=dict)  # 2xx answers per serving provider
    pace: dict[str, float] = field(default_factory=dict)
    savings: dict[str, float] = field(default_factory=dict)  # Stats' counters named in SAVINGS
    cost: dict[str, Any] | None = None  # its CostLedger.summary() (GPU mode: its GpuCost's)
    jobs: list[dict[str, Any]] = field(default_factory=list)  # GPU mode: its vLLM runs (summary.JobFigures)
    latency: dict[int, int] = field(default_factory=dict)  # its LatencyHistogram's buckets


@dataclass(slots=True)
class Report:
    """What a worker tells the book on each sync."""

    shard: str
    epoch: int
    held: int  # slots it may have in use: max(its gate's limit, slots in use)
    want: int  # slots it could use now: in use + waiting
    usd_held: float = 0.0  # budget it may have committed: max(its local limit, spent + reserved)
    usd_want: float = 0.0  # spent + reserved, plus what it would like (inf: it has work left)
    usd_blocked: float | None = None  # waiting for this much budget with nothing reserved (served first)
    spent: float = 0.0
    figures: ShardFigures = field(default_factory=ShardFigures)
    stop: Stop | None = None  # the worker stopped the run (auth, credits, budget, an internal error)


@dataclass(frozen=True, slots=True)
class Stop:
    reason: str  # a StopReason value
    message: str | None
    hard: bool


@dataclass(frozen=True, slots=True)
class Reply:
    fenced: bool  # a newer attempt of this shard runs: stop at once
    slots: int
    rpm: float | None  # this worker's share, per minute
    tpm: float | None
    usd: float | None  # this worker's budget: the most its spent + reserved may reach
    usd_left: float | None  # the whole budget minus what every worker spent: may a request still ever fit?
    stop: Stop | None
    every: float = SYNC_EVERY  # seconds until this worker's next sync (longer with many workers: the book's load)


def fair(capacity: float, wants: dict[str, float], whole: bool, first: dict[str, float] | None = None
         ) -> dict[str, float]:
    """Max-min fair shares of `capacity` by demand (water-filling); `whole`: integer shares (slots). `first`:
    needs served whole before anything is shared, in order (a worker waiting for budget it cannot get from its
    share: without this, equal shares each too small for one request would all wait forever)."""
    out: dict[str, float] = {}
    left = capacity
    for who, need in (first or {}).items():
        give = max(0.0, min(need, left))
        out[who] = give
        left -= give
    ordered = sorted(((w, v) for w, v in wants.items() if w not in out), key=lambda kv: kv[1])
    for i, (who, want) in enumerate(ordered):
        share = left / (len(ordered) - i)
        if whole:
            share = math.ceil(share)
        give = max(0.0, min(want, share, left))
        out[who] = give
        left -= give
    return out


class Pool:
    """A divisible capacity shared by workers, held conservatively (see the module docstring)."""

    __slots__ = ("capacity", "whole", "held", "want", "blocked")

    def __init__(self, capacity: float, whole: bool) -> None:
        self.capacity, self.whole = capacity, whole
        self.held: dict[str, float] = {}
        self.want: dict[str, float] = {}
        self.blocked: dict[str, float] = {}  # worker -> what it waits for, holding nothing in use (served first)

    def sync(self, who: str, held: float, want: float, blocked: float | None = None) -> float:
        """The worker's new allotment. Growth comes only from what nobody holds; a shrink is told at once and
        counted when the worker reports it (its slots in use drain first)."""
        self.held[who] = held
        self.want[who] = want
        if blocked:
            self.blocked.setdefault(who, blocked)
        else:
            self.blocked.pop(who, None)
        target = fair(self.capacity, self.want, self.whole, self.blocked)[who]
        if target < held:
            return target
        free = self.capacity - sum(self.held.values())
        new = min(target, held + max(0.0, free))
        if self.whole:
            new = float(math.floor(new))
        self.held[who] = max(held, new)
        return new

    def leave(self, who: str) -> None:
        self.held.pop(who, None)
        self.want.pop(who, None)
        self.blocked.pop(who, None)

    @property
    def in_use(self) -> float:
        return sum(self.held.values())


class LimitsBook:
    """One batch's cluster-wide limits and live figures (the actor's whole state)."""

    def __init__(self, concurrency: int, rpm: float | None = None, tpm: float | None = None,
                 budget: float | None = None, spent_before: float = 0.0) -> None:
        self.slots = Pool(concurrency, whole=True)
        self.rpm, self.tpm = rpm, tpm
        self.budget = budget
        # What the budget pool holds: the budget minus what earlier runs and finished shards spent.
        self.usd = Pool(max(0.0, budget - spent_before), whole=False) if budget is not None else None
        self.spent_done = spent_before
        self.spent: dict[str, float] = {}
        self.epochs: dict[str, int] = {}
        self.running: set[str] = set()
        self.figures: dict[tuple[str, int], ShardFigures] = {}
        self.stopped: Stop | None = None

    def join(self, shard: str) -> int:
        """A shard's attempt starts: its epoch (an older attempt of it is fenced from now on)."""
        epoch = self.epochs.get(shard, 0) + 1
        self.epochs[shard] = epoch
        self.running.add(shard)
        self.slots.leave(shard)  # an earlier attempt died (Ray re-runs a task whose worker died): its slots
        if self.usd is not None:
            self.usd.leave(shard)
        return epoch

    def sync(self, r: Report) -> Reply:
        self.figures[(r.shard, r.epoch)] = r.figures
        if self.epochs.get(r.shard) != r.epoch or r.shard not in self.running:
            return Reply(True, 0, None, None, 0.0 if self.budget is not None else None, None, self.stopped)
        if r.stop is not None and self.stopped is None:
            self.stopped = r.stop  # auth, credits, budget, a bug: the run stops everywhere
        slots = int(self.slots.sync(r.shard, r.held, r.want))
        usd = usd_left = None
        if self.usd is not None:
            self.spent[r.shard] = r.spent
            usd = self.usd.sync(r.shard, r.usd_held, r.usd_want, r.usd_blocked)
            usd_left = self.usd.capacity - sum(self.spent.values())
        n = max(1, len(self.running))
        return Reply(False, slots, self.rpm / n if self.rpm else None, self.tpm / n if self.tpm else None,
                     usd, usd_left, self.stopped, max(SYNC_EVERY, n / SYNCS_PER_SECOND))

    def leave(self, shard: str, epoch: int | None = None, spent: float | None = None) -> None:
        """A shard's attempt ended (or the driver saw its task fail): its slots and budget go back to the pool,
        what it spent stays spent."""
        if epoch is not None and self.epochs.get(shard) != epoch:
            return  # an older attempt: the current one holds the shard's share
        self.running.discard(shard)
        self.slots.leave(shard)
        if self.usd is not None:
            done = spent if spent is not None else self.spent.get(shard, 0.0)
            self.spent.pop(shard, None)
            self.usd.leave(shard)
            self.usd.capacity = max(0.0, self.usd.capacity - done)

    def stop(self, reason: str, message: str | None, hard: bool) -> None:
        """The driver stops the run (Ctrl-C, cancel, expiry): every worker stops on its next sync."""
        if self.stopped is None or (hard and not self.stopped.hard):
            self.stopped = Stop(reason, message, hard or (self.stopped.hard if self.stopped else False))

    def snapshot(self) -> Snapshot:
        """What the driver shows: the figures of every attempt, the slots held, the stop."""
        return Snapshot(dict(self.figures), int(self.slots.in_use), len(self.running), self.stopped)


@dataclass(frozen=True, slots=True)
class Snapshot:
    figures: dict[tuple[str, int], ShardFigures]
    slots_held: int
    running: int
    stopped: Stop | None
