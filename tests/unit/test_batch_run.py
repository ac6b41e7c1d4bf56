"""BatchRun, the lifecycle, through its seams: an engine given in RunIO (no network), real files under a
temporary HFBATCH_HOME. The end-to-end tests cover the same lifecycle through the real CLI; these pin the
contract an engine relies on and what the core must never do (read stdin itself, hide a bug)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import pytest

from hfbatch.batches.run import BatchRun, RunIO
from hfbatch.config import RunConfig
from hfbatch.engines import Engine, Work
from hfbatch.errors import ExitCode, HfbatchError, UsageError
from hfbatch.models import RunResult, Success
from hfbatch.serve.app import OneLineFormatter


class ScriptedEngine:
    """Answers every pending request with a 200, or raises after `fail_after` answers (a bug)."""

    name = "scripted"
    remote = False

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.seen: list[str] = []

    async def __aenter__(self) -> ScriptedEngine:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        pass

    def live(self) -> dict[str, int]:
        return {}

    async def run(self, work: Work) -> None:
        for req in work.requests:
            if self.fail_after is not None and len(self.seen) >= self.fail_after:
                raise KeyError("a bug in the engine")
            self.seen.append(req.custom_id)
            body = {"object": "chat.completion", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
            work.stats.add_usage(body)
            work.answers.write(req.custom_id, Success(200, f"req-{req.custom_id}", orjson.Fragment(orjson.dumps(body))))
            await asyncio.sleep(0)


def lines(n: int) -> bytes:
    return b"".join(orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": "m", "messages": [{"role": "user", "content": str(i)}]}}) + b"\n"
                    for i in range(n))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HFBATCH_HOME", str(tmp_path / "home"))
    return tmp_path


def run(cfg: RunConfig, engine: Engine, **io: Any) -> RunResult:
    return asyncio.run(BatchRun(cfg, RunIO(engine=lambda c, n: engine, **io)).execute())


def test_an_engine_bug_ends_the_run_resumable_with_exit_1_and_the_rerun_finishes(home: Path) -> None:
    (home / "in.jsonl").write_bytes(lines(10))
    cfg = RunConfig(str(home / "in.jsonl"), str(home / "out.jsonl"), str(home / "err.jsonl"), quiet=True)
    result = run(cfg, ScriptedEngine(fail_after=4))
    assert isinstance(result.error, HfbatchError) and result.error.exit_code == ExitCode.INTERNAL
    assert isinstance(result.error.__cause__, KeyError)  # HFBATCH_DEBUG prints the chain
    assert "internal error: KeyError" in str(result.error) and "resumable" in str(result.error)
    hb = result.batch["hfbatch"]
    assert result.batch["status"] == "in_progress" and hb["state"] == "interrupted"
    assert hb["stop_reason"] == "internal_error"
    assert result.batch["request_counts"]["completed"] == 4
    engine = ScriptedEngine()
    again = run(cfg, engine)
    assert again.error is None and again.batch["status"] == "completed"
    assert engine.seen == [f"c{i}" for i in range(4, 10)]  # only what had no line
    out = [json.loads(x) for x in (home / "out.jsonl").read_bytes().splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"c{i}" for i in range(10))


def test_the_core_never_reads_stdin_itself(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Exploding:
        def read(self, *a: Any) -> bytes:
            raise AssertionError("the core read sys.stdin")

    monkeypatch.setattr(sys, "stdin", Exploding())
    cfg = RunConfig("-", str(home / "out.jsonl"), str(home / "err.jsonl"), quiet=True)
    with pytest.raises(UsageError, match="no standard input"):
        run(cfg, ScriptedEngine())
    import io as _io

    result = run(cfg, ScriptedEngine(), stdin=_io.BytesIO(lines(3)))
    assert result.error is None and result.batch["request_counts"]["completed"] == 3


def test_detach_needs_a_launcher_and_records_its_pid(home: Path) -> None:
    (home / "in.jsonl").write_bytes(lines(2))
    cfg = RunConfig(str(home / "in.jsonl"), str(home / "out.jsonl"), str(home / "err.jsonl"), detach=True)
    launched: list[str] = []
    result = run(cfg, ScriptedEngine(), launch=lambda batch_id: launched.append(batch_id) or 4242)
    assert result.detached and launched == [result.batch["id"]]
    meta = json.loads((home / "home" / "batches" / launched[0] / "meta.json").read_bytes())
    assert meta["pid"] == 4242 and result.batch["status"] == "in_progress"
    assert not (home / "out.jsonl").exists()  # nothing ran here


def test_the_server_log_is_one_line_and_loud_only_when_debugging(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("hfbatch.serve", logging.ERROR, __file__, 1, "batch %s: internal error",
                                   ("b1",), sys.exc_info())
    monkeypatch.delenv("HFBATCH_DEBUG", raising=False)
    assert OneLineFormatter().format(record) == "hfbatch serve: batch b1: internal error"
    monkeypatch.setenv("HFBATCH_DEBUG", "1")
    loud = OneLineFormatter().format(record)
    assert loud.startswith("hfbatch serve: batch b1: internal error\nTraceback") and "ValueError: boom" in loud
