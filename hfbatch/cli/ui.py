"""Terminal output for people: the live progress line, a batch's view, a dataset's row counter (on stderr), and the
tables of the query commands; silent where stdout or stderr is not a terminal. Layouts: tables.py, imported (with
rich) only when something is drawn: a run in a pipeline or a cron job starts without them (~20 ms)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..models import RunResult
from ..summary import Stats

if TYPE_CHECKING:
    from .tables import Snapshot


class Progress:
    """The run's progress line on stderr (terminals only), laid out for the terminal's width at every refresh
    (tables.progress_line); refreshed from the run's counters, never per request."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.stats = Stats()
        self._live: Any = None
        self._started = time.monotonic()
        self.concurrency: Callable[[], dict[str, int]] | None = None  # {provider: live limit}

    def start(self, stats: Stats, live: Callable[[], dict[str, int]]) -> None:
        self.stats, self.concurrency = stats, live
        self._started = time.monotonic()
        if not self.enabled:
            return
        from rich.console import Console
        from rich.live import Live

        self._live = Live(_ProgressLine(self), console=Console(stderr=True), auto_refresh=False, transient=False,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def snapshot(self) -> Snapshot:
        from .tables import Snapshot

        s = self.stats
        limits = tuple(self.concurrency().values()) if self.concurrency is not None else ()
        gpu = bool(s.engine_note or s.jobs)  # vLLM's runner, Jobs: their parts' stages, not retries and in flight
        return Snapshot(done=s.completed + s.failed + s.engine_done,  # a GPU runner's answers not written yet
                        total=s.total or None, elapsed=time.monotonic() - self._started,
                        failed=s.failed, retries=s.retries, in_flight=s.in_flight,
                        cost=s.cost.spent if s.cost is not None else None, limits=limits, gpu=gpu,
                        stages=tuple(n for n in s.engine_note.split(" · ") if n) if gpu else ())

    def update(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def stop(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None


class _ProgressLine:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from .tables import progress_line

        yield progress_line(self.progress.snapshot(), options.max_width)


def show(lines: list[Any], *, stderr: bool = True) -> None:
    """Lines for people, never cut by rich (a line longer than the terminal is left to the terminal to wrap)."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    for line in lines:
        console.print(line)


def width(stderr: bool = False) -> int:
    from rich.console import Console

    return int(Console(stderr=stderr).width)


def show_batch(batch: dict[str, Any], *, live: bool = False, stderr: bool = True) -> None:
    """A batch as a few lines: id and status, counts, time, rate (ETA while it runs), tokens, cost, its files."""
    from .tables import batch_view

    show(batch_view(batch, width(stderr), live=live), stderr=stderr)


def show_result(result: RunResult, *, quiet: bool, machine: bool) -> None:
    """What a person sees on stderr when a run ends (`machine`: the Batch object goes to a program as well):
    a replay said as such, a detached run's next commands (and the Jobs it launched), else the batch's figures
    and files (with --quiet and no JSON: one line naming them)."""
    batch = result.batch
    if result.replayed and result.error is None and not quiet:
        print(f"hfbatch: batch {batch['id']} already ended ({batch['status']}); nothing was sent"
              + (". Its stored result follows" if machine else ""), file=sys.stderr)
    if result.detached:
        if not machine or sys.stderr.isatty():
            print(f"hfbatch: batch {batch['id']} runs in the background: `hfbatch status {batch['id']}` shows it, "
                  f"`hfbatch wait {batch['id']}` waits for it", file=sys.stderr)
        jobs = (batch.get("hfbatch") or {}).get("jobs")
        if jobs and sys.stderr.isatty() and not quiet:  # --engine hf-jobs: the Jobs it launched, their pages
            from .tables import jobs_lines

            show(jobs_lines(jobs, width(stderr=True)))
    elif sys.stderr.isatty():
        if not quiet:
            show_batch(batch)
        elif not machine:
            from rich.text import Text

            from .tables import files_lines

            show([Text(f"{batch['id']}  {batch['status']}"), *files_lines(batch, width(stderr=True))])


class RowsProgress:
    """A one-line row counter on stderr while a dataset is read (terminals only): the count and the rate first,
    the label only when it fits."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.label, self.start, self.last, self.shown = label, time.monotonic(), 0.0, False

    def update(self, rows: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        elapsed = now - self.start
        line = f"{rows:,} rows" + (f" · {rows / elapsed:,.0f}/s" if elapsed > 0.5 else "")
        width = shutil.get_terminal_size().columns - 1
        if len(line) + 3 + len(self.label) <= width:
            line += f" · {self.label}"
        sys.stderr.write("\r\x1b[2K" + line[:width])
        sys.stderr.flush()
        self.shown = True

    def stop(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
            self.shown = False
