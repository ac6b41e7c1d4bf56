"""Local fake of the Hugging Face Inference Providers router (OpenAI-compatible) for tests and benchmarks."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import re
import signal
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
from aiohttp import web

from .threaded import OnAThread, listen

_ID_RE = re.compile(rb"\[\[id:([^\]]+)\]\]")
_FAULT_RE = re.compile(rb"\[\[fault:([^\]]*)\]\]")
_SLEEP_RE = re.compile(rb"\[\[sleep:([0-9.]+)\]\]")
_ROUTED = frozenset({"", "fastest", "cheapest", "preferred"})
_ERR_MSG = {400: "bad request", 403: "forbidden", 404: "not found", 500: "upstream error",
            502: "bad gateway", 503: "service unavailable", 504: "gateway timeout"}
_HF_401 = {"error": "Invalid credentials in Authorization header"}
_HF_402 = {"error": "You have depleted your monthly included credits. "
                    "Purchase pre-paid credits to continue using Inference Providers."}
_CHAT_PROVIDERS = [{"provider": p, "status": "live", "context_length": 8192,
                    "pricing": {"input": i, "output": o}, "supports_tools": False,
                    "supports_structured_output": False}
                   for p, i, o in (("fake-a", 0.2, 0.6), ("fake-b", 0.1, 0.3))]
_CATALOG = {"object": "list", "data": [
    {"id": "test-org/tiny-chat", "object": "model", "created": 1700000000, "owned_by": "test-org",
     "providers": _CHAT_PROVIDERS},
    {"id": "test-org/tiny-embed", "object": "model", "created": 1700000000, "owned_by": "test-org",
     "providers": [{"provider": "hf-inference", "status": "live"}]},
    # The models of samples/chat.jsonl, so that `make demo` shows a cost (made-up prices).
    *({"id": m, "object": "model", "created": 1700000000, "owned_by": m.split("/")[0],
       "providers": _CHAT_PROVIDERS} for m in ("meta-llama/Llama-3.1-8B-Instruct", "openai/gpt-oss-120b"))]}
_STAT_KEYS = ("held", "requests", "ok", "s400", "s401", "s402", "s403", "s404", "s429", "s500", "s502", "s503",
              "s504", "hang", "reset", "garbage", "dup_ok", "distinct_ok", "auth_missing")
_JSON = "application/json"
_NOT_OBJECTS = {"array": b"[1,2,3]", "string": b'"hello"', "number": b"42", "null": b"null"}
Payload = tuple[int, Any]
Builder = Callable[[dict[str, Any], str, int], Payload]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeConfig:
    latency: float = 0.0
    jitter: float = 0.0
    fail_429: float = 0.0
    retry_after: str = "0"
    fail_500: float = 0.0
    fail_503: float = 0.0
    hang: float = 0.0
    reset: float = 0.0
    garbage: float = 0.0
    fail_402_after: int | None = None
    fail_401: bool = False
    require_token: bool = False
    seed: int = 1234
    max_inflight: int = 0
    stable: bool = False  # one request, the same body bytes (its id from the body, created fixed): to compare engines

    def update(self, values: dict[str, Any]) -> None:
        """Set fields from a JSON/CLI dict, coercing types; an unknown name raises KeyError."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if unknown := values.keys() - defaults.keys():
            raise KeyError(f"unknown FakeConfig fields: {sorted(unknown)}")
        for name, value in values.items():
            default = defaults[name]
            if name == "fail_402_after":
                value = None if value in (None, "", "none", "None") else int(value)
            elif isinstance(default, bool):
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif isinstance(default, int | float | str):
                value = type(default)(value)
            setattr(self, name, value)


def _oai_err(msg: str, type_: str = "invalid_request_error", param: str | None = None,
             code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": msg, "type": type_, "param": param, "code": code}}


def _fault_body(status: int) -> dict[str, Any]:
    if status in (401, 402):
        return _HF_401 if status == 401 else _HF_402
    if status == 429:
        return _oai_err("rate limited", "rate_limit_error", None, "rate_limit_exceeded")
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return _oai_err(_ERR_MSG.get(status, "error"), kind)


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(p["text"]) for p in content if isinstance(p, dict) and "text" in p)
    return content if isinstance(content, str) else ""


def _max_tokens(body: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return max(0, min(8, value))
    return 8


def _texts(value: Any) -> list[str] | None:
    """Normalise an embeddings/completions input to a list of texts (a token list becomes its JSON)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, int) for v in value):
        return [orjson.dumps(value).decode()]
    if not all(isinstance(v, str | list) for v in value):
        return None
    return [v if isinstance(v, str) else orjson.dumps(v).decode() for v in value]


@lru_cache(maxsize=8192)
def _vector(text: str) -> list[float]:
    d = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return [round(int.from_bytes(d[i:i + 2], "little") / 32767.5 - 1.0, 6) for i in range(0, 16, 2)]


def _usage(p: int, c: int) -> dict[str, int]:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chat(body: dict[str, Any], model: str, n: int) -> Payload:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return 400, _oai_err("'messages' must be a non-empty list", param="messages")
    text = _text_of(msgs[-1].get("content") if isinstance(msgs[-1], dict) else None)[:64]
    message = {"role": "assistant", "content": f"echo: {text}"}
    return 200, {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                 "model": model, "choices": [{"index": 0, "message": message, "finish_reason": "stop",
                                              "logprobs": None}],
                 "usage": _usage(10 + len(orjson.dumps(msgs)) // 4,
                                 _max_tokens(body, "max_tokens", "max_completion_tokens"))}


def _responses(body: dict[str, Any], model: str, n: int) -> Payload:
    inp = body.get("input")
    if isinstance(inp, str) or (isinstance(inp, list) and inp):
        last = inp if isinstance(inp, str) else inp[-1]
        text = _text_of(last.get("content") if isinstance(last, dict) else last)[:64]
    else:
        return 400, _oai_err("'input' is required", param="input")
    p, c = 10 + len(orjson.dumps(inp)) // 4, _max_tokens(body, "max_output_tokens")
    content = [{"type": "output_text", "text": f"echo: {text}", "annotations": []}]
    return 200, {
        "id": f"resp_{n}", "object": "response", "created_at": int(time.time()), "status": "completed",
        "model": model, "output": [{"type": "message", "id": f"msg_{n}", "status": "completed",
                                    "role": "assistant", "content": content}],
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
        "incomplete_details": None, "instructions": body.get("instructions"), "metadata": {},
        "usage": {"input_tokens": p, "output_tokens": c, "total_tokens": p + c,
                  "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}}}


def _embeddings(body: dict[str, Any], model: str, n: int) -> Payload:
    texts = _texts(body.get("input"))
    if texts is None:
        return 400, _oai_err("'input' must be a string or a non-empty list", param="input")
    vecs: list[Any] = [_vector(t) for t in texts]
    if body.get("encoding_format") == "base64":  # what the openai SDK asks for by default
        import base64
        import struct
        vecs = [base64.b64encode(struct.pack("<8f", *v)).decode() for v in vecs]
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
    k = 5 * len(texts)
    return 200, {"object": "list", "data": data, "model": model,
                 "usage": {"prompt_tokens": k, "total_tokens": k}}


def _completions(body: dict[str, Any], model: str, n: int) -> Payload:
    texts = _texts(body.get("prompt"))
    if texts is None:
        return 400, _oai_err("'prompt' must be a string or a non-empty list", param="prompt")
    choices = [{"index": i, "text": f"echo: {t[:64]}", "finish_reason": "stop", "logprobs": None}
               for i, t in enumerate(texts)]
    p, c = 10 + len(orjson.dumps(body["prompt"])) // 4, _max_tokens(body, "max_tokens") * len(texts)
    return 200, {"id": f"cmpl-{n}", "object": "text_completion", "created": int(time.time()), "model": model,
                 "choices": choices, "usage": _usage(p, c)}


def _feature_extraction(body: dict[str, Any], model: str, n: int) -> Payload:
    inputs = body.get("inputs")
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return 400, {"error": "'inputs' must be a string or a non-empty list of strings"}
    return 200, [_vector(t) for t in texts]


def _hf_task(body: dict[str, Any], model: str, n: int) -> Payload:
    """hf-inference's task route: text-classification for models named *classif*, else summarization."""
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        return 400, {"error": "'inputs' must be a non-empty string"}
    if "classif" in model:
        pos = (len(inputs) % 10) / 10
        return 200, [[{"label": "POSITIVE", "score": pos}, {"label": "NEGATIVE", "score": round(1 - pos, 6)}]]
    return 200, [{"summary_text": inputs[:32]}]


class FakeProvider:
    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config if config is not None else FakeConfig()
        self.stats: dict[str, Any] = {}
        self._n = 0
        self._runner: web.AppRunner | None = None
        self._hanging: set[asyncio.Transport] = set()
        self._released = asyncio.Event()  # lets [[hold]] requests go (release())
        self.bodies: list[Any] | None = None  # record(): every inference body received
        # {provider: status}: every request pinned to that provider (model:provider) is answered with the status,
        # whatever its body (a provider that is down)
        self.down: dict[str, int] = {}
        self.reset_stats()

    def record(self) -> list[Any]:
        """Keep every inference request's body from now on (parsed JSON; None when it is not JSON), in arrival
        order; returns that list."""
        self.bodies = []
        return self.bodies

    def release(self) -> None:
        """Answer the requests marked [[hold]] (those waiting and those to come)."""
        self._released.set()

    def reset_stats(self) -> None:
        """Zero the counters, forget scripted-fault attempts and seen markers, reseed the RNGs."""
        inflight = self.stats.get("inflight", 0)  # requests still running will decrement it
        self.stats = dict.fromkeys(_STAT_KEYS, 0)
        self.stats.update(inflight=inflight, max_inflight=inflight, paths={}, models={}, providers={})
        self._attempts: dict[bytes, int] = {}
        self._seen: set[bytes] = set()
        self._reseed()

    def _reseed(self) -> None:
        self._rng, self._jitter_rng = random.Random(self.config.seed), random.Random(self.config.seed + 1)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the stats (nested dicts copied too)."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self.stats.items()}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        add = app.router.add_route
        for path, builder in (("/v1/chat/completions", _chat), ("/v1/responses", _responses),
                              ("/v1/embeddings", _embeddings), ("/v1/completions", _completions),
                              ("/hf-inference/models/{org}/{name}/pipeline/feature-extraction",
                               _feature_extraction), ("/hf-inference/models/{org}/{name}", _hf_task)):
            add("POST", path, self._route(builder, hf=path.startswith("/hf-")))
        add("GET", "/v1/models", self._models)
        for path in ("{name}", "{org}/{name}", "{org}/{name}/revision/{rev}"):
            add("GET", "/api/models/" + path, self._hub_model)
        add("GET", "/__stats", self._control)
        add("POST", "/__reset", self._control)
        add("*", "/__config", self._control)
        add("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._runner, bound = await listen(self.app(), host, port)
        return bound

    async def stop(self) -> None:
        for transport in list(self._hanging):  # a stopping server drops hanging connections at once
            transport.abort()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None,
              body: bytes | None = None) -> web.Response:
        self._n += 1
        h = {"x-request-id": f"req_{self._n}", **(headers or {})}
        return web.Response(status=status, body=orjson.dumps(payload) if body is None else body,
                            content_type=_JSON, headers=h)

    def _route(self, builder: Builder, hf: bool) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            st = self.stats
            st["inflight"] += 1
            st["max_inflight"] = max(st["max_inflight"], st["inflight"])
            try:
                return await self._infer(request, builder, hf)
            finally:
                self.stats["inflight"] -= 1  # self.stats, not st: reset_stats may have swapped the dict

        return handler

    async def _infer(self, request: web.Request, builder: Builder, hf: bool) -> web.StreamResponse:
        raw = await request.read()
        st, cfg = self.stats, self.config
        st["requests"] += 1
        paths = st["paths"]
        paths[request.path] = paths.get(request.path, 0) + 1
        auth = request.headers.get("authorization", "")
        has_token = auth[:7].lower() == "bearer " and bool(auth[7:].strip())
        st["auth_missing"] += not has_token
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        if self.bodies is not None:
            self.bodies.append(body)
        model = provider = pinned = ""
        if hf:
            model, provider = f"{request.match_info['org']}/{request.match_info['name']}", "hf-inference"
        elif isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:
            base, _, suffix = body["model"].rpartition(":")
            model, suffix = (base, suffix) if base else (suffix, "")
            pinned = "" if suffix in _ROUTED else suffix
            provider = pinned or "fake-b"
        headers = {"x-inference-provider": provider} if provider else {}
        if model:
            st["models"][model] = st["models"].get(model, 0) + 1
            st["providers"][provider] = st["providers"].get(provider, 0) + 1
        if pinned in self.down:
            return self._status(self.down[pinned], headers)
        if cfg.fail_401 or (cfg.require_token and not has_token):
            return self._status(401, headers)
        if 0 < cfg.max_inflight < st["inflight"]:
            return self._status(429, headers)
        if cfg.fail_402_after is not None and st["ok"] >= cfg.fail_402_after:
            return self._status(402, headers)
        outcome, delay, marker = None, cfg.latency, None
        if b"[[" in raw:
            if m := _FAULT_RE.search(raw):
                key = hashlib.sha1(raw).digest()
                i = self._attempts[key] = self._attempts.get(key, -1) + 1
                items = [x.strip().decode() for x in m.group(1).split(b",") if x.strip()]
                outcome = items[i] if i < len(items) else "ok"
                if outcome != "ok":
                    return await self._fault(outcome, request, headers)
            if m := _SLEEP_RE.search(raw):
                try:
                    delay += float(m.group(1))
                except ValueError:
                    pass
            if m := _ID_RE.search(raw):
                marker = m.group(1)
            if b"[[hold]]" in raw:  # answered only once the test calls release(): event-driven, no fixed sleep
                self.stats["held"] += 1
                await self._released.wait()
        if outcome is None:  # scripted bodies take no random fault; draw on arrival, deliver after the delay
            r, acc = self._rng.random(), 0.0
            for name, frac in (("429", cfg.fail_429), ("500", cfg.fail_500), ("503", cfg.fail_503),
                               ("hang", cfg.hang), ("reset", cfg.reset), ("garbage", cfg.garbage)):
                acc += frac
                if frac > 0 and r < acc:
                    outcome = name
                    break
        if cfg.jitter > 0:
            delay += self._jitter_rng.uniform(0.0, cfg.jitter)
        if delay > 0:
            await asyncio.sleep(delay)
        if outcome is not None and outcome != "ok":
            return await self._fault(outcome, request, headers)
        status, payload = self._answer(body, model, builder, hf)
        st = self.stats
        if status != 200:
            st[f"s{status}"] = st.get(f"s{status}", 0) + 1
        else:
            st["ok"] += 1
            if marker is not None:
                st["dup_ok"] += marker in self._seen
                self._seen.add(marker)
                st["distinct_ok"] = len(self._seen)
        return self._json(status, payload, headers)

    def _answer(self, body: Any, model: str, builder: Builder, hf: bool) -> Payload:
        if not isinstance(body, dict):
            return 400, {"error": "invalid JSON body"} if hf else _oai_err("body must be a JSON object")
        if not hf:
            if not model:
                return 400, _oai_err("'model' is required", param="model")
            if body.get("stream") is True:
                return 400, _oai_err("streaming is not supported by this server", param="stream")
            if model.startswith("NonExist") or model.rpartition("/")[2].startswith("NonExist"):
                return 400, _oai_err(f"The requested model '{model}' is not supported by any provider you "
                                     "have enabled.", param="model", code="model_not_supported")
        if self.config.stable:
            status, payload = builder(body, model, zlib.crc32(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)))
            for key in ("created", "created_at"):
                if isinstance(payload, dict) and key in payload:
                    payload[key] = 1700000000
            return status, payload
        return builder(body, model, self._n + 1)  # n matches the x-request-id that _json assigns next

    def _status(self, status: int, headers: dict[str, str]) -> web.Response:
        key = f"s{status}"
        self.stats[key] = self.stats.get(key, 0) + 1
        if status == 429 and self.config.retry_after != "":
            headers = {**headers, "Retry-After": self.config.retry_after}
        return self._json(status, _fault_body(status), headers)

    async def _fault(self, outcome: str, request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        if outcome == "hang":
            self.stats["hang"] += 1
            transport = request.transport
            if transport is not None:
                self._hanging.add(transport)
            try:
                await asyncio.Event().wait()  # cancelled when the client goes away or the server stops
            finally:
                if transport is not None:
                    self._hanging.discard(transport)
        if outcome == "reset":
            self.stats["reset"] += 1
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never reaches the client: writing to an aborted transport fails
        if outcome == "garbage":
            self.stats["garbage"] += 1
            return self._json(200, None, headers, body=b"<html>bad gateway")
        if outcome in _NOT_OBJECTS:  # a 2xx that is JSON but not an object
            self.stats["garbage"] += 1
            return self._json(200, None, headers, body=_NOT_OBJECTS[outcome])
        return self._status(int(outcome) if outcome.isdigit() else 500, headers)

    async def _models(self, request: web.Request) -> web.Response:
        self.stats["paths"]["/v1/models"] = self.stats["paths"].get("/v1/models", 0) + 1
        return self._json(200, _CATALOG)

    async def _hub_model(self, request: web.Request) -> web.Response:
        info = request.match_info
        repo = f"{info['org']}/{info['name']}" if "org" in info else info["name"]
        name = repo.rpartition("/")[2]
        if name.startswith("NonExist"):
            return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        chat = "chat" in name
        tag, task = ("text-generation", "conversational") if chat else ("feature-extraction",) * 2
        if "classif" in name or "summar" in name:
            tag = task = "text-classification" if "classif" in name else "summarization"
            chat = True  # a single pipeline tag
        return self._json(200, {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
            "pipeline_tag": tag, "tags": [tag] if chat else [tag, "sentence-similarity"], "private": False,
            "inferenceProviderMapping": {"hf-inference": {"status": "live", "providerId": repo, "task": task,
                                                          "isModelAuthor": False}}})

    async def _control(self, request: web.Request) -> web.Response:
        if request.path == "/__reset":
            self.reset_stats()
        elif request.path == "/__config":
            if request.method == "POST":
                try:
                    values = orjson.loads(await request.read())
                    self.config.update(values)  # AttributeError when not a JSON object
                except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
                    return self._json(400, _oai_err(f"bad config: {exc!r}"))
                if "seed" in values:
                    self._reseed()
            return self._json(200, dataclasses.asdict(self.config))
        return self._json(200, self.snapshot())

    async def _not_found(self, request: web.Request) -> web.Response:
        return self._json(404, _oai_err(f"no route for {request.method} {request.path}", code="not_found"))


class ThreadedFakeProvider(OnAThread):
    """A FakeProvider served from a daemon thread with its own event loop (for synchronous tests)."""

    def __init__(self, config: FakeConfig | None = None, provider: FakeProvider | None = None) -> None:
        self.provider = provider if provider is not None else FakeProvider(config)
        super().__init__(self.provider, "fake-provider")

    def release(self) -> None:
        """Answer the requests marked [[hold]] (waiting and future ones)."""
        self.call(self.provider.release)

    def stats(self) -> dict[str, Any]:
        return dict(self.call(self.provider.snapshot))

    def reset_stats(self) -> None:
        self.call(self.provider.reset_stats)


def serve(port: int, host: str = "127.0.0.1", config: FakeConfig | None = None) -> None:
    """Blocking: run until SIGINT/SIGTERM; print 'fake provider listening on http://HOST:PORT' to stderr."""

    async def run() -> None:
        fake, stop, loop = FakeProvider(config), asyncio.Event(), asyncio.get_running_loop()
        bound = await fake.start(host, port)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"fake provider listening on http://{host}:{bound}", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            await fake.stop()

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m hfbatch.fake_provider [--port 8765] [--latency 0.05] [--fail-429 0.1] ..."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hfbatch.fake_provider", description=__doc__)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--host", default="127.0.0.1")
    names = [f.name for f in dataclasses.fields(FakeConfig)]
    for name in names:
        parser.add_argument("--" + name.replace("_", "-"), dest=name)
    args = vars(parser.parse_args(argv))
    config = FakeConfig()
    config.update({k: args[k] for k in names if args[k] is not None})
    serve(args["port"], args["host"], config)


if __name__ == "__main__":
    main()
