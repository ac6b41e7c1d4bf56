"""Commands that run a batch: submit, resume, estimate. Flags -> a frozen RunConfig -> one core call -> print."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated

import orjson
import typer

from ..config import WINDOW_RANGE
from ..errors import WriteError
from .options import (
    AttemptsOpt,
    BaseUrlOpt,
    BatchIdArg,
    ConcurrencyOpt,
    EngineOpt,
    FlavorOpt,
    GpuPriceOpt,
    GpusPerWorkerOpt,
    GraceOpt,
    ImageOpt,
    JobTimeoutOpt,
    JsonOpt,
    NamespaceOpt,
    PricesOpt,
    QuietOpt,
    RayAddressOpt,
    RayStorageOpt,
    RetryFailedOpt,
    ShardsOpt,
    TimeoutOpt,
    TokenOpt,
    VllmArgsOpt,
    WaitOpt,
)
from .output import emit_json, wants_json

if TYPE_CHECKING:
    from ..config import RunConfig


def submit(
    input: Annotated[str, typer.Argument(help="OpenAI batch input file (JSONL); - reads stdin.")],
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Output file for successful lines [default: <input>.output.jsonl]; - is "
        "stdout.")] = None,
    errors: Annotated[str | None, typer.Option(
        "--errors", "-e", help="Error file for failed lines [default: <input>.errors.jsonl].")] = None,
    engine: EngineOpt = "http",
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = 32,
    timeout: TimeoutOpt = 300.0,
    max_attempts: AttemptsOpt = 6,
    max_response_bytes: Annotated[str, typer.Option(
        metavar="SIZE", help="Largest answer accepted, after decoding (64MB, 500KB, 1GB or bytes): a larger "
        "one ends as a response_too_large error line, not retried.", envvar="HFBATCH_MAX_RESPONSE_BYTES")] = "64MB",
    skip_invalid: Annotated[bool, typer.Option(
        help="Write invalid lines to the error file and run the valid ones (default: like OpenAI, "
        "any invalid line fails the batch before anything is sent).")] = False,
    endpoint: Annotated[str | None, typer.Option(
        help="Require every line's url to be this endpoint (OpenAI's batch `endpoint`).")] = None,
    completion_window: Annotated[str, typer.Option(
        help=f"Time allowed, {WINDOW_RANGE} (30s, 30m, 2h, 24h): then requests not run end as "
        "batch_expired.")] = "24h",
    grace: GraceOpt = 10.0,
    summary: Annotated[str | None, typer.Option(help="Also write the Batch object (JSON) to this file.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace output/error files that hold lines from another batch.")] = False,
    retry_failed: RetryFailedOpt = False,
    wait: WaitOpt = False,
    detach: Annotated[bool, typer.Option(
        help="Validate, register, run in the background and print the Batch object at once.")] = False,
    rpm: Annotated[float | None, typer.Option(
        min=1, help="Requests per minute at most, spread evenly.", envvar="HFBATCH_RPM")] = None,
    tpm: Annotated[float | None, typer.Option(
        min=1, help="Tokens per minute at most (prompt estimate + output cap, corrected by real usage).",
        envvar="HFBATCH_TPM")] = None,
    adapt: Annotated[bool, typer.Option(
        help="Find each provider's unpublished limit and run at it: a cap on requests in flight, a rate, or "
        "429s that are not about our load (README: adaptive concurrency).")] = True,
    route: Annotated[str | None, typer.Option(
        help="fastest | cheapest | preferred | <provider>: appended to router models without a suffix.")] = None,
    fallback: Annotated[str | None, typer.Option(
        help="Providers to try next, in order (p1,p2), when one fails on its side (429/5xx after retries, "
        "model_not_supported).")] = None,
    max_tokens: Annotated[int | None, typer.Option(
        min=1, help="Cap max_tokens / max_completion_tokens / max_output_tokens in every body.")] = None,
    dedupe: Annotated[bool, typer.Option(
        help="Send identical requests (same endpoint and body) once; every custom_id gets the answer.")] = True,
    cache: Annotated[bool, typer.Option(
        help="Answer from, and fill, the local response cache (hfbatch cache stats|clear).")] = False,
    coalesce: Annotated[int | None, typer.Option(
        min=2, max=2048, help="Pack up to N single-input /v1/embeddings requests (same model and parameters) "
        "into one request; each line still gets its own answer.")] = None,
    budget: Annotated[float | None, typer.Option(
        min=0, help="Stop before the estimated spend could exceed this many USD (exit 5; rerun with more "
        "to send the rest).")] = None,
    prices: PricesOpt = None,
    dry_run: Annotated[bool, typer.Option(
        help="Validate and estimate the cost (like `hfbatch estimate`); send nothing.")] = False,
    metadata: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE stored in the Batch object's metadata (repeatable; up to 16, as OpenAI).")] = None,
    vllm_args: VllmArgsOpt = None,
    gpu_price: GpuPriceOpt = None,
    flavor: FlavorOpt = None,
    image: ImageOpt = None,
    namespace: NamespaceOpt = None,
    job_timeout: JobTimeoutOpt = None,
    ray_address: RayAddressOpt = None,
    shards: ShardsOpt = None,
    ray_storage: RayStorageOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
    quiet: QuietOpt = False,
    json: JsonOpt = False,
    token: TokenOpt = None,
    bill_to: Annotated[str | None, typer.Option(
        help="Bill a Team/Enterprise organization (X-HF-Bill-To).", envvar="HFBATCH_BILL_TO")] = None,
) -> None:
    """Run every request of INPUT and write OpenAI-format output and error files.

    The same command run again resumes an unfinished batch (sending only what has no line yet) or
    prints a finished one without sending anything. On a terminal: a progress line, then the batch's
    figures and files. Otherwise (or with --json) the Batch object as one JSON line on stdout (on
    stderr when -o - puts the output lines on stdout)."""
    from ..config import RunConfig, default_output_paths, parse_size, parse_window
    from ..errors import UsageError

    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise UsageError(f"--base-url {base_url!r} must start with http:// or https://")
    if input != "-" and not os.path.isfile(input):
        raise UsageError(f"input file not found: {input}")
    parse_window(completion_window)
    completion_window = completion_window.strip().lower()  # as the Batch object spells it: 2h, not " 2H"
    max_body = parse_size(max_response_bytes, "--max-response-bytes")
    default_out, default_err = default_output_paths(input)
    output, errors = output or default_out, errors or default_err
    if errors == "-":
        raise UsageError("--errors cannot be stdout (-); give it a path")
    # Real paths: a symlink (or `..`) to the same file is the same file.
    if output != "-" and os.path.realpath(output) == os.path.realpath(errors):
        raise UsageError("--output and --errors must be different files")
    if input != "-" and os.path.realpath(input) in (os.path.realpath(output), os.path.realpath(errors)):
        raise UsageError("the output and error files must not be the input file")
    if summary is not None and summary != "-":
        for what, other in (("the output file", output), ("the error file", errors), ("the input file", input)):
            if other != "-" and os.path.realpath(summary) == os.path.realpath(other):
                raise UsageError(f"--summary {summary} is {what}: it would be replaced by the Batch object. "
                                 "Give --summary a path of its own")
    for flag, path in (("-o", output), ("-e", errors), ("--summary", summary)):
        if path is None or path == "-":
            continue
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a directory; give a file path (e.g. {os.path.join(path, 'out.jsonl')})")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UsageError(f"cannot write {path}: directory {parent} does not exist")
    if detach and output == "-":
        raise UsageError("--detach cannot write to stdout; give -o a path")
    fallbacks = tuple(p.strip() for p in fallback.split(",") if p.strip()) if fallback else ()
    _check_engine(engine, base_url=base_url, rpm=rpm, tpm=tpm, route=route, fallback=fallbacks, cache=cache,
                  coalesce=coalesce, budget=budget, bill_to=bill_to, vllm_args=vllm_args, gpu_price=gpu_price,
                  flavor=flavor, image=image, namespace=namespace, job_timeout=job_timeout, ray_address=ray_address,
                  shards=shards, ray_storage=ray_storage, gpus_per_worker=gpus_per_worker)
    if dry_run:
        estimate(input, base_url=base_url, prices=prices, endpoint=endpoint, json=json,
                 token=token, compare=engine == "hf-jobs", flavors=flavor)
        return
    cfg = RunConfig(
        input_path=input, output_path=output, errors_path=errors, engine=engine, base_url=base_url,
        concurrency=concurrency, timeout=timeout, max_attempts=max_attempts, max_response_bytes=max_body,
        skip_invalid=skip_invalid,
        endpoint=endpoint, summary_path=summary, quiet=quiet, bill_to=bill_to,
        completion_window=completion_window, grace=grace, overwrite=overwrite,
        retry_failed=retry_failed, wait=wait, detach=detach,
        token=engine_token(engine, token, base_url, gpu=gpus_per_worker is not None),
        rpm=rpm, tpm=tpm, adapt=adapt, route=route, max_tokens=max_tokens, dedupe=dedupe, cache=cache,
        coalesce=coalesce, metadata=_metadata(metadata),
        budget=budget, prices=prices, fallback=fallbacks, vllm_args=vllm_args, gpu_price=gpu_price,
        flavor=flavor, image=image, namespace=namespace, job_timeout=job_timeout, ray_address=ray_address,
        shards=shards, ray_storage=ray_storage, gpus_per_worker=gpus_per_worker,
    )
    _run_and_print(cfg, json)


def _check_engine(engine: str, **flags: object) -> None:
    """--engine and the flags that only make sense with some engines (exit 2 for the others)."""
    from ..config import parse_duration
    from ..engines import ENGINES
    from ..errors import UsageError

    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    # The Ray engine runs the http engine on its workers, or vLLM's batch runner with --gpus-per-worker.
    gpu = engine in ("vllm", "hf-jobs") or (engine == "ray" and flags.get("gpus_per_worker") is not None)
    runs = "ray" if engine == "ray" else engine
    only = {"http": ("base_url", "rpm", "tpm", "route", "fallback", "cache", "coalesce", "budget", "bill_to"),
            "vllm": ("gpu_price",), "hf-jobs": ("flavor", "image", "namespace", "job_timeout"),
            "ray": ("ray_address", "shards", "ray_storage", "gpus_per_worker")}
    also = {"http": not gpu and engine == "ray", "vllm": gpu and engine == "ray"}
    for owner, names in only.items():
        for name in names:
            if flags.get(name) not in (None, False, ()) and runs != owner and not also.get(owner):
                how = " with --gpus-per-worker" if engine == "ray" and gpu else ""
                raise UsageError(f"--{name.replace('_', '-')} only applies to --engine {owner} (this run: --engine "
                                 f"{engine}{how})")
    if flags.get("vllm_args") is not None and not gpu:
        raise UsageError("--vllm-args only applies to --engine vllm or hf-jobs, or ray with --gpus-per-worker")
    if engine == "ray":
        from ..engines.ray_engine import check_storage, require_ray

        require_ray()
        check_storage(flags.get("ray_storage"))  # type: ignore[arg-type]
    if engine == "vllm":
        from ..engines.vllm import find_vllm

        find_vllm()
    if engine == "hf-jobs":
        if not flags.get("flavor"):
            raise UsageError("--engine hf-jobs needs --flavor (l4x1, a10g-large, a100-large, ...): `hfbatch estimate "
                             "FILE --compare` says which flavors fit the model and what each costs")
        if flags.get("job_timeout"):
            parse_duration(str(flags["job_timeout"]), "--job-timeout")


def engine_token(engine: str, flag: str | None, base_url: str | None, gpu: bool = False) -> str | None:
    """The token a run needs: the router's (required), a Job's secret (required), a local vLLM's (optional: for
    gated models it downloads; so too on Ray workers with --gpus-per-worker)."""
    from ..config import resolve_token
    from ..errors import UsageError

    if engine == "vllm" or (engine == "ray" and gpu):
        try:
            return resolve_token(flag, None)
        except UsageError:
            return None
    if engine == "hf-jobs":
        try:
            return resolve_token(flag, None)
        except UsageError:
            raise UsageError("--engine hf-jobs: no Hugging Face token found. Set HF_TOKEN=hf_..., pass --token, or "
                             "run `hf auth login`, with a token that may run Jobs (write access)") from None
    return resolve_token(flag, base_url)


def _run_and_print(cfg: RunConfig, json: bool = False) -> None:
    """Run, then: the batch for people on a terminal (stderr), the Batch object for programs."""
    from .running import run_batch
    from .ui import show_result

    result = run_batch(cfg)
    machine = wants_json(json, to_stderr=cfg.output_path == "-")
    show_result(result, quiet=cfg.quiet, machine=machine)
    try:
        emit_json(result.batch, to_stderr=(cfg.output_path == "-"), path=cfg.summary_path, stream=machine)
    except WriteError as e:
        if result.error is None:
            raise
        print(f"hfbatch: {e}", file=sys.stderr)  # the run's own outcome (and exit code) comes next
    if result.error is not None:
        raise result.error


def resume(
    batch_id: BatchIdArg,
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", "-c", min=1, max=10_000, help="Override the batch's concurrency.")] = None,
    retry_failed: RetryFailedOpt = False,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
    json: JsonOpt = False,
    token: TokenOpt = None,
) -> None:
    """Continue an unfinished batch with the options it was submitted with."""
    from ..batches.control import get
    from ..config import RunConfig

    meta = get(batch_id).meta()
    overrides: dict[str, object] = {"concurrency": concurrency} if concurrency is not None else {}
    stored = RunConfig.from_meta(meta)
    tok = engine_token(stored.engine, token, stored.base_url, gpu=stored.gpus_per_worker is not None)
    cfg = RunConfig.from_meta(meta, quiet=quiet, retry_failed=retry_failed, wait=wait, token=tok, **overrides)
    _run_and_print(cfg, json)


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    """--metadata KEY=VALUE ... -> OpenAI's metadata map (16 keys, key <= 64 chars, value <= 512)."""
    from ..errors import UsageError

    if not pairs:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or len(key) > 64 or len(value) > 512:
            raise UsageError(f"--metadata {pair!r}: use KEY=VALUE (key up to 64 characters, value up to 512)")
        out[key] = value
    if len(out) > 16:
        raise UsageError("--metadata: at most 16 keys, as OpenAI allows")
    return out


def estimate(
    input: Annotated[str, typer.Argument(help="OpenAI batch input file (JSONL).")],
    base_url: BaseUrlOpt = None,
    prices: PricesOpt = None,
    endpoint: Annotated[str | None, typer.Option(help="Require every line's url to be this endpoint.")] = None,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Serverless tokens or GPU minutes: one table, cheapest first, of the router's providers "
        "and a Hugging Face Job per model on each flavor that fits (prices from the Hub's Jobs hardware list).")
    ] = False,
    flavors: Annotated[str | None, typer.Option(
        help="With --compare: only these Jobs flavors (l4x1,a100-large) [default: every GPU flavor].")] = None,
    json: Annotated[bool, typer.Option("--json", help="One JSON object (the default when piped).")] = False,
    token: TokenOpt = None,
) -> None:
    """Validate INPUT and estimate its tokens and cost per provider, cheapest first; sends no inference request.

    Input tokens come from a tokenizer in the local Hugging Face cache when one is there, else
    characters / 4; output tokens are bounded by each body's max_tokens (512 when absent). With
    --compare, GPU minutes are start-up + tokens / throughput: measured by earlier runs of the model on
    the flavor when there are any, else documented priors (README: serverless or GPU job)."""
    from ..config import resolve_token
    from ..errors import UsageError

    if input == "-" or not os.path.isfile(input):
        raise UsageError(f"input file not found: {input} (estimate reads a file, not stdin)")
    if flavors is not None and not compare:
        raise UsageError("--flavors goes with --compare")
    try:
        tok = resolve_token(token, base_url)
    except UsageError:
        tok = None  # the price list is public: estimate without a token
    if compare:
        from ..cost.estimate import run_compare
        from ..cost.gpu import parse_flavors

        cmp = run_compare(input, base_url=base_url, prices=prices, token=tok, endpoint=endpoint,
                          flavors=parse_flavors(flavors))
        if wants_json(json):
            sys.stdout.buffer.write(orjson.dumps(cmp) + b"\n")
            return
        from .tables import compare_view
        from .ui import show, width

        show(compare_view(dict(cmp), width()), stderr=False)
        return
    from ..cost.estimate import run_estimate

    est = run_estimate(input, base_url=base_url, prices=prices, token=tok, endpoint=endpoint)
    if wants_json(json):
        sys.stdout.buffer.write(orjson.dumps(est) + b"\n")
        return
    from .tables import estimate_view
    from .ui import show, width

    show(estimate_view(dict(est), width()), stderr=False)
