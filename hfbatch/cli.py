"""Command line: flags -> a frozen RunConfig -> one core call -> print. No file or network I/O here."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import orjson
import typer

EXIT_CODES_HELP = """\
Exit codes: 0 every request succeeded · 1 internal error · 2 usage error (bad flag, missing file,
missing or rejected token) · 3 finished, some requests failed · 4 input failed validation, nothing
sent · 5 stopped early, resumable (credits exhausted) · 6 expired or cancelled · 130/143 interrupted
by SIGINT/SIGTERM (after a clean stop)."""

app = typer.Typer(
    name="hfbatch",
    help="Run OpenAI Batch API files against Hugging Face Inference Providers.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


@app.command(epilog=EXIT_CODES_HELP)
def submit(
    input: Annotated[str, typer.Argument(help="OpenAI batch input file (JSONL); - reads stdin.")],
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Output file for successful lines [default: <input>.output.jsonl]; - is stdout.")] = None,
    errors: Annotated[str | None, typer.Option(
        "--errors", "-e", help="Error file for failed lines [default: <input>.errors.jsonl].")] = None,
    base_url: Annotated[str | None, typer.Option(
        help="An OpenAI-compatible root ending in /v1 (vLLM, TGI, llama.cpp, an Inference Endpoint); "
        "every endpoint is passed through. Default: the Hugging Face router.",
        envvar="HFBATCH_BASE_URL")] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", "-c", min=1, max=10_000, help="Requests in flight at most.",
        envvar="HFBATCH_CONCURRENCY")] = 32,
    timeout: Annotated[float, typer.Option(
        min=0.1, help="Seconds per HTTP attempt.", envvar="HFBATCH_TIMEOUT")] = 300.0,
    max_attempts: Annotated[int, typer.Option(
        min=1, max=100, help="Attempts per request (429, 5xx, timeouts, resets are retried).",
        envvar="HFBATCH_MAX_ATTEMPTS")] = 6,
    skip_invalid: Annotated[bool, typer.Option(
        help="Write invalid lines to the error file and run the valid ones (default: like OpenAI, "
        "any invalid line fails the batch before anything is sent).")] = False,
    endpoint: Annotated[str | None, typer.Option(
        help="Require every line's url to be this endpoint (OpenAI's batch `endpoint`).")] = None,
    summary: Annotated[str | None, typer.Option(help="Also write the Batch object (JSON) to this file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
    token: Annotated[str | None, typer.Option(
        help="Hugging Face token [default: $HF_TOKEN, else the `hf auth login` token].",
        show_default=False)] = None,
    bill_to: Annotated[str | None, typer.Option(
        help="Bill a Team/Enterprise organization (X-HF-Bill-To).", envvar="HFBATCH_BILL_TO")] = None,
) -> None:
    """Run every request of INPUT and write OpenAI-format output and error files.

    The Batch object (JSON) is printed on stdout when done (on stderr when -o - puts the output
    lines on stdout)."""
    from .config import RunConfig, default_output_paths, resolve_token
    from .errors import UsageError
    from .run import submit as run_submit

    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise UsageError(f"--base-url {base_url!r} must start with http:// or https://")
    if input != "-" and not os.path.isfile(input):
        raise UsageError(f"input file not found: {input}")
    default_out, default_err = default_output_paths(input)
    output, errors = output or default_out, errors or default_err
    if errors == "-":
        raise UsageError("--errors cannot be stdout (-); give it a path")
    if output != "-" and os.path.abspath(output) == os.path.abspath(errors):
        raise UsageError("--output and --errors must be different files")
    if input != "-" and os.path.abspath(input) in (os.path.abspath(output), os.path.abspath(errors)):
        raise UsageError("the output and error files must not be the input file")
    cfg = RunConfig(
        input_path=input, output_path=output, errors_path=errors, base_url=base_url,
        concurrency=concurrency, timeout=timeout, max_attempts=max_attempts, skip_invalid=skip_invalid,
        endpoint=endpoint, summary_path=summary, quiet=quiet, bill_to=bill_to,
        token=resolve_token(token, base_url),
    )
    result = run_submit(cfg)
    emit_batch(result.batch, to_stderr=(output == "-"), path=summary)
    if result.error is not None:
        raise result.error


def emit_batch(batch: dict[str, object], *, to_stderr: bool, path: str | None) -> None:
    """The Batch object as one JSON line: stdout is data, unless stdout carries the output lines."""
    data = orjson.dumps(batch) + b"\n"
    if path:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    stream = sys.stderr.buffer if to_stderr else sys.stdout.buffer
    stream.write(data)
    stream.flush()


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
