"""Command line, part 2: registry commands (list, status, cancel, wait, results), cache, serve, fake-provider."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import orjson
import typer

from .cli import BaseUrlOpt, BatchIdArg, QuietOpt, TokenOpt, app, emit_json

cache_app = typer.Typer(help="The local response cache (submit --cache).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("stats")
def cache_stats() -> None:
    """Entries, size, hits and tokens saved, per model (JSON)."""
    from .cache import ResponseCache, default_path

    with ResponseCache(default_path()) as c:
        sys.stdout.buffer.write(orjson.dumps(c.stats()) + b"\n")


@cache_app.command("clear")
def cache_clear(
    model: Annotated[str | None, typer.Option(help="Only this model's entries.")] = None,
    older_than: Annotated[str | None, typer.Option(help="Only entries older than this (30m, 2h, 7d).")] = None,
) -> None:
    """Delete cached answers (all, or by model and age)."""
    from .cache import ResponseCache, default_path
    from .config import parse_duration

    age = parse_duration(older_than, "--older-than") if older_than else None
    with ResponseCache(default_path()) as c:
        n = c.clear(older_than=age, model=model)
    sys.stdout.buffer.write(orjson.dumps({"deleted": n}) + b"\n")


@app.command("list")
def list_(
    json: Annotated[bool, typer.Option("--json", help="JSON lines (the default when piped).")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many, newest first.")] = None,
) -> None:
    """The batches in the registry, newest first."""
    from .jobs import list_batches

    rows = list(list_batches(limit))
    if json or not sys.stdout.isatty():
        from .writer import escape_separators

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


@app.command()
def status(batch_id: BatchIdArg) -> None:
    """The Batch object as JSON (live while the batch runs)."""
    from .jobs import get, live_batch

    emit_json(live_batch(get(batch_id)), to_stderr=False, path=None)


@app.command()
def cancel(batch_id: BatchIdArg, quiet: QuietOpt = False) -> None:
    """Cancel a batch: in-flight requests finish, the rest end as batch_cancelled."""
    from .config import RunConfig, options_from_meta
    from .jobs import cancel as cancel_batch
    from .jobs import get

    batch, finish_here = cancel_batch(batch_id)
    if not finish_here:
        emit_json(batch, to_stderr=False, path=None)
        return
    # No process runs it: close it out here (sends nothing, writes the batch_cancelled lines).
    meta = get(batch_id).meta()
    cfg = RunConfig(input_path=meta["input_file"], output_path=meta["output_path"],
                    errors_path=meta["errors_path"], quiet=True, batch_id=batch_id, **options_from_meta(meta))
    from .errors import EndedEarly
    from .run import submit as run_submit

    result = run_submit(cfg)
    emit_json(result.batch, to_stderr=False, path=None)
    if result.error is not None and not isinstance(result.error, EndedEarly):
        raise result.error


@app.command()
def wait(
    batch_id: BatchIdArg,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 2).")] = None,
) -> None:
    """Block until the batch ends; print its Batch object and exit with the batch's exit code."""
    from .jobs import wait as wait_batch

    batch, code = wait_batch(batch_id, timeout=timeout)
    emit_json(batch, to_stderr=False, path=None)
    raise typer.Exit(code)


@app.command()
def results(
    batch_id: BatchIdArg,
    errors: Annotated[bool, typer.Option("--errors", help="The error file instead of the output file.")] = False,
) -> None:
    """Print the batch's output (or error) lines."""
    from .jobs import results_path

    path = results_path(batch_id, errors)
    if path is None or not os.path.exists(path):
        return
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


@app.command("fake-provider", hidden=True)
def fake_provider(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8765,
    latency: Annotated[float, typer.Option(help="Seconds before each answer.")] = 0.0,
    fail_429: Annotated[float, typer.Option(help="Fraction answered 429.")] = 0.0,
    fail_500: Annotated[float, typer.Option(help="Fraction answered 500.")] = 0.0,
    hang: Annotated[float, typer.Option(help="Fraction never answered.")] = 0.0,
    reset: Annotated[float, typer.Option(help="Fraction whose connection is reset.")] = 0.0,
    garbage: Annotated[float, typer.Option(help="Fraction answered 200 with a non-JSON body.")] = 0.0,
) -> None:
    """Run the local fake Inference Providers router (tests, demo, benchmarks)."""
    from .fake_provider import FakeConfig, serve

    serve(port, config=FakeConfig(latency=latency, fail_429=fail_429, fail_500=fail_500, hang=hang,
                                  reset=reset, garbage=garbage))


@app.command()
def serve(
    host: Annotated[str, typer.Option(
        help="Address to listen on; anything but loopback requires --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        min=0, max=65535, help="Port (0 picks a free one; the URL is printed on stderr).")] = 8787,
    base_url: BaseUrlOpt = None,
    api_key: Annotated[str | None, typer.Option(
        help="Key clients must send; batches then run on the server's token, and the key sees every file "
        "and batch. Without it the client's key is its Hugging Face token, passed through, and each token "
        "sees only its own.", envvar="HFBATCH_API_KEY", show_default=False)] = None,
    max_upload: Annotated[str, typer.Option(help="Largest file upload (KB, MB, GB or bytes).")] = "200MB",
    concurrency: Annotated[int, typer.Option(
        "--concurrency", "-c", min=1, max=10_000, help="Requests in flight at most, across every batch the "
        "server runs (shared round-robin between them).", envvar="HFBATCH_CONCURRENCY")] = 32,
    token: TokenOpt = None,
) -> None:
    """Serve OpenAI's Files and Batches API: code written for OpenAI's Batch API runs here by changing
    only base_url. Unfinished batches resume when the server restarts."""
    from .server import ServeOptions
    from .server import serve as run_server

    run_server(ServeOptions(host=host, port=port, base_url=base_url, api_key=api_key, token=token,
                            max_upload=max_upload, concurrency=concurrency))
