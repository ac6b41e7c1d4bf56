"""The Hugging Face Jobs engine (`--engine hf-jobs --flavor F`): each part (one model) runs `vllm run-batch` in a
Job on Hugging Face's GPUs, billed by the minute; the lifecycle is vllm_parts.PartEngine.

Per part: its input goes into the private bucket `{namespace}/hfbatch` under the batch's id (engines/buckets.py,
the seam for xet transfers), and `HfApi.run_job(image, command=["vllm", "run-batch", …], flavor, timeout,
secrets={"HF_TOKEN": …}, volumes=[that folder at /hfbatch, read-write], labels, namespace)` starts it; vLLM
writes its output into the same folder. The token travels only as the Job's secret (never in its command,
environment or labels, never in our logs: a log line that echoes it is redacted). `namespace` is always passed
(one `whoami` per run at most, and none once the batch knows it: the Hub rate-limits it) and so is a timeout
(the Hub's default is 30 minutes, billed while the Job starts or runs): --job-timeout, else twice the estimate,
at least 30 minutes.

Followed with huggingface_hub's calls: `inspect_job` (stage, billed time), the logs' and the GPU metrics'
server-sent events (a thread each: the client blocks). When a Job ends its output is downloaded and converted;
one that ends in ERROR is reported with the tail of its logs and its unanswered lines are relaunched by the
rerun. Before a GPU is paid for, every model is checked on the Hub (exists, accessible, gated terms accepted)
and against the flavor's GPU memory (parameters from its safetensors metadata): exit 2 otherwise.

A run stopped by a signal leaves its Jobs running (they are paid for: a rerun follows them and collects their
answers, `hfbatch cancel` stops them); a cancel or the completion window cancels them.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..config import RunConfig, env_float, parse_duration
from ..cost.gpu import Flavor, ModelSize, estimate_run, fits, flavors_from, model_size, needs_gb
from ..errors import AuthError, StoppedEarly, UsageError
from .buckets import BucketFiles, bucket_files
from .vllm_lines import LogTail
from .vllm_parts import PartEngine
from .vllm_store import Part, PartStatus

# Pinned: the image's `vllm run-batch` is the one whose output this engine reads (vllm_parts). Check a newer tag
# with a real Job before moving the pin (README: what the offline tests cannot cover).
DEFAULT_IMAGE = "vllm/vllm-openai:v0.33.0"
BUCKET_NAME = "hfbatch"
MOUNT = "/hfbatch"
MIN_TIMEOUT = 1800
TERMINAL = frozenset({"COMPLETED", "CANCELED", "ERROR", "DELETED"})
T = TypeVar("T")


class HfJobsEngine(PartEngine):
    name = "hf-jobs"
    remote = True
    parallel = 1000  # one Job per model, all at once
    cost_basis = "jobs_billing"
    runner_name = "the Job running"
    runner_noun = "Job"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        if not cfg.flavor:
            raise UsageError("--engine hf-jobs needs --flavor (l4x1, a10g-large, a100-large, ...): `hfbatch "
                             "estimate FILE --compare` says which flavors fit the model and what each costs")
        self.api: Any = None
        self.files: BucketFiles | None = None
        self.namespace = ""
        self.flavors: dict[str, Flavor] = {}
        self.sizes: dict[str, ModelSize] = {}
        self.bucket_ready = False
        self.inspect_every = env_float("HFBATCH_JOBS_POLL", 10.0)
        self.inspected: dict[str, float] = {}
        self.followers: dict[str, threading.Event] = {}  # part id -> set when its logs' stream ended
        self.metrics: dict[str, dict[str, Any]] = {}
        self.inspect_errors = 0

    # -- the Hub ---------------------------------------------------------------------------------

    async def _hub(self, what: str, call: Callable[[], T]) -> T:
        """A huggingface_hub call in a thread; its failures as one line that says what to do."""
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        try:
            return await asyncio.to_thread(call)
        except GatedRepoError:
            raise UsageError(f"{what}: the model is gated and this token has no access: accept its terms on "
                             "hf.co (the model's page), then rerun") from None
        except RepositoryNotFoundError:
            raise UsageError(f"{what}: not found, or private and not visible to this token (check the id and "
                             "the token)") from None
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            first = str(e).splitlines()[0][:200]
            if status == 401:
                raise AuthError(f"{what}: the Hub refused the token (HTTP 401); check HF_TOKEN / --token") from None
            if status == 403:
                raise AuthError(f"{what}: the token may not do this (HTTP 403): Jobs and buckets need a token with "
                                f"write access to the namespace {self.namespace or '(yours)'}") from None
            if status == 402:
                raise StoppedEarly(f"{what}: payment required (HTTP 402): Jobs need a payment method or credits "
                                   "on the namespace; add them, then rerun the same command") from None
            if status is not None and (status == 429 or status >= 500):
                raise StoppedEarly(f"{what}: the Hub answered HTTP {status}; rerun the same command later (nothing "
                                   "is lost: it follows what runs and sends only the rest)") from None
            raise UsageError(f"{what}: {first}") from None
        except (OSError, ValueError, TimeoutError) as e:
            raise StoppedEarly(f"{what}: cannot reach the Hub ({type(e).__name__}: {e}); rerun the same command "
                               "to continue") from None
        except Exception as e:
            if type(e).__module__.startswith(("httpx", "httpcore")):  # network errors of the Hub's client
                raise StoppedEarly(f"{what}: cannot reach the Hub ({type(e).__name__}: {e}); rerun the same "
                                   "command to continue") from None
            raise

    async def prepare(self) -> None:
        cfg, store, work = self.cfg, self.store, self.work
        if not cfg.token:
            raise UsageError("--engine hf-jobs needs a Hugging Face token that may run Jobs (write access): set "
                             "HF_TOKEN, pass --token, or run `hf auth login`")
        from huggingface_hub import HfApi

        self.api = HfApi(token=cfg.token, library_name="hfbatch")
        self.files = bucket_files(self.api)
        ns = store.extra.get("namespace") or cfg.namespace
        if not ns:
            who = await self._hub("asking the Hub who this token is (whoami)", lambda: self.api.whoami())
            ns = who["name"]
        self.namespace = store.extra["namespace"] = str(ns)
        store.save()
        try:
            hardware = await self._hub("listing the Jobs hardware", lambda: self.api.list_jobs_hardware())
        except (UsageError, StoppedEarly):
            if work.stop.reason is None:
                raise
            hardware = []  # cancelling: prices are a nicety
        self.flavors = flavors_from(hardware)
        flavor = self.flavors.get(cfg.flavor or "")
        if hardware and (flavor is None or flavor.gpu is None):
            gpus = ", ".join(sorted(n for n, f in self.flavors.items() if f.gpu))
            raise UsageError(f"--flavor {cfg.flavor}: not a GPU flavor of Hugging Face Jobs; use one of {gpus}")

    def price(self, part: Part) -> tuple[float | None, bool]:
        flavor = self.flavors.get(part.flavor or "")
        return (flavor.usd_per_minute if flavor is not None else None), True

    def key(self, part: Part) -> str:
        return part.flavor or str(self.cfg.flavor)

    async def preflight(self, parts: list[Part]) -> None:
        """Before any GPU is paid for: every model exists, is accessible, and fits the flavor's GPU memory."""
        flavor = self.flavors[str(self.cfg.flavor)]
        for model in sorted({p.model for p in parts}):
            info = await self._hub(f"model {model}", lambda m=model: self.api.model_info(  # type: ignore[misc]
                m, expand=["safetensors", "gated"]))
            if getattr(info, "gated", False):
                await self._hub(f"model {model}", lambda m=model: self.api.auth_check(m))  # type: ignore[misc]
            size = self.sizes[model] = model_size(info)
            fit = fits(size, flavor)
            if fit is False:
                raise UsageError(
                    f"model {model} needs about {needs_gb(size):.0f} GB of GPU memory ({(size.params or 0) / 1e9:.1f}B "
                    f"parameters, and room for vLLM's KV cache); {flavor.name} has {flavor.memory_gb:.0f} GB: pick a "
                    "larger --flavor (`hfbatch estimate FILE --compare` lists the flavors that fit)")
            if fit is None:
                self.cost.note(f"{model}: the Hub gives no safetensors size, so whether it fits {flavor.name} was "
                               "not checked")

    async def _bucket(self) -> str:
        """The private bucket `{namespace}/hfbatch` (created once; refused if someone made it public)."""
        bucket_id = f"{self.namespace}/{BUCKET_NAME}"
        if not self.bucket_ready:
            await self._hub(f"creating the bucket {bucket_id}",
                            lambda: self.api.create_bucket(bucket_id, private=True, exist_ok=True))
            info = await self._hub(f"the bucket {bucket_id}", lambda: self.api.bucket_info(bucket_id))
            if not getattr(info, "private", True):
                raise UsageError(f"the bucket {bucket_id} is public: the batch's prompts would be readable by "
                                 f"anyone. Make it private on hf.co/buckets/{bucket_id}, then rerun")
            self.bucket_ready = True
        return bucket_id

    def _timeout(self, part: Part) -> int:
        if self.cfg.job_timeout:
            return parse_duration(self.cfg.job_timeout, "--job-timeout")
        flavor = self.flavors[str(self.cfg.flavor)]
        est = estimate_run(flavor, part.model, self.sizes.get(part.model, ModelSize(None, None)), part.est_tokens)
        minutes = est.minutes
        return max(MIN_TIMEOUT, int(2 * minutes * 60)) if minutes is not None else 2 * 3600

    async def launch(self, part: Part) -> None:
        from huggingface_hub import Volume

        cfg, store = self.cfg, self.store
        batch_id = self.work.batch_dir.name if self.work.batch_dir is not None else "batch"
        bucket_id = await self._bucket()
        files = self.files
        assert files is not None
        await self._hub(f"uploading part {part.id} to the bucket {bucket_id}", lambda: files.upload(
            bucket_id, store.path(part, "input.jsonl"), f"{batch_id}/{part.id}.input.jsonl"))
        flavor = self.flavors[str(cfg.flavor)]
        args = _split(cfg.vllm_args)
        if flavor.gpus > 1 and not any(a.startswith(("--tensor-parallel-size", "-tp")) for a in args):
            args = ["--tensor-parallel-size", str(flavor.gpus), *args]
        command = ["vllm", "run-batch", "-i", f"{MOUNT}/{part.id}.input.jsonl", "-o", f"{MOUNT}/{part.id}.output.jsonl",
                   "--model", part.model, *args]
        timeout = self._timeout(part)
        part.nonce = os.urandom(8).hex()
        part.status, part.stage, part.flavor = PartStatus.LAUNCHING, "LAUNCHING", cfg.flavor
        store.save()  # a crash from here on: the rerun finds the Job by its launch label before launching again
        what = f"launching the Job of part {part.id} ({part.model} on {cfg.flavor})"
        job = await self._hub(what, lambda: self.api.run_job(
            image=cfg.image or DEFAULT_IMAGE, command=command, flavor=cfg.flavor, timeout=timeout,
            secrets={"HF_TOKEN": cfg.token}, name=f"hfbatch-{part.id}",
            volumes=[Volume(type="bucket", source=bucket_id, mount_path=MOUNT, path=batch_id, read_only=False)],
            labels={"hfbatch-batch": batch_id, "hfbatch-part": part.id, "hfbatch-launch": part.nonce},
            namespace=self.namespace))
        part.status, part.started_at = PartStatus.RUNNING, time.time()
        self._update(part, job)
        store.save()
        if not self.work.detach:
            self._follow(part)

    def _update(self, part: Part, job: Any) -> None:
        part.runner_id, part.url = job.id, job.url
        part.stage = str(getattr(job.status.stage, "value", job.status.stage))
        if job.flavor:
            part.flavor = str(getattr(job.flavor, "value", job.flavor))
        d = job.durations
        running = d.running_secs if d is not None else None
        if running is None and job.started_at is not None:
            end = job.finished_at.timestamp() if job.finished_at is not None else time.time()
            running = max(0.0, end - job.started_at.timestamp())
        if running is not None:
            part.billed_seconds = float(running)
        if part.stage in TERMINAL:
            part.finished_at = job.finished_at.timestamp() if job.finished_at is not None else time.time()
            part.status = PartStatus.ENDED
            if part.stage == "CANCELED" and not part.cancelled:
                part.message = "cancelled outside hfbatch (on hf.co or with `hf jobs cancel`)"
            if part.stage == "ERROR":
                log = self.logs.get(part.id)
                why = job.status.message or "the Job failed"
                tail = log.tail() if log is not None else ""
                part.message = f"{why}; its log ends: {tail}" if tail else why
                if log is not None and log.rejected is not None:
                    part.rejected = log.rejected[0]

    def _follow(self, part: Part) -> None:
        """Threads that follow the Job's logs and GPU metrics (huggingface_hub's streams block)."""
        log = self.logs.setdefault(part.id, LogTail(self.cfg.token))
        ended = self.followers[part.id] = threading.Event()
        api, ns, job_id = self.api, self.namespace, part.runner_id

        def logs() -> None:
            try:
                for line in api.fetch_job_logs(job_id=job_id, namespace=ns, follow=True):
                    log.feed(line)
            except Exception:  # noqa: BLE001 - the logs are a view: inspect_job decides how the Job ended
                pass
            finally:
                ended.set()

        def metrics() -> None:
            try:
                for sample in api.fetch_job_metrics(job_id=job_id, namespace=ns, follow=True):
                    if isinstance(sample, dict):
                        self.metrics[part.id] = sample
                    if ended.is_set():
                        return
            except Exception:  # noqa: BLE001 - metrics are a nicety
                pass

        threading.Thread(target=logs, name=f"hfbatch-logs-{part.id}", daemon=True).start()
        threading.Thread(target=metrics, name=f"hfbatch-metrics-{part.id}", daemon=True).start()

    async def _inspect(self, part: Part) -> None:
        job = await self._hub(f"the Job of part {part.id}", lambda: self.api.inspect_job(
            job_id=part.runner_id, namespace=self.namespace))
        self.inspected[part.id] = time.monotonic()
        self._update(part, job)

    async def reattach(self, part: Part) -> bool:
        if part.status == PartStatus.LAUNCHING:
            found = await self._hub(f"looking for the Job of part {part.id}", lambda: list(self.api.list_jobs(
                labels={"hfbatch-launch": str(part.nonce)}, namespace=self.namespace)))
            if not found:
                part.status = PartStatus.WRITTEN  # never launched: its lines go to a new part
                return False
            part.status = PartStatus.RUNNING
            part.started_at = part.started_at or time.time()
            self._update(part, found[0])
        else:
            try:
                await self._inspect(part)
            except UsageError:  # the Hub no longer knows it (deleted): collect what it left in the bucket
                part.status, part.stage, part.finished_at = PartStatus.ENDED, "DELETED", time.time()
                part.message = "the Hub no longer knows this Job (deleted?): its unanswered lines are sent again"
                return False
        self.logs.setdefault(part.id, LogTail(self.cfg.token))
        if part.status == PartStatus.ENDED:
            return False
        self._follow(part)
        return True

    async def poll(self, part: Part) -> None:
        log = self.logs.get(part.id)
        if log is not None and log.progress is not None:
            part.progress_done, part.elapsed = log.progress.done, log.progress.elapsed
        ended = self.followers.get(part.id)
        due = time.monotonic() - self.inspected.get(part.id, 0.0) >= self.inspect_every
        if not due and not (ended is not None and ended.is_set()):
            return
        try:
            await self._inspect(part)
            self.inspect_errors = 0
        except StoppedEarly:
            self.inspect_errors += 1  # a hiccup of the Hub: the Job runs on; give up after a few minutes of it
            self.inspected[part.id] = time.monotonic()
            if self.inspect_errors > 20:
                raise
            return
        if part.status == PartStatus.ENDED:
            if log is not None and log.progress is not None:
                part.progress_done, part.elapsed = log.progress.done, log.progress.elapsed
            self.store.save()
        elif ended is not None and ended.is_set() and not self.work.detach:
            self._follow(part)  # the stream closed early: follow it again

    async def halt(self, part: Part, *, cancel: bool, hard: bool) -> bool:
        if not cancel:
            self.cost.note(f"the Job of part {part.id} ({part.url}) keeps running (and is billed): rerun the same "
                           "command to follow it and collect its answers, or `hfbatch cancel` the batch")
            return False
        part.cancelled = True
        if part.status == PartStatus.RUNNING and part.runner_id:
            await self._hub(f"cancelling the Job of part {part.id}", lambda: self.api.cancel_job(
                job_id=part.runner_id, namespace=self.namespace))
            self.inspected[part.id] = 0.0  # look again at once
        return True

    async def fetch(self, part: Part) -> Path | None:
        if part.runner_id is None or self.files is None:
            return None
        batch_id = self.work.batch_dir.name if self.work.batch_dir is not None else "batch"
        local = self.store.path(part, "output.jsonl")
        files = self.files
        got = await self._hub(f"downloading the answers of part {part.id}", lambda: files.download(
            f"{self.namespace}/{BUCKET_NAME}", f"{batch_id}/{part.id}.output.jsonl", local))
        return local if got else None

    async def cleanup(self) -> None:
        """Every part is collected: its files leave the bucket (they hold prompts and answers) and this disk."""
        if self.files is not None and self.namespace and self.work.batch_dir is not None:
            batch_id = self.work.batch_dir.name
            remotes = [f"{batch_id}/{p.id}.{kind}" for p in self.store.parts if p.runner_id
                       for kind in ("input.jsonl", "output.jsonl")]
            files = self.files
            if remotes:
                try:
                    await self._hub("removing the batch's files from the bucket", lambda: files.delete(
                        f"{self.namespace}/{BUCKET_NAME}", remotes))
                except (UsageError, StoppedEarly) as e:
                    self.cost.note(f"the batch's files stay in the bucket {self.namespace}/{BUCKET_NAME} ({e})")
        await super().cleanup()

    def note(self, parts: list[Part]) -> str:
        running = [p for p in parts if p.status in (PartStatus.RUNNING, PartStatus.LAUNCHING)]
        bits = []
        for p in running[:3]:
            bit = f"{p.id} {p.stage} {p.progress_done}/{p.requests}"
            m = self.metrics.get(p.id)
            gpus = m.get("gpus") if isinstance(m, dict) else None
            if isinstance(gpus, dict) and gpus:
                util = [g.get("utilization") for g in gpus.values() if isinstance(g, dict)]
                used = sum(g.get("memory_used_bytes") or 0 for g in gpus.values() if isinstance(g, dict))
                total = sum(g.get("memory_total_bytes") or 0 for g in gpus.values() if isinstance(g, dict))
                nums = [u for u in util if isinstance(u, int | float)]
                if nums:
                    bit += f" GPU {sum(nums) / len(nums):.0f}%"
                if total:
                    bit += f" {used / 1e9:.1f}/{total / 1e9:.0f} GB"
            bits.append(bit)
        return " · ".join(bits)


def _split(text: str | None) -> list[str]:
    import shlex

    try:
        return shlex.split(text or "")
    except ValueError as e:
        raise UsageError(f"--vllm-args {text!r}: {e}") from None
