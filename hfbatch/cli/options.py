"""Command line options shared by several commands (defined once, same help everywhere)."""

from __future__ import annotations

from typing import Annotated

import typer

EXIT_CODES_HELP = """\
Exit codes: 0 every request succeeded · 1 internal error · 2 usage error (bad flag, missing file,
missing or rejected token, output files of another batch) · 3 finished, some requests failed ·
4 input failed validation, nothing sent · 5 stopped early, resumable (credits exhausted, budget,
batch already running, a file could not be written) · 6 expired or cancelled · 130/143 interrupted
by SIGINT/SIGTERM (after a clean stop; rerun to resume)."""

# Options shared by `submit` and `resume` (defined once, same help everywhere).
BaseUrlOpt = Annotated[str | None, typer.Option(
    help="An OpenAI-compatible root ending in /v1 (vLLM, TGI, llama.cpp, an Inference Endpoint); "
    "every endpoint is passed through. Default: the Hugging Face router.", envvar="HFBATCH_BASE_URL")]
ConcurrencyOpt = Annotated[int, typer.Option(
    "--concurrency", "-c", min=1, max=10_000, help="Requests in flight at most.",
    envvar="HFBATCH_CONCURRENCY")]
TimeoutOpt = Annotated[float, typer.Option(min=0.1, help="Seconds per HTTP attempt.", envvar="HFBATCH_TIMEOUT")]
AttemptsOpt = Annotated[int, typer.Option(
    min=1, max=100, help="Attempts per request (429, 500 once, 502-504, timeouts, resets and broken answers "
    "are retried).",
    envvar="HFBATCH_MAX_ATTEMPTS")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")]
TokenOpt = Annotated[str | None, typer.Option(
    help="Hugging Face token [default: $HF_TOKEN, else the `hf auth login` token].", show_default=False)]
GraceOpt = Annotated[float, typer.Option(
    min=0, help="Seconds in-flight requests get to finish after Ctrl-C, SIGTERM or expiry.")]
RetryFailedOpt = Annotated[bool, typer.Option(
    help="Resume and re-send the lines whose error was retryable (429, 500, 502-504, timeout, connection, "
    "broken answer).")]
WaitOpt = Annotated[bool, typer.Option(
    help="If another process is running this batch, wait for it to end instead of exiting with 5.")]
BatchIdArg = Annotated[str, typer.Argument(help="A batch id (batch_...), as `hfbatch list` shows.")]
PricesOpt = Annotated[str | None, typer.Option(
    help="Prices for custom servers: a /v1/models JSON file or {model: {provider: {input, output}}} "
    "(USD per 1M tokens).")]
EngineOpt = Annotated[str, typer.Option(
    help="Where the requests run: http (the router or --base-url), vllm (vLLM's batch runner on this machine's "
    "GPU), hf-jobs (vLLM in Hugging Face Jobs, billed by the GPU minute) or ray (shards on a Ray cluster, limits "
    "cluster-wide; pip install 'hfbatch[ray]').", envvar="HFBATCH_ENGINE")]
VllmArgsOpt = Annotated[str | None, typer.Option(
    help="--engine vllm / hf-jobs: more `vllm run-batch` flags, as one string (\"--max-model-len 8192 "
    "--gpu-memory-utilization 0.95\").")]
GpuPriceOpt = Annotated[float | None, typer.Option(
    min=0, metavar="USD_PER_HOUR", help="--engine vllm: what this machine's GPU costs per hour (the cost is "
    "then price x wall time; unknown without it).")]
FlavorOpt = Annotated[str | None, typer.Option(
    help="--engine hf-jobs: the Jobs hardware (l4x1, a10g-large, l40sx1, a100-large, h200, ...; `hfbatch "
    "estimate FILE --compare` says which fit and what each costs).")]
ImageOpt = Annotated[str | None, typer.Option(
    help="--engine hf-jobs: the Docker image with vLLM [default: a pinned vllm/vllm-openai tag].")]
NamespaceOpt = Annotated[str | None, typer.Option(
    help="--engine hf-jobs: the user or organization that runs (and pays for) the Jobs and owns the bucket "
    "[default: the token's user].")]
JobTimeoutOpt = Annotated[str | None, typer.Option(
    help="--engine hf-jobs: each Job's timeout (45m, 3h) [default: twice the estimate, at least 30m].")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print the Batch object as JSON even on a terminal (the default when stdout is not one).")]
RayAddressOpt = Annotated[str | None, typer.Option(
    help="--engine ray: the cluster to join: auto (the one this machine belongs to), host:port or ray://host:10001 "
    "[default: $RAY_ADDRESS, else a local Ray started for the run].")]
ShardsOpt = Annotated[int | None, typer.Option(
    min=1, max=100_000, help="--engine ray: split the pending requests into N shards, one Ray task each [default: "
    "one per CPU of the cluster, at most ~256 MB of input each].")]
RayStorageOpt = Annotated[str | None, typer.Option(
    metavar="FOLDER", help="--engine ray: where the shard files live, a folder every node mounts at the same path "
    "(NFS, EFS, Lustre; needed with more than one node) [default: the batch's folder].")]
GpusPerWorkerOpt = Annotated[float | None, typer.Option(
    min=0.01, help="--engine ray: run vLLM's batch runner on each shard with this many GPUs (one model per part) "
    "instead of HTTP requests.")]
