"""Registry commands: list, status, cancel, wait, results; and the response cache (cache stats|clear)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import orjson
import typer

from .options import BatchIdArg, JsonOpt, QuietOpt
from .output import emit_json, wants_json

cache_app = typer.Typer(help="The local response cache (submit --cache).", no_args_is_help=True)


@cache_app.command("stats")
def cache_stats(
    json: Annotated[bool, typer.Option("--json", help="JSON even on a terminal (the default when piped).")] = False,
) -> None:
    """Entries, size, hits and tokens saved, per model (JSON when piped or with --json)."""
    from ..cache import ResponseCache, default_path

    with ResponseCache(default_path()) as c:
        stats = c.stats()
    if wants_json(json):
        sys.stdout.buffer.write(orjson.dumps(stats) + b"\n")
        return
    from .tables import key_values
    from .ui import show

    pairs = [("path", str(stats["path"])), ("entries", f"{stats['entries']:,} ({stats['bytes']:,} bytes)"),
             ("hits", f"{stats['hits']:,}"),
             ("saved", f"{stats['saved_input_tokens']:,} tokens in · {stats['saved_output_tokens']:,} out")]
    pairs += [(f"  {model}", f"{n:,} entries") for model, n in stats["by_model"].items()]
    show(key_values(pairs, indent=0), stderr=False)


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
    if wants_json(False):
        sys.stdout.buffer.write(orjson.dumps({"deleted": n}) + b"\n")
    else:
        print(f"deleted {n:,} cached answers")


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
    if wants_json(json):
        from ..writer import escape_separators

        for r in rows:
            sys.stdout.buffer.write(escape_separators(orjson.dumps(r)) + b"\n")
        return
    from .tables import list_view
    from .ui import show, width

    show(list_view(rows, width()), stderr=False)


def status(batch_id: BatchIdArg, json: JsonOpt = False) -> None:
    """A batch, live while it runs: on a terminal its counts, rate, ETA and cost so far; else (or with --json)
    its Batch object."""
    from ..batches.control import get, live_batch

    _print_batch(live_batch(get(batch_id)), json)


def cancel(batch_id: BatchIdArg, quiet: QuietOpt = False, json: JsonOpt = False) -> None:
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
    _print_batch(batch, json)


def wait(
    batch_id: BatchIdArg,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 2).")] = None,
    json: JsonOpt = False,
) -> None:
    """Block until the batch ends; print it and exit with the batch's exit code."""
    from ..batches.control import wait as wait_batch

    batch, code = wait_batch(batch_id, timeout=timeout)
    _print_batch(batch, json)
    raise typer.Exit(code)


def _print_batch(batch: dict[str, object], json: bool) -> None:
    """The Batch object for programs; its view for people on a terminal."""
    if wants_json(json):
        emit_json(batch, to_stderr=False, path=None)
        return
    from .ui import show_batch

    show_batch(batch, live=True, stderr=False)


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
