"""vLLM's batch runner's lines, read: its output lines -> OpenAI's answers, its progress and log lines -> figures, and
the lines it accepts at all (engine_rule). Pure text in, records out: no files, no processes (vllm_parts runs the
parts; engines/vllm.py, hf_jobs.py and the Ray engine's GPU mode run the runner).

What vLLM's runner writes (vllm/entrypoints/launchers/run_batch.py; docs/architecture.md): a success is `{"id":
"vllm-…", "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error": null}`, a model error has
`body: null` and `error: {"error": {message, type, param, code}}` (older versions: the fields flat), an unsupported
url or stream `status_code: 400` and `error` a plain string; progress goes to stderr as `Running batch: NN%
Completed | n/total [elapsed<remaining, rate]`; one invalid input line aborts the run ("Invalid request on line N").
"""

from __future__ import annotations

import os
import re
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..models import Answer, Failure, NoAnswer, Success
from ..outcomes import error_type
from ..routing import split_model
from ..summary import usage_tokens
from ..validate import EngineRule

# vLLM's batch runner serves these urls (the chat and embeddings urls exactly, score and rerank by suffix).
VLLM_URLS = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/audio/transcriptions",
                       "/v1/audio/translations"})
LOG_TAIL = 40  # log lines kept per part (the tail an error report shows)
_PROGRESS_RE = re.compile(
    r"Running batch:\s*(\d+)%\s*Completed\s*\|\s*(\d+)/(\d+)\s*\[([^<\]]*)<([^,\]]*),?\s*([^\]]*)\]")
_REJECTED_RE = re.compile(r"Invalid request on line (\d+)\s*:?\s*(.*)")
_INTERVAL_RE = re.compile(r"^(?:(\d+)d,?\s*)?(?:(\d+):)?(\d+):(\d+)$")


def serves(url: str) -> bool:
    """Does vLLM's batch runner serve this (normalized) url?"""
    return url in VLLM_URLS or url.endswith(("/score", "/rerank"))


def engine_rule(engine: str) -> EngineRule:
    """The lines an engine running vLLM's batch runner refuses before anything runs: urls it does not serve
    (they name --engine http) and bodies it would refuse as a whole run."""

    def rule(url: str, body: dict[str, Any]) -> tuple[str, str] | None:
        if not serves(url):
            return "url", (f"url {url} is not served by vLLM's batch runner (--engine {engine}): it serves "
                           "/v1/chat/completions, /v1/embeddings, /score, /rerank and /v1/audio/transcriptions|"
                           "translations; run this file with --engine http")
        if url == "/v1/chat/completions" and not (isinstance(body.get("messages"), list) and body["messages"]):
            return "body.messages", ("body.messages must be a non-empty list (vLLM's batch runner refuses the "
                                     "whole run for one such line)")
        if url == "/v1/embeddings" and body.get("input") in (None, "", []):
            return "body.input", ("body.input is missing or empty (vLLM's batch runner refuses the whole run "
                                  "for one such line)")
        return None

    return rule


def vllm_model(model: str) -> str:
    """The model as vLLM serves it: a router suffix (`:fastest`, `:<provider>`) is dropped."""
    return split_model(model)[0]


# -- progress and log lines ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """One `Running batch: NN% Completed | n/total [elapsed<remaining, rate]` line."""

    done: int
    total: int
    elapsed: float | None  # seconds since the runner started answering
    rate: str


def parse_progress(line: str) -> Progress | None:
    m = _PROGRESS_RE.search(line)
    if m is None:
        return None
    return Progress(int(m.group(2)), int(m.group(3)), parse_interval(m.group(4).strip()), m.group(6).strip())


def parse_interval(text: str) -> float | None:
    """tqdm's `MM:SS`, `H:MM:SS` or `Nd, H:MM:SS` -> seconds."""
    m = _INTERVAL_RE.match(text)
    if m is None:
        return None
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


def rejected_line(line: str) -> tuple[int, str] | None:
    """vLLM's "Invalid request on line N: why" -> (N, why)."""
    m = _REJECTED_RE.search(line)
    return (int(m.group(1)), m.group(2).strip()) if m else None


# -- vLLM's answers as OpenAI's -----------------------------------------------------------------------


def convert(obj: dict[str, Any], raw: bytes) -> tuple[Answer, dict[str, Any] | None]:
    """One vLLM output line -> (the answer to write, the 2xx body for usage | None).

    2xx with a body: a Success with vLLM's body bytes passed through (our line id replaces vLLM's; its
    request_id is kept). Any other status: a Failure whose body is OpenAI's error envelope built from vLLM's
    error (nested, flat or a plain string). No response at all: a NoAnswer."""
    resp, err = obj.get("response"), obj.get("error")
    status = resp.get("status_code") if isinstance(resp, dict) else None
    request_id = resp.get("request_id") if isinstance(resp, dict) else None
    if not isinstance(request_id, str) or not request_id:
        request_id = "vllm-batch-" + os.urandom(12).hex()
    body = resp.get("body") if isinstance(resp, dict) else None
    if isinstance(status, int) and not isinstance(status, bool) and 200 <= status < 300:
        if isinstance(body, dict):
            return Success(status, request_id, _raw_body(raw) or body, usage_tokens(body)), body
        return NoAnswer("invalid_response", f"vLLM answered HTTP {status} without a body"), None
    if not isinstance(status, int) or isinstance(status, bool) or status < 100:
        return NoAnswer("invalid_response", f"vLLM wrote no HTTP answer for this request: {_message(err)}"), None
    return Failure(status, request_id, envelope(status, err)), None


def envelope(status: int, err: object) -> dict[str, Any]:
    """vLLM's error (`{"error": {...}}`, the fields flat, or a string) in OpenAI's envelope; vLLM's numeric code
    is the HTTP status, not one of OpenAI's codes: it is dropped (the status is in the line)."""
    e = err.get("error") if isinstance(err, dict) and isinstance(err.get("error"), dict) else err
    param = e.get("param") if isinstance(e, dict) else None
    code = e.get("code") if isinstance(e, dict) else None
    return {"error": {"message": _message(err), "type": error_type(status),
                      "param": param if isinstance(param, str) else None,
                      "code": code if isinstance(code, str) else None}}


def _message(err: object) -> str:
    e = err.get("error") if isinstance(err, dict) and isinstance(err.get("error"), dict) else err
    if isinstance(e, dict) and isinstance(e.get("message"), str):
        return str(e["message"])
    if isinstance(e, str) and e:
        return e
    return "no error message" if e is None else orjson.dumps(e).decode()[:1000]


_BODY_TAIL = b'},"error":null}'


def _raw_body(raw: bytes) -> orjson.Fragment | None:
    """vLLM's body bytes as written (pydantic's compact JSON: `…"request_id":"…","body":{…}},"error":null}`),
    so that what users parse is what vLLM sent; None when the line is laid out otherwise."""
    line = raw.rstrip(b"\r\n")
    if not line.endswith(_BODY_TAIL):
        return None
    i = line.find(b'"request_id":')
    j = line.find(b'"body":', i) if i >= 0 else -1
    if j < 0:
        return None
    body = line[j + 7:len(line) - len(_BODY_TAIL)]
    return orjson.Fragment(body) if body.startswith(b"{") and body.endswith(b"}") else None


def cap_output(body: dict[str, Any], url: str, cap: int | None) -> tuple[dict[str, Any], bool]:
    """--max-tokens for a chat body: lower the caps it sets above `cap`, or set max_tokens. (body, changed)."""
    if cap is None or url != "/v1/chat/completions":
        return body, False
    keys = ("max_completion_tokens", "max_tokens")
    present = [k for k in keys if isinstance(body.get(k), int) and not isinstance(body.get(k), bool)]
    if not present:
        return {**body, "max_tokens": cap}, True
    if any(body[k] > cap for k in present):
        return {**body, **{k: min(body[k], cap) for k in present}}, True
    return body, False


class LogTail:
    """A runner's log lines as they come: the last few kept, progress and a refused line picked out."""

    def __init__(self, secret: str | None) -> None:
        self.secret = secret
        self.lock = threading.Lock()  # fed from a thread that follows a Job's logs
        self.lines: deque[str] = deque(maxlen=LOG_TAIL)
        self.progress: Progress | None = None
        self.rejected: tuple[int, str] | None = None
        self.offset = 0  # bytes of a log file already read
        self.partial = b""

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if self.secret and self.secret in line:
            line = line.replace(self.secret, "hf_***")  # a log line that echoes the token never goes further
        for piece in line.split("\r"):
            if not piece.strip():
                continue
            p = parse_progress(piece)
            if p is not None:
                self.progress = p
            r = rejected_line(piece)
            if r is not None and self.rejected is None:
                self.rejected = r
            with self.lock:
                self.lines.append(piece.strip())

    def feed_file(self, path: Path) -> None:
        """The lines appended to a log file since the last call."""
        try:
            with open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read(1 << 22)
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        for raw in complete:
            self.feed(raw.decode("utf-8", "replace"))

    def tail(self, n: int = 6) -> str:
        """The last `n` meaningful lines, joined on one line (progress lines left out)."""
        with self.lock:
            lines = list(self.lines)
        keep = [ln for ln in lines if parse_progress(ln) is None][-n:]
        text = " | ".join(keep)
        return text if len(text) <= 900 else "…" + text[-900:]
