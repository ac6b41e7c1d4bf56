"""A batch's vLLM parts on disk: each part's record (Part), the engine's versioned state (`engine/state.json`,
PartStore), the part inputs written per model with each distinct request once (PartWriter) and a runner's output
read as it grows (OutputTail). Files 0600: they hold prompts and answers. The lifecycle is vllm_parts.PartEngine.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from ..cost.estimate import estimate_tokens
from ..errors import UsageError
from ..fingerprints import canonical_request, request_fingerprint
from ..models import Request
from ..storage import private_dir, read_json, write_json
from ..summary import JobFigures
from .vllm_lines import cap_output, vllm_model

STATE_SCHEMA = 1


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
