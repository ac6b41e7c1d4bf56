"""Running a batch from the command line: the event loop, the signal handlers, stdin/stdout, the progress bar
and --detach's background process. Everything the core (batches.run.BatchRun) leaves to its caller."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..batches.run import BatchRun, RunIO
from ..config import RunConfig
from ..models import RunResult
from .ui import Progress

T = TypeVar("T")


def run_batch(cfg: RunConfig) -> RunResult:
    """Run (or resume, or replay) one batch in this process, Ctrl-C/SIGTERM handled."""
    io = RunIO(stdin=sys.stdin.buffer if cfg.input_path == "-" else None,
               stdout=sys.stdout.buffer if cfg.output_path == "-" else None,
               progress=Progress(enabled=not cfg.quiet), launch=_launcher(cfg))
    run = BatchRun(cfg, io)

    async def main() -> RunResult:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for s in signals:
            loop.add_signal_handler(s, run.interrupt, s)
        try:
            return await run.execute()
        finally:
            for s in signals:
                loop.remove_signal_handler(s)

    return run_loop(main)


def run_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """asyncio.run, on uvloop when installed (pip install "hfbatch[fast]"; HFBATCH_UVLOOP=0 turns it off)."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("HFBATCH_UVLOOP", "1") == "0":
        return None
    import importlib

    try:
        uvloop = importlib.import_module("uvloop")  # optional: not a static import
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _launcher(cfg: RunConfig) -> Callable[[str], int]:
    """--detach: `hfbatch resume ID --quiet --wait` in its own session (it survives the terminal and its
    hang-up), its output in the batch's log; the token handed over in its environment only, never a file."""

    def launch(batch_id: str) -> int:
        from ..batches.control import get

        env = dict(os.environ)
        if cfg.token:
            env["HF_TOKEN"] = cfg.token
        log = os.open(get(batch_id).path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "hfbatch", "resume", batch_id, "--quiet", "--wait"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True,
            )
        finally:
            os.close(log)
        return child.pid

    return launch
