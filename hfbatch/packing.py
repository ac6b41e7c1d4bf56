"""Coalesce stage (--coalesce N): single-input embeddings requests with the same model and parameters
-> one request with a list input -> one answer split back per custom_id."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .models import Request
from .routing import Unroutable
from .summary import usage_tokens

if TYPE_CHECKING:
    from .executor import Executor, Result

SOLO = ("solo",)  # a pack member told to go on alone


class _Pack:
    """Single-input embeddings requests waiting to be sent as one (--coalesce)."""

    __slots__ = ("members", "timer")

    def __init__(self) -> None:
        self.members: list[tuple[Request, asyncio.Future[Result | None]]] = []
        self.timer: asyncio.TimerHandle | None = None



class Packs:
    """The open packs of one run; `join(req)` waits for this member's share of its pack's answer."""

    def __init__(self, executor: Executor, wait: float = 0.05) -> None:
        self.ex = executor
        self.wait = wait  # seconds a partial pack waits for more members
        self.packs: dict[Any, _Pack] = {}

    async def join(self, req: Request) -> Result | None:
        """Join a pack of identical-parameter embeddings requests; returns this member's result, None
        (stopped: no line), or SOLO (send it alone)."""
        from .coalesce import coalesce_key

        key = coalesce_key(req.body)
        if key is None:
            return SOLO
        fut: asyncio.Future[Result | None] = asyncio.get_running_loop().create_future()
        pack = self.packs.get(key)
        if pack is None:
            pack = self.packs[key] = _Pack()
            pack.timer = asyncio.get_running_loop().call_later(self.wait, self._flush, key)
        pack.members.append((req, fut))
        if len(pack.members) >= (self.ex.limits.coalesce or 1):
            self._flush(key)
        return await fut

    def _flush(self, key: Any) -> None:
        pack = self.packs.pop(key, None)
        if pack is None:
            return
        if pack.timer is not None:
            pack.timer.cancel()
        if len(pack.members) == 1:
            pack.members[0][1].set_result(SOLO)
            return
        task = asyncio.ensure_future(self._send(pack.members))
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())

    async def _send(self, members: list[tuple[Request, asyncio.Future[Result | None]]]) -> None:
        from .coalesce import input_weight, pack, split

        reqs = [r for r, _ in members]
        results: list[Any] = [SOLO] * len(members)
        try:
            lead = reqs[0]
            body = pack([r.body for r in reqs])
            route = await self.ex.router.route(replace(lead, body=body))
            if isinstance(route, Unroutable):
                results = [("error", route.code, route.message)] * len(reqs)
                return
            outcome = await self.ex._send(lead, route)
            if outcome is None:
                results = [None] * len(reqs)
                return
            status = outcome.status
            if status is not None and 200 <= status < 300 and outcome.parsed is not None:
                answer = route.adapt(outcome.parsed, lead) if route.adapt is not None else outcome.parsed
                try:
                    parts = split(answer, len(reqs), weights=[input_weight(r.body) for r in reqs])
                except ValueError:
                    return  # an answer we cannot split: every member goes alone
                self.ex.stats.latency.add(outcome.latency)
                request_id = outcome.request_id or "req_" + os.urandom(12).hex()
                results = []
                for r, part in zip(reqs, parts, strict=True):
                    tokens = usage_tokens(part)
                    results.append(("ok", status, request_id, part, tokens))
                    self.ex.stats.add_usage(part)
                    self.ex.stats.providers[outcome.provider or "unknown"] += 1
                    if self.ex.hooks is not None:
                        self.ex.hooks.answered(r, route, outcome, part)
                self.ex.stats.coalesced += len(reqs) - 1
                return
            if status is not None and 400 <= status < 500 and status != 429:
                return  # one bad input fails a pack: let each member get its own answer
            self.ex.stats.latency.add(outcome.latency)
            result = self.ex._result_of(lead, route, outcome)
            results = [result] * len(reqs)
        finally:
            for (_, fut), res in zip(members, results, strict=True):
                if not fut.done():
                    fut.set_result(res)

