"""vLLM's batch runner, part by part: the lifecycle (`PartEngine`) shared by every engine that runs it:
engines/vllm.py (this machine), engines/hf_jobs.py (Hugging Face Jobs) and the Ray engine's GPU mode (a
shard's requests on the worker's GPU); a subclass only says where a part runs (launch, reattach, poll, halt,
fetch). Pending requests -> one `vllm run-batch` input per model (vllm_store.PartWriter: each distinct request
once), its output lines -> OpenAI's answers as they come (Collector, through vllm_lines.convert: each custom_id
once, deduplicated copies filled in), its progress lines -> live figures.

vLLM's runner validates every line first and one invalid line aborts the run ("Invalid request on line N",
nothing written): that line gets its error line and the rest is relaunched. State lives in the batch's folder
(`engine/`, vllm_store.PartStore): state.json (the parts, versioned) and per part its input, the copies of
deduplicated requests, its output and its log. The parts' answered prefixes are the ledger with the output and
error files: a rerun collects what an earlier run left, follows a part still running (never a second run of it)
and sends only the lines that have no answer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Container
from pathlib import Path
from types import TracebackType

import orjson

from ..config import RunConfig
from ..cost.gpu import GpuCost, record
from ..errors import DependencyChanged, UsageError
from ..fingerprints import IdSet
from ..models import NoAnswer, StopReason, Success
from ..summary import usage_tokens
from .base import Work
from .vllm_lines import LogTail, convert
from .vllm_store import OutputTail, Part, PartStatus, PartStore, PartWriter

MAX_RESTARTS = 3  # a part relaunched without the line vLLM refused, at most this many times

__all__ = ["Collector", "LogTail", "Part", "PartEngine", "PartStatus", "PartStore", "PartWriter"]


# -- the lifecycle --------------------------------------------------------------------------------------


class Collector:
    """vLLM's answers -> our lines, each custom_id once: the sent request and its deduplicated copies."""

    def __init__(self, work: Work, provider: str) -> None:
        self.work, self.provider = work, provider  # provider: what the summary counts the answers under
        self.written = IdSet()  # custom_ids given a line by this run

    def done(self, custom_id: str) -> bool:
        return custom_id in self.work.answered or custom_id in self.written

    def take(self, part: Part, raw: bytes, copies: dict[str, list[str]], where: Path) -> bool:
        """One output line; False when its answer was written before (a rerun reading the part again)."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
            raise DependencyChanged(f"{where}: not a vLLM batch output line ({raw[:120]!r}); vLLM's output "
                                    "format changed? The batch is resumable once that is understood")
        cid = obj["custom_id"]
        part.answered += 1
        answer, body = convert(obj, raw)
        stats = self.work.stats
        fresh = False
        for i, x in enumerate((cid, *copies.get(cid, ()))):
            if self.done(x):
                continue
            self.written.add(x)
            self.work.answers.write(x, answer)
            fresh = True
            if i == 0:
                if body is not None:
                    stats.add_usage(body)
                    stats.providers[self.provider] += 1
                    inp, out = usage_tokens(body)
                    part.tokens += inp + out
            else:
                stats.deduped += 1
                if isinstance(answer, Success):
                    stats.add_saved(answer.tokens)
        return fresh

    def refuse(self, custom_id: str, copies: dict[str, list[str]], message: str) -> None:
        """A line vLLM refused as a whole: its error line (and its copies')."""
        answer = NoAnswer("invalid_request", message)
        for x in (custom_id, *copies.get(custom_id, ())):
            if not self.done(x):
                self.written.add(x)
                self.work.answers.write(x, answer)


class PartEngine:
    """An engine that runs a batch as `vllm run-batch` parts, one per model (see the module docstring).

    Subclasses implement where a part runs: `launch`, `reattach` (is an earlier run's part still running?),
    `poll` (progress, end), `halt` (stop it, or leave it running), `fetch` (its output file), and `price`."""

    name = "vllm"
    remote = False  # True (hf_jobs.py): the parts run elsewhere; --detach launches them, a background process follows
    parallel = 1  # parts running at once
    poll_interval = 0.1
    cost_basis = "gpu_time"

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.cost = GpuCost(self.cost_basis)
        self._store: PartStore | None = None
        self._work: Work | None = None
        self._collector: Collector | None = None
        self.logs: dict[str, LogTail] = {}
        self.outputs: dict[str, OutputTail] = {}
        self.failures: list[Part] = []
        self.fresh: dict[str, int] = {}  # part id -> lines collected by this run (all: a clean measurement)
        self._copies: dict[str, dict[str, list[str]]] = {}

    async def __aenter__(self) -> PartEngine:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        pass

    def live(self) -> dict[str, int]:
        return {}

    @property
    def store(self) -> PartStore:
        assert self._store is not None
        return self._store

    @property
    def work(self) -> Work:
        assert self._work is not None
        return self._work

    @property
    def collector(self) -> Collector:
        assert self._collector is not None
        return self._collector

    # -- what a subclass says -----------------------------------------------------------------------

    async def prepare(self) -> None:
        """Before anything runs (and before an earlier run's parts are looked at)."""

    async def preflight(self, parts: list[Part]) -> None:
        """Before the first of these new parts is launched: refuse (UsageError) what cannot run."""

    async def launch(self, part: Part) -> None:
        raise NotImplementedError

    async def reattach(self, part: Part) -> bool:
        """An earlier run's part that was launching or running: True if it still runs (follow it); else set
        its status to ENDED (collect what it wrote) or WRITTEN (it never started: launch it again)."""
        raise NotImplementedError

    async def poll(self, part: Part) -> None:
        """Progress, and its end: set status ENDED (with stage, exit code, message)."""
        raise NotImplementedError

    async def halt(self, part: Part, *, cancel: bool, hard: bool) -> bool:
        """The run is stopping: stop the part (True: wait for its end, then collect) or leave it running
        (False: a rerun follows it)."""
        raise NotImplementedError

    async def fetch(self, part: Part) -> Path | None:
        """Its output file, here (None: it wrote none)."""
        return self.store.path(part, "output.jsonl")

    def price(self, part: Part) -> tuple[float | None, bool]:
        """(USD per minute of its runner, billed by the started minute?)."""
        return None, False

    def key(self, part: Part) -> str:
        """What its measured throughput is stored under (a flavor; "local")."""
        return "local"

    # -- the lifecycle ----------------------------------------------------------------------------

    async def run(self, work: Work) -> None:
        if work.batch_dir is None:
            raise UsageError(f"--engine {self.name} keeps its parts in the batch's folder; this caller has none")
        self._work = work
        self._store = PartStore.open(work.batch_dir / "engine", self.name)
        self._collector = Collector(work, self.name)
        work.stats.cost = self.cost
        await self.prepare()
        active: list[Part] = []
        for part in self.store.parts:  # what an earlier run left
            if part.status == PartStatus.WRITTEN:
                part.status = PartStatus.DROPPED  # never launched: its lines go to a new part
            elif part.status in (PartStatus.LAUNCHING, PartStatus.RUNNING):
                if await self.reattach(part):
                    active.append(part)
                elif part.status == PartStatus.WRITTEN:
                    part.status = PartStatus.DROPPED
            if part.status == PartStatus.ENDED:
                await self._collect(part, report=False)  # what it left unanswered goes to a new part below
        self.store.save()
        queue: list[Part] = []
        if work.stop.reason is None:
            queue = await self._partition(self._in_flight(active))
            if queue:
                await self.preflight(queue)
        try:
            await self._drive(active, queue)
        finally:
            self._figures()
            self.store.save()
        if self.failures and work.stop.reason is None:
            work.stop.stop(StopReason.ENGINE_FAILED, "; ".join(self._failure(p) for p in self.failures))
        if not work.detach and all(p.status in (PartStatus.COLLECTED, PartStatus.DROPPED) for p in self.store.parts):
            await self.cleanup()

    def _in_flight(self, active: list[Part]) -> Container[str]:
        ids = IdSet()
        for part in active:
            for cid in self.store.sent_ids(part):
                ids.add(cid)
            for copies in self.store.copies(part).values():
                for cid in copies:
                    ids.add(cid)
        return ids

    async def _partition(self, skip: Container[str]) -> list[Part]:
        """The pending requests (not answered, not in a running part) -> new parts, one per model."""
        work = self.work
        writer = PartWriter(self.store, work.duplicates, self.cfg.max_tokens)
        stopped = False
        for n, req in enumerate(work.requests, 1):
            if req.custom_id in skip or self.collector.done(req.custom_id):
                continue
            writer.add(req)
            if n % 4096 == 0:
                await asyncio.sleep(0)  # the ticker flushes and the progress bar moves meanwhile
                if work.stop.reason is not None:
                    stopped = True
                    break
        parts = writer.close(keep=not stopped)
        work.stats.capped += writer.capped
        self.store.save()
        return [] if stopped else parts

    async def _drive(self, active: list[Part], queue: list[Part]) -> None:
        work, stop = self.work, self.work.stop
        halted: dict[str, bool] = {}  # part id -> halted hard
        while active or queue:
            if stop.reason is not None:
                for part in queue:
                    part.status = PartStatus.DROPPED
                queue.clear()
                cancel = stop.reason in (StopReason.CANCELLED, StopReason.EXPIRED)
                left = 0
                for part in list(active):
                    if part.id in halted and (halted[part.id] or not stop.hard):
                        continue
                    halted[part.id] = stop.hard
                    if not await self.halt(part, cancel=cancel, hard=stop.hard):
                        active.remove(part)  # left running: the rerun follows it
                        work.stats.abandoned += max(0, part.requests + part.copies - part.answered)
                        left += 1
                if left and work.batch_dir is not None:
                    stop.message = (f"{stop.message}; {left} {self.runner_noun}(s) keep running, and "
                                    "are billed: rerun the same command to follow them and collect their answers, "
                                    f"or `hfbatch cancel {work.batch_dir.name}` to stop them")
                self.store.save()
            while queue and len(active) < self.parallel and stop.reason is None:
                part = queue.pop(0)
                await self.launch(part)
                active.append(part)
            if work.detach:
                return  # launched: a background process follows them
            for part in list(active):
                await self.poll(part)
                if part.status == PartStatus.ENDED:
                    active.remove(part)
                    rest = await self._collect(part)
                    if rest is not None and stop.reason is None:
                        queue.insert(0, rest)
            self._figures()
            if active or queue:
                if stop.reason is None:
                    try:
                        await asyncio.wait_for(stop.event.wait(), self.poll_interval)
                    except TimeoutError:
                        pass
                else:
                    await asyncio.sleep(self.poll_interval)

    async def _collect(self, part: Part, report: bool = True) -> Part | None:
        """Write the answers of an ended part; returns the part to run next without a line vLLM refused.
        `report`: its unanswered lines are a failure of this run (not when a new part will send them)."""
        path = await self.fetch(part)
        copies = self.copies_of(part)
        if path is not None:
            self.take_output(part, path, copies)
        part.status = PartStatus.COLLECTED
        self.store.save()
        if part.answered >= part.requests:
            part.message = None
            if part.stage not in ("COMPLETED", "CANCELED"):
                part.stage = "COMPLETED"
            self._measure(part)
            return None
        if part.cancelled:
            return None
        log = self.logs.get(part.id)
        refused = part.rejected if part.rejected is not None else (log.rejected[0] if log and log.rejected else None)
        if refused is not None and part.answered == 0 and part.restarts < MAX_RESTARTS and report:
            return self._without(part, refused, copies, log.rejected[1] if log and log.rejected else "")
        if part.message is None:
            part.message = log.tail() if log is not None else None
        if report:
            self.failures.append(part)
            self.work.stats.abandoned += max(0, part.requests - part.answered)  # sent, never answered
        return None

    def copies_of(self, part: Part) -> dict[str, list[str]]:
        found = self._copies.get(part.id)
        if found is None:
            found = self._copies[part.id] = self.store.copies(part)
        return found

    def take_output(self, part: Part, path: Path, copies: dict[str, list[str]] | None = None) -> None:
        """Write the answers the part's runner appended to `path` since the last call (all of them, the first
        time: `part.answered` counts from there)."""
        tail = self.outputs.get(part.id)
        if tail is None or tail.path != path:
            tail = self.outputs[part.id] = OutputTail(path)
            part.answered = 0
        if copies is None:
            copies = self.copies_of(part)
        for raw in tail.read():
            self.fresh[part.id] = self.fresh.get(part.id, 0) + self.collector.take(part, raw, copies, path)

    def _without(self, part: Part, line_no: int, copies: dict[str, list[str]], why: str) -> Part | None:
        """vLLM refused input line `line_no` of `part` (and wrote nothing): that request gets its error line,
        the others go to a new part."""
        writer = PartWriter(self.store, {}, None, restarts=part.restarts + 1)
        with open(self.store.path(part, "input.jsonl"), "rb") as f:
            for i, raw in enumerate((ln for ln in f if ln.strip()), 1):
                cid = str(orjson.loads(raw)["custom_id"])
                if i == line_no:
                    self.collector.refuse(cid, copies, "vLLM's batch runner refused this request: "
                                          f"{why or 'invalid'} (the other requests were run without it)")
                    continue
                if self.collector.done(cid):
                    continue
                writer.write_raw(part.model, raw.rstrip(b"\r\n"))
                if cid in copies:
                    writer.add_copies(part.model, cid, copies[cid])
        part.message = f"vLLM refused input line {line_no}: {why}"[:500]
        made = writer.close()
        self.store.save()
        return made[0] if made else None

    def _measure(self, part: Part) -> None:
        """A part answered in full by this run: its tokens/s (and start-up) for later estimates."""
        if self.fresh.get(part.id, 0) < part.requests:
            return
        total = part.billed_seconds if part.billed_seconds is not None else part.seconds()
        generating = part.elapsed or total  # the runner's clock has whole seconds: a short run reads 0
        record(self.key(part), part.model, part.tokens, generating, total - generating)

    def _failure(self, part: Part) -> str:
        where = f"part {part.id} ({part.model}, {part.requests} requests)"
        how = {"ERROR": "ended in ERROR", "CANCELED": "was cancelled"}.get(part.stage, f"ended ({part.stage})")
        if part.exit_code is not None:
            how = f"exited with code {part.exit_code}"
        detail = f": {part.message}" if part.message else ""
        return f"{self.runner_name} {where} {how} after {part.answered} answers{detail}"

    runner_name = "vLLM"  # "{runner_name} part p0001 (...) exited ..."
    runner_noun = "vLLM run"

    def _figures(self) -> None:
        """stats: each run's figures, the requests answered but not yet written, the cost, the bar's status."""
        stats = self.work.stats
        launched = [p for p in self.store.parts if p.status not in (PartStatus.WRITTEN, PartStatus.DROPPED)]
        stats.jobs = [p.figures() for p in launched]
        now = time.time()
        pending = 0
        for p in launched:
            per_minute, billed = self.price(p)
            seconds = p.billed_seconds if p.billed_seconds is not None else p.seconds(now)
            self.cost.set(p.id, p.flavor or "local", seconds, per_minute, billed=billed)
            if p.status in (PartStatus.RUNNING, PartStatus.LAUNCHING):
                pending += max(0, p.progress_done - p.answered)
        stats.engine_done = pending
        stats.engine_note = self.note(launched)

    def note(self, parts: list[Part]) -> str:
        """One short line for the progress bar."""
        running = [p for p in parts if p.status in (PartStatus.RUNNING, PartStatus.LAUNCHING)]
        if not running:
            return ""
        return " · ".join(f"{p.id} {p.stage} {p.progress_done}/{p.requests}" for p in running[:3])

    async def cleanup(self) -> None:
        """Every part is collected: its input and output files go (the logs and the state stay)."""
        for part in self.store.parts:
            for kind in ("input.jsonl", "output.jsonl", "copies.json"):
                try:
                    os.unlink(self.store.path(part, kind))
                except FileNotFoundError:
                    pass
