"""Registry commands: list, status, cancel, wait, results; and the response cache (cache stats|clear)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import orjson
import typer

from .options import BatchIdArg, QuietOpt
from .output import emit_json

cache_app = typer.Typer(help="The local response cache (submit --cache).", no_args_is_help=True)


@cache_app.command("stats")
def cache_stats() -> None:
    """Entries, size, hits and tokens saved, per model (JSON)."""
    from ..cache import ResponseCache, default_path

    with ResponseCache(default_path()) as c:
        sys.stdout.buffer.write(orjson.dumps(c.stats()) + b"\n")


@cache_app.command("clear")
def cache_clear(
    model: Annotated[str | None, typer.Option(help="Only this model's entries.")] = None,
    older_than: Annotated[str | None, typer.Option(help="Only entries older than this (30m, 2h, 7d).")] = None,
) -> None:
    """Delete cached answers (all, or by model and age)."""
    from ..cache import ResponseCache, default_path
    from ..config import parse_duration

    age = parse_duration(older_than, "--older-than") if older_than else None
    with ResponseCache(default_path()) as c:
        n = c.clear(older_than=age, model=model)
    sys.stdout.buffer.write(orjson.dumps({"deleted": n}) + b"\n")


def list_(
    json: Annotated[bool, typer.Option("--json", help="JSON lines (the default when piped).")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many, newest first.")] = None,
) -> None:
    """The batches in the registry, newest first."""
    from ..batches.control import list_batches
    from ..batches.registry import NewerSchema

    newer: list[NewerSchema] = []
    rows = list(list_batches(limit, newer=newer))
    if newer:  # listed apart, never silently left out
        print(f"hfbatch: note: {len(newer)} batch(es) not listed: {newer[0]}", file=sys.stderr)
    if json or not sys.stdout.isatty():
        from ..writer import escape_separators

        for r in rows:
            sys.stdout.buffer.write(escape_separators(orjson.dumps(r)) + b"\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("id", "status", "state", "done/total", "failed", "created", "input")
    import time as _time

    for r in rows:
        rc, hb = r["request_counts"], r.get("hfbatch", {})
        t.add_row(r["id"], r["status"], str(hb.get("state") or ""), f"{rc['completed'] + rc['failed']}/{rc['total']}",
                  str(rc["failed"]), _time.strftime("%Y-%m-%d %H:%M", _time.localtime(r["created_at"])),
                  str(r["input_file_id"]))
    Console().print(t)


def status(batch_id: BatchIdArg) -> None:
    """The Batch object as JSON (live while the batch runs)."""
    from ..batches.control import get, live_batch

    emit_json(live_batch(get(batch_id)), to_stderr=False, path=None)


def cancel(batch_id: BatchIdArg, quiet: QuietOpt = False) -> None:
    """Cancel a batch: in-flight requests finish (a batch's Hugging Face Jobs are cancelled), the rest end as
    batch_cancelled."""
    from ..batches.control import cancel as cancel_batch
    from ..config import resolve_token
    from ..errors import UsageError
    from .running import run_loop

    try:  # a batch whose Jobs still run needs it to cancel them; others do not
        token = resolve_token(None, None)
    except UsageError:
        token = None
    batch = run_loop(lambda: cancel_batch(batch_id, token))
    emit_json(batch, to_stderr=False, path=None)


def wait(
    batch_id: BatchIdArg,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 2).")] = None,
) -> None:
    """Block until the batch ends; print its Batch object and exit with the batch's exit code."""
    from ..batches.control import wait as wait_batch

    batch, code = wait_batch(batch_id, timeout=timeout)
    emit_json(batch, to_stderr=False, path=None)
    raise typer.Exit(code)


def results(
    batch_id: BatchIdArg,
    errors: Annotated[bool, typer.Option("--errors", help="The error file instead of the output file.")] = False,
) -> None:
    """Print the batch's output (or error) lines."""
    from ..batches.control import results_path

    path = results_path(batch_id, errors)
    if path is None or not os.path.exists(path):
        return
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
