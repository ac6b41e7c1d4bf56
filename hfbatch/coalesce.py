"""Coalesce stage (--coalesce N): single-input /v1/embeddings requests -> one request with a list input; its
answer -> one per line. `Packs` groups live requests (up to N, or until a group has waited 50 ms).

`coalesce_key` says which bodies may share a request (same model, same input kind, same other parameters),
`pack` builds the request (packing.Packs groups the bodies) and `split` turns the CreateEmbeddingResponse
back into one CreateEmbeddingResponse per packed body, each holding its embedding at index 0, with the usage
split so the parts sum exactly to what the provider reported.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any, Protocol

import orjson

from .models import Answer, NoAnswer, Outcome, Request, Success
from .routing import Route, Router, Unroutable
from .summary import Stats, usage_tokens

_TEXT = b"text:"
_TOKENS = b"tokens:"


def _is_token_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


def coalesce_key(req_body: dict[str, Any]) -> tuple[str, bytes] | None:
    """(model, canonical bytes of the other parameters and of the input kind) when `req_body` is a single-input
    embeddings body, i.e. `input` is one non-empty string or one non-empty list of ints (one token array);
    else None. Bodies with equal keys may be packed together: strings are never packed with token arrays.
    Empty inputs are left alone so that the provider's error lands on their own line only."""
    model = req_body.get("model")
    inp = req_body.get("input")
    if not isinstance(model, str):
        return None
    if isinstance(inp, str) and inp:
        kind = _TEXT
    elif _is_token_array(inp):
        kind = _TOKENS
    else:
        return None
    rest = {k: v for k, v in req_body.items() if k not in ("input", "model")}
    return model, kind + orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)


def input_weight(req_body: dict[str, Any]) -> int:
    """The size of a single input, for `split(weights=...)`: characters of a string, tokens of a token array."""
    inp = req_body.get("input")
    return len(inp) if isinstance(inp, str | list) else 0


def pack(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """One embeddings body: the shared parameters (in the first body's key order) and `input` = the list of
    each body's single input, in order. Raises ValueError if the bodies do not all have the same coalesce_key."""
    if not bodies:
        raise ValueError("nothing to pack")
    key = coalesce_key(bodies[0])
    if key is None:
        raise ValueError("not a single-input embeddings body")
    for b in bodies[1:]:
        if coalesce_key(b) != key:
            raise ValueError("bodies with different models or parameters cannot be packed together")
    packed = dict(bodies[0])
    packed["input"] = [b["input"] for b in bodies]
    return packed


def apportion(total: int, weights: list[int]) -> list[int]:
    """Split the integer `total` proportionally to `weights` (evenly when they are all 0) by the
    largest-remainder method: non-negative integers summing exactly to `total`; ties go to the earlier part."""
    n = len(weights)
    if n == 0:
        raise ValueError("no parts to split into")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative")
    if total < 0:
        raise ValueError("cannot split a negative total")
    if sum(weights) == 0:
        weights = [1] * n
    wsum = sum(weights)
    shares = [total * w // wsum for w in weights]
    left = total - sum(shares)
    by_remainder = sorted(range(n), key=lambda i: (-(total * weights[i] % wsum), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares


def _split_usage(usage: dict[str, Any], weights: list[int]) -> list[dict[str, Any]]:
    """Every non-negative int is apportioned (nested dicts too); total_tokens is prompt_tokens + the apportioned
    rest, so each part keeps total >= prompt; other values are copied."""
    n = len(weights)
    parts: list[dict[str, Any]] = [{} for _ in range(n)]
    for name, value in usage.items():
        if isinstance(value, dict):
            columns: list[Any] = _split_usage(value, weights)
        elif type(value) is int and value >= 0:
            columns = apportion(value, weights)
        else:
            columns = [value] * n
        for part, v in zip(parts, columns, strict=True):
            part[name] = v
    prompt, total = usage.get("prompt_tokens"), usage.get("total_tokens")
    if type(prompt) is int and type(total) is int and total >= prompt >= 0:
        for part, extra in zip(parts, apportion(total - prompt, weights), strict=True):
            part["total_tokens"] = part["prompt_tokens"] + extra
    return parts


def split(answer: dict[str, Any], n: int, weights: list[int] | None = None) -> list[dict[str, Any]]:
    """An OpenAI CreateEmbeddingResponse for `n` packed inputs -> `n` CreateEmbeddingResponse bodies; the i-th
    holds `data[index == i]` re-indexed to 0 and the answer's other fields (object, model, ...).

    Usage: every integer counter is split proportionally to `weights` (one per input, e.g. `input_weight` of
    each packed body: characters of a text, tokens of a token array), or evenly when `weights` is None or all 0,
    by the largest-remainder method, so the parts sum exactly to the original totals. An answer without
    `usage` gives parts without `usage`. Raises ValueError unless the answer holds exactly `n` embeddings
    with indexes 0..n-1."""
    if n < 1:
        raise ValueError("n must be at least 1")
    if weights is None:
        weights = [1] * n
    elif len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} inputs")
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or len(data) != n:
        got = len(data) if isinstance(data, list) else "no"
        raise ValueError(f"expected {n} embeddings in the answer, got {got}")
    by_index: dict[int, dict[str, Any]] = {}
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < n or index in by_index:
            raise ValueError(f"embedding indexes must be 0..{n - 1}, each once; got {index!r}")
        by_index[index] = item
    usage = answer.get("usage")
    usages = _split_usage(usage, weights) if isinstance(usage, dict) else None
    shared = {k: v for k, v in answer.items() if k not in ("data", "usage")}
    parts: list[dict[str, Any]] = []
    for i in range(n):
        body = dict(shared)
        body["data"] = [{**by_index[i], "index": 0}]
        if usages is not None:
            body["usage"] = usages[i]
        parts.append(body)
    return parts


# -- packing live requests (--coalesce N) ----------------------------------------------------------------

SOLO = NoAnswer("solo", "")  # a pack member told to go on alone


class PackSender(Protocol):
    """What a pack needs from the executor that owns it (executor.Executor)."""

    router: Router
    stats: Stats

    async def send(self, req: Request, route: Route) -> Outcome | None: ...

    def answer_of(self, req: Request, route: Route, o: Outcome) -> Answer: ...

    def account(self, req: Request, route: Route, o: Outcome, usage_of: object) -> None: ...

    def internal_error(self, e: BaseException) -> None: ...


class _Pack:
    """Single-input embeddings requests waiting to be sent as one."""

    __slots__ = ("members", "timer")

    def __init__(self) -> None:
        self.members: list[tuple[Request, asyncio.Future[Answer | None]]] = []
        self.timer: asyncio.TimerHandle | None = None


class Packs:
    """The open packs of one run; `join(req)` waits for this member's share of its pack's answer."""

    def __init__(self, sender: PackSender, size: int, wait: float = 0.05) -> None:
        self.sender = sender
        self.size = size
        self.wait = wait  # seconds a partial pack waits for more members
        self.packs: dict[tuple[str, bytes], _Pack] = {}

    async def join(self, req: Request) -> Answer | None:
        """Join a pack of identical-parameter embeddings requests; returns this member's answer, None
        (stopped: no line), or SOLO (send it alone)."""
        key = coalesce_key(req.body)
        if key is None:
            return SOLO
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Answer | None] = loop.create_future()
        pack = self.packs.get(key)
        if pack is None:
            pack = self.packs[key] = _Pack()
            pack.timer = loop.call_later(self.wait, self._flush, key)
        pack.members.append((req, fut))
        if len(pack.members) >= self.size:
            self._flush(key)
        return await fut

    def _flush(self, key: tuple[str, bytes]) -> None:
        pack = self.packs.pop(key, None)
        if pack is None:
            return
        if pack.timer is not None:
            pack.timer.cancel()
        if len(pack.members) == 1:
            pack.members[0][1].set_result(SOLO)
            return
        task = asyncio.ensure_future(self._send(pack.members))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.sender.internal_error(task.exception())  # type: ignore[arg-type]

    async def _send(self, members: list[tuple[Request, asyncio.Future[Answer | None]]]) -> None:
        reqs = [r for r, _ in members]
        answers: list[Answer | None] = [SOLO] * len(members)
        sender = self.sender
        try:
            lead = reqs[0]
            body = pack([r.body for r in reqs])
            route = await sender.router.route(replace(lead, body=body))
            if isinstance(route, Unroutable):
                answers = [NoAnswer(route.code, route.message)] * len(reqs)
                return
            outcome = await sender.send(lead, route)
            if outcome is None:
                answers = [None] * len(reqs)
                return
            status = outcome.status
            if status is not None and 200 <= status < 300 and outcome.parsed is not None:
                answer = route.adapt(outcome.parsed, lead) if route.adapt is not None else outcome.parsed
                try:
                    if not isinstance(answer, dict):
                        raise ValueError("not an embeddings answer")
                    parts = split(answer, len(reqs), weights=[input_weight(r.body) for r in reqs])
                except ValueError:
                    return  # an answer we cannot split: every member goes alone
                sender.stats.latency.add(outcome.latency)
                request_id = outcome.request_id or "req_" + os.urandom(12).hex()
                answers = []
                for r, part in zip(reqs, parts, strict=True):
                    sender.account(r, route, outcome, part)
                    answers.append(Success(status, request_id, part, usage_tokens(part)))
                sender.stats.coalesced += len(reqs) - 1
                return
            if status is not None and 400 <= status < 500 and status != 429:
                return  # one bad input fails a pack: let each member get its own answer
            sender.stats.latency.add(outcome.latency)
            answers = [sender.answer_of(lead, route, outcome)] * len(reqs)
        except Exception as e:  # noqa: BLE001 - a bug: no member is sent or written, the run stops
            answers = [None] * len(reqs)
            sender.internal_error(e)
        finally:
            for (_, fut), res in zip(members, answers, strict=True):
                if not fut.done():
                    fut.set_result(res)
