"""vLLM's batch runner, part by part: pending requests -> one `vllm run-batch` input per model (each distinct
request once), its output lines -> OpenAI's answers (each custom_id once, deduplicated copies filled in), its
progress lines -> live figures. The lifecycle here (`PartEngine`) is shared by every engine that runs vLLM's
batch runner: engines/vllm.py (this machine), engines/hf_jobs.py (Hugging Face Jobs), the Ray engine to come;
a subclass only says where a part runs (launch, reattach, poll, halt, fetch).

What vLLM's runner does (vllm/entrypoints/launchers/run_batch.py; docs/architecture.md): one model per run;
every line is validated and one invalid line aborts the run ("Invalid request on line N", nothing written);
answers come in input order (0.33 writes and flushes each as soon as every earlier one is done; older
versions write the whole file at the end); a success is `{"id": "vllm-…", "custom_id", "response":
{"status_code": 200, "request_id", "body"}, "error": null}`, a model error has `body: null` and `error:
{"error": {message, type, param, code}}` (older versions: the fields flat), an unsupported url or stream
`status_code: 400` and `error` a plain string; progress goes to stderr as `Running batch: NN% Completed |
n/total [elapsed<remaining, rate]`.

State lives in the batch's folder (`engine/`): state.json (the parts, versioned) and per part its input,
the copies of deduplicated requests, its output and its log. The parts' answered prefixes are the ledger
with the output and error files: a rerun collects what an earlier run left, follows a part still running
(never a second run of it) and sends only the lines that have no answer.
"""

from __future__ import annotations

import asyncio
import enum
import os
import re
import threading
import time
from collections import deque
from collections.abc import Container, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from ..config import RunConfig
from ..cost.estimate import estimate_tokens
from ..cost.gpu import GpuCost, record
from ..errors import DependencyChanged, UsageError
from ..fingerprints import IdSet, canonical_request, request_fingerprint
from ..models import Answer, Failure, NoAnswer, Request, StopReason, Success
from ..outcomes import error_type
from ..routing import split_model
from ..storage import private_dir, read_json, write_json
from ..summary import JobFigures, usage_tokens
from ..validate import EngineRule
from .base import Work

STATE_SCHEMA = 1
# vLLM's batch runner serves these urls (the chat and embeddings urls exactly, score and rerank by suffix).
VLLM_URLS = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/audio/transcriptions",
                       "/v1/audio/translations"})
MAX_RESTARTS = 3  # a part relaunched without the line vLLM refused, at most this many times
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


# -- parts and their state ----------------------------------------------------------------------------


class PartStatus(enum.StrEnum):
    WRITTEN = "written"  # its input is written; never launched (a stopped run: its lines go to a new part)
    LAUNCHING = "launching"  # about to be launched (a crash here: the rerun looks for it before launching)
    RUNNING = "running"
    ENDED = "ended"  # the runner ended: its output is collected next
    COLLECTED = "collected"  # every answer it wrote has its line
    DROPPED = "dropped"  # never launched


@dataclass
class Part:
    """One `vllm run-batch` of one model: its lines, where it runs and how it ended."""

    id: str  # p0001, ...
    model: str  # as vLLM serves it
    requests: int = 0  # lines in its input (distinct requests)
    copies: int = 0  # deduplicated copies answered with them
    est_tokens: int = 0  # input estimate + output bound of its lines (for the Job's timeout)
    status: str = PartStatus.WRITTEN
    stage: str = "WRITTEN"  # the runner's words: SCHEDULING, RUNNING, COMPLETED, ERROR, CANCELED
    runner_id: str | None = None  # a process id, a Job id
    url: str | None = None
    flavor: str | None = None
    nonce: str | None = None  # a Job's launch label: finds a Job launched just before a crash
    started_at: float | None = None
    finished_at: float | None = None
    billed_seconds: float | None = None
    exit_code: int | None = None
    message: str | None = None  # why it failed: what the runner or the Hub said, the tail of its log
    answered: int = 0  # output lines read
    tokens: int = 0  # input + output tokens of its answers
    progress_done: int = 0
    elapsed: float | None = None  # the runner's own clock at its last progress line
    rejected: int | None = None  # the input line vLLM refused ("Invalid request on line N")
    restarts: int = 0  # relaunches without a refused line (this part's lineage)
    cancelled: bool = False  # ended by us (cancel, expiry), not by itself

    def figures(self) -> JobFigures:
        return {"part": self.id, "model": self.model, "requests": self.requests, "id": self.runner_id,
                "url": self.url, "flavor": self.flavor, "stage": self.stage,
                "billed_seconds": None if self.billed_seconds is None else round(self.billed_seconds, 1),
                "answered": self.answered, "message": self.message}

    def seconds(self, now: float | None = None) -> float:
        """Wall time of its runner so far."""
        if self.started_at is None:
            return 0.0
        return max(0.0, (self.finished_at or now or time.time()) - self.started_at)


class PartStore:
    """An engine's state in the batch folder: `engine/state.json` (versioned) and the part files (0600)."""

    def __init__(self, root: Path, engine: str) -> None:
        self.root = root
        self.engine = engine
        self.parts: list[Part] = []
        self.extra: dict[str, Any] = {}

    @classmethod
    def open(cls, root: Path, engine: str) -> PartStore:
        private_dir(root)
        store = cls(root, engine)
        try:
            obj = read_json(root / "state.json")
        except FileNotFoundError:
            return store
        except (OSError, ValueError) as e:
            raise UsageError(f"{root / 'state.json'} is damaged ({e}); the batch's output and error files hold "
                             "every answer written so far: delete that file and rerun to send only the rest "
                             "(a Job still running is then not followed: cancel it on hf.co)") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{root / 'state.json'} is not a JSON object; delete it and rerun")
        schema = obj.get("schema", 1)
        if not isinstance(schema, int) or schema > STATE_SCHEMA:
            raise UsageError(f"{root / 'state.json'} was written by a newer hfbatch (schema {schema}); upgrade "
                             "hfbatch (pip install -U hfbatch)")
        if obj.get("engine") not in (None, engine):
            raise UsageError(f"this batch ran with --engine {obj.get('engine')}: rerun it with that engine (its "
                             "parts may still be running there)")
        names = {f.name for f in fields(Part)}
        store.parts = [Part(**{k: v for k, v in p.items() if k in names}) for p in obj.get("parts") or []]
        extra = obj.get("extra")
        store.extra = extra if isinstance(extra, dict) else {}
        return store

    def save(self) -> None:
        write_json(self.root / "state.json", {"schema": STATE_SCHEMA, "engine": self.engine,
                                              "parts": [asdict(p) for p in self.parts], "extra": self.extra})

    def path(self, part: Part, kind: str) -> Path:
        """kind: input.jsonl, copies.json, output.jsonl, log."""
        return self.root / f"{part.id}.{kind}"

    def new_part(self, model: str) -> Part:
        part = Part(id=f"p{len(self.parts) + 1:04d}", model=model)
        self.parts.append(part)
        return part

    def copies(self, part: Part) -> dict[str, list[str]]:
        try:
            obj = read_json(self.path(part, "copies.json"))
        except (OSError, ValueError):
            return {}
        return obj if isinstance(obj, dict) else {}

    def sent_ids(self, part: Part) -> Iterator[str]:
        """The custom_ids of its input lines, in order."""
        try:
            with open(self.path(part, "input.jsonl"), "rb") as f:
                for raw in f:
                    if raw.strip():
                        yield str(orjson.loads(raw)["custom_id"])
        except FileNotFoundError:
            return


def pid_alive(pid: int) -> bool:
    """Is there a process `pid` (ours or not)? (batches.registry has its own: engines sit below it.)"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped: its parent died and nobody reaps) has ended
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return stat[stat.rfind(b")") + 2:][:1] != b"Z"
    except OSError:
        return True


def create_private(path: Path, *, truncate: bool = True) -> int:
    """An fd on `path`, created 0600 (it holds prompts or answers) whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND), 0o600)
    os.fchmod(fd, 0o600)
    return fd


class PartWriter:
    """Pending requests -> one input file per model, each distinct request once (its copies recorded)."""

    def __init__(self, store: PartStore, duplicates: dict[int, int], max_tokens: int | None,
                 restarts: int = 0) -> None:
        self.store, self.duplicates, self.max_tokens, self.restarts = store, duplicates, max_tokens, restarts
        self.parts: dict[str, tuple[Part, Any]] = {}
        self.groups: dict[tuple[str, bytes], tuple[Part, str]] = {}
        self.copies: dict[str, dict[str, list[str]]] = {}
        self.capped = 0

    def add(self, req: Request) -> None:
        if self.duplicates:
            key = canonical_request(req.url, req.body)
            if request_fingerprint(key) in self.duplicates:
                first = self.groups.get(key)
                if first is not None:
                    part, sent = first
                    self.copies.setdefault(part.id, {}).setdefault(sent, []).append(req.custom_id)
                    part.copies += 1
                    return
                part = self._part(req)
                self.groups[key] = (part, req.custom_id)
        model = vllm_model(req.model)
        body, capped = cap_output({**req.body, "model": model}, req.url, self.max_tokens)
        self.capped += capped
        self.write_raw(model, orjson.dumps({"custom_id": req.custom_id, "method": "POST", "url": req.url,
                                            "body": body}), estimate_tokens(body, req.url))

    def _part(self, req: Request) -> Part:
        return self._part_for(vllm_model(req.model))

    def _part_for(self, model: str) -> Part:
        found = self.parts.get(model)
        if found is None:
            part = self.store.new_part(model)
            part.restarts = self.restarts
            f = os.fdopen(create_private(self.store.path(part, "input.jsonl")), "wb")
            found = self.parts[model] = (part, f)
        return found[0]

    def write_raw(self, model: str, line: bytes, tokens: tuple[int, int] = (0, 0)) -> None:
        """One vLLM input line for `model`'s part."""
        part = self._part_for(model)
        self.parts[model][1].write(line + b"\n")
        part.requests += 1
        part.est_tokens += tokens[0] + tokens[1]

    def add_copies(self, model: str, sent: str, copies: list[str]) -> None:
        part = self._part_for(model)
        self.copies.setdefault(part.id, {})[sent] = list(copies)
        part.copies += len(copies)

    def close(self, *, keep: bool = True) -> list[Part]:
        """Close the files and record the copies; `keep` False: the parts are dropped (the run stopped)."""
        out = []
        for part, f in self.parts.values():
            f.close()
            copies = self.copies.get(part.id)
            if copies:
                write_private(self.store.path(part, "copies.json"), orjson.dumps(copies))
            if not keep:
                part.status = PartStatus.DROPPED
            out.append(part)
        return out


def write_private(path: Path, data: bytes) -> None:
    fd = create_private(path)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class OutputTail:
    """The complete lines a runner appended to its output file since the last read (a torn last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def read(self, chunk: int = 1 << 24) -> Iterator[bytes]:
        """The new complete lines, read `chunk` bytes at a time (an output of embeddings can be gigabytes)."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below, after the generator is done with it
        except FileNotFoundError:
            return
        with f:
            f.seek(self.offset)
            rest = b""
            while data := f.read(chunk):
                data = rest + data
                end = data.rfind(b"\n")
                if end < 0:
                    rest = data
                    continue
                rest = data[end + 1:]
                self.offset += end + 1
                for ln in data[:end].split(b"\n"):
                    if ln.strip():
                        self.lines += 1
                        yield ln


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
    remote = False  # runs elsewhere: --detach launches the parts here and a background process follows them
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
