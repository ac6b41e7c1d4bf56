"""The vLLM engine (`--engine vllm`): the batch through vLLM's own batch runner on this machine, `vllm run-batch
-i PART -o OUT --model M`, one run per model, one at a time (one GPU); the lifecycle is vllm_parts.PartEngine.

The runner is a child process in its own session (a Ctrl-C at the terminal reaches hfbatch, which stops it
and keeps what it answered), its stdout and stderr go to the part's log in the batch folder (progress lines,
the reason of a failure), and its output file is read as it grows (vLLM 0.33 writes each answer as soon as
every earlier one is done). If hfbatch is killed, the runner goes on: the rerun finds it by its process id
and the part's path in its command line, and follows it instead of starting another.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ..config import RunConfig
from ..errors import UsageError
from .vllm_lines import LogTail
from .vllm_parts import PartEngine
from .vllm_store import Part, PartStatus, create_private, pid_alive


def find_vllm() -> str:
    """The `vllm` executable: $HFBATCH_VLLM, else `vllm` on PATH; UsageError (exit 2) saying how to get it."""
    explicit = os.environ.get("HFBATCH_VLLM")
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise UsageError(f"HFBATCH_VLLM={explicit}: not an executable file")
        return found
    found = shutil.which("vllm")
    if found is None:
        raise UsageError("--engine vllm: `vllm` is not installed here (not on PATH; HFBATCH_VLLM is not set). "
                         "Install it on a machine with a GPU (pip install vllm; https://docs.vllm.ai), or point "
                         "HFBATCH_VLLM at it, or run on Hugging Face's GPUs with --engine hf-jobs --flavor ...")
    return found


class VllmEngine(PartEngine):
    name = "vllm"
    parallel = 1

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.binary = find_vllm()
        try:
            self.args = shlex.split(cfg.vllm_args or "")
        except ValueError as e:
            raise UsageError(f"--vllm-args {cfg.vllm_args!r}: {e}") from None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        if cfg.gpu_price is None:
            self.cost.note("the cost of this machine's GPU time is unknown: pass --gpu-price USD_PER_HOUR")

    def price(self, part: Part) -> tuple[float | None, bool]:
        return (None if self.cfg.gpu_price is None else self.cfg.gpu_price / 60), False

    async def launch(self, part: Part) -> None:
        store = self.store
        out = store.path(part, "output.jsonl")
        os.close(create_private(out))  # vLLM truncates it: it keeps our mode
        log = create_private(store.path(part, "log"), truncate=False)
        cmd = [self.binary, "run-batch", "-i", str(store.path(part, "input.jsonl")), "-o", str(out),
               "--model", part.model, *self.args]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        except OSError as e:
            raise UsageError(f"cannot start {self.binary}: {e.strerror or e}") from None
        finally:
            os.close(log)
        self.procs[part.id] = proc
        part.runner_id, part.flavor = str(proc.pid), "local"
        part.status, part.stage, part.started_at = PartStatus.RUNNING, "RUNNING", time.time()
        self.logs[part.id] = LogTail(self.cfg.token)
        self.store.save()

    async def reattach(self, part: Part) -> bool:
        log = self.logs[part.id] = LogTail(self.cfg.token)
        log.feed_file(self.store.path(part, "log"))
        pid = int(part.runner_id or 0)
        if part.status == PartStatus.RUNNING and pid_alive(pid) and self._ours(pid, part):
            return True
        part.status, part.finished_at = PartStatus.ENDED, part.finished_at or time.time()
        part.stage = "ENDED"
        if log.progress is not None:
            part.progress_done, part.elapsed = log.progress.done, log.progress.elapsed
        return False

    def _ours(self, pid: int, part: Part) -> bool:
        """Is process `pid` the runner of this part (not another process that got its id)?"""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True  # no /proc here: trust the id
        return str(self.store.path(part, "input.jsonl")).encode() in cmdline

    async def poll(self, part: Part) -> None:
        log = self.logs.get(part.id)
        if log is None:
            log = self.logs[part.id] = LogTail(self.cfg.token)
        log.feed_file(self.store.path(part, "log"))
        if log.progress is not None:
            part.progress_done, part.elapsed = log.progress.done, log.progress.elapsed
        self.take_output(part, self.store.path(part, "output.jsonl"))
        proc = self.procs.get(part.id)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return
            part.exit_code = code
        elif pid_alive(int(part.runner_id or 0)):
            return  # a runner started by an earlier hfbatch: its exit code is not ours to read
        log.feed_file(self.store.path(part, "log"))
        if log.progress is not None:
            part.progress_done, part.elapsed = log.progress.done, log.progress.elapsed
        part.status, part.finished_at = PartStatus.ENDED, time.time()
        if part.cancelled:
            part.stage = "CANCELED"
        else:
            part.stage = "COMPLETED" if part.exit_code == 0 else "ERROR"
        if log.rejected is not None:
            part.rejected = log.rejected[0]
        if part.stage == "ERROR":
            part.message = log.tail() or None
        self.store.save()

    async def halt(self, part: Part, *, cancel: bool, hard: bool) -> bool:
        part.cancelled = True
        pid = int(part.runner_id or 0)
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL if hard else signal.SIGTERM)  # its own session: the group is its
            except ProcessLookupError:
                pass
            except PermissionError:
                pass
        return True

    async def close(self) -> None:
        """A runner must not outlive the hfbatch that started it unless hfbatch is killed: stop what is left."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
