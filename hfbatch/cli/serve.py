"""Service commands: serve (OpenAI's Files and Batches API) and the fake provider (tests, demo, benchmarks)."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import BaseUrlOpt, TokenOpt


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
    from ..testing.fake_provider import FakeConfig, serve

    serve(port, config=FakeConfig(latency=latency, fail_429=fail_429, fail_500=fail_500, hang=hang,
                                  reset=reset, garbage=garbage))


def fake_hub(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8766,
    storage: Annotated[str | None, typer.Option(
        help="The buckets' folder (give the same to hfbatch as HFBATCH_BUCKETS_DIR) [default: a new temporary one].")
    ] = None,
    bin_dir: Annotated[str | None, typer.Option(
        help="Put first on the Jobs' PATH (where the stand-in `vllm` is).")] = None,
    params: Annotated[list[str] | None, typer.Option(
        help="MODEL=N: the parameter count the model info gives for MODEL (repeatable).")] = None,
    schedule_seconds: Annotated[float, typer.Option(help="How long a Job stays SCHEDULING.")] = 0.0,
    job_env: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE in every Job's environment: the stand-in vllm's knobs (FAKE_VLLM_DELAY=0.2, "
        "FAKE_VLLM_CRASH_AFTER=3; see hfbatch/testing/vllm.py) (repeatable).")] = None,
) -> None:
    """Run the local fake Hugging Face Hub (Jobs, model info, buckets) for the GPU engines' tests and demo."""
    from ..errors import UsageError
    from ..testing.fake_hub import FakeHubConfig, serve

    counts: dict[str, int] = {}
    for pair in params or []:
        model, sep, n = pair.partition("=")
        if not sep or not n.isdigit():
            raise UsageError(f"--params {pair!r}: use MODEL=N (a number of parameters)")
        counts[model] = int(n)
    env: dict[str, str] = {}
    for pair in job_env or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--job-env {pair!r}: use KEY=VALUE")
        env[key] = value
    serve(port, config=FakeHubConfig(storage=storage or "", bin_dir=bin_dir or "", params=counts,
                                     schedule_seconds=schedule_seconds, job_env=env))


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
    from ..serve.app import ServeOptions
    from ..serve.app import serve as run_server

    run_server(ServeOptions(host=host, port=port, base_url=base_url, api_key=api_key, token=token,
                            max_upload=max_upload, concurrency=concurrency))
