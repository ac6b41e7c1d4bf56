"""Terminal output for people (stderr only): a live progress bar and a final table; silent when not a TTY."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from ..summary import Stats


class Progress:
    """A rich progress bar on stderr, refreshed from the run's counters (never per request)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.stats = Stats()
        self._bar: Any = None
        self._task: Any = None
        self.concurrency: Callable[[], dict[str, int]] | None = None  # {provider: live limit}

    def start(self, stats: Stats, live: Callable[[], dict[str, int]]) -> None:
        self.stats, self.concurrency = stats, live
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
            console=Console(stderr=True), auto_refresh=False, transient=False,
        )
        self._task = self._bar.add_task("run", total=self.stats.total or None, rate="", extra="")
        self._bar.start()

    def update(self) -> None:
        if self._bar is None:
            return
        s = self.stats
        done = s.completed + s.failed
        elapsed = self._bar.tasks[0].elapsed or 0.0
        rate = f"{done / elapsed:,.0f}/s" if elapsed > 0.5 else ""
        extra = f"failed {s.failed} · retries {s.retries} · in flight {s.in_flight}"
        if s.cost is not None and s.cost.spent:
            extra += f" · ~${s.cost.spent:.4f}"
        if self.concurrency is not None:
            limits = self.concurrency()
            if limits:
                extra += " · limit " + ",".join(str(v) for v in limits.values())
        self._bar.update(self._task, completed=done, total=s.total or None, rate=rate, extra=extra)
        self._bar.refresh()

    def stop(self) -> None:
        if self._bar is not None:
            self.update()
            self._bar.stop()
            self._bar = None


def final_table(batch: dict[str, Any], enabled: bool = True) -> None:
    """The Batch object as a short table on stderr (terminals only)."""
    if not (enabled and sys.stderr.isatty()):
        return
    from rich.console import Console
    from rich.table import Table

    hb = batch.get("hfbatch", {})
    rc, usage = batch["request_counts"], batch["usage"]
    t = Table(title=f"{batch['id']}  [bold]{batch['status']}[/bold]", show_header=False, box=None)
    t.add_column(style="dim")
    t.add_column()
    t.add_row("requests", f"{rc['total']} total · {rc['completed']} ok · {rc['failed']} failed"
              + (f" · {hb['unsent']} not sent" if hb.get("unsent") else ""))
    t.add_row("tokens", f"{usage['input_tokens']:,} in · {usage['output_tokens']:,} out")
    if "elapsed_seconds" in hb:
        lat = hb["latency_ms"]
        t.add_row("time", f"{hb['elapsed_seconds']:.1f} s · {hb['requests_per_second'] or 0:,.1f} req/s · "
                  f"p50 {lat['p50']} ms · p95 {lat['p95']} ms")
        t.add_row("http", f"{hb['http_requests']} requests · {hb['retries']} retries")
    cost = hb.get("cost") or {}
    if cost:
        usd = cost.get("estimated_cost_usd")
        unpriced = cost.get("unpriced_requests") or 0
        t.add_row("cost", ("unknown (no prices for these models)" if usd is None else f"~${usd:.6f} (estimate)")
                  + (f" · {unpriced} requests unpriced" if unpriced and usd is not None else ""))
    saved = hb.get("savings") or {}
    saved_requests = (saved.get("deduped_requests") or 0) + (saved.get("cache_hits") or 0) + (
        saved.get("coalesced_requests") or 0)
    if saved_requests:
        t.add_row("saved", f"{saved_requests} requests not sent · ~${saved.get('estimated_saved_usd') or 0:.6f}")
    if hb.get("providers"):
        t.add_row("providers", ", ".join(f"{k} {v}" for k, v in hb["providers"].items()))
    t.add_row("output", str(batch["output_file_id"] or "—"))
    t.add_row("errors", str(batch["error_file_id"] or "—"))
    Console(stderr=True).print(t)


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
