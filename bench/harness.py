"""Shared pieces of the benchmark harness: paths, the referee's mock provider, measured child runs.

Nothing here imports hfbatch: every client (hfbatch and the referee's baselines) runs as a child
process, measured from the outside (wall by time.perf_counter around the child, CPU and peak RSS
from the rusage os.wait4 returns for it).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"


def referee_dir() -> Path:
    """The referee (mock provider, input generator, baselines): $HFBATCH_REFEREE, else ../shared/referee."""
    override = os.environ.get("HFBATCH_REFEREE")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "referee"
    if not (path / "mock_provider.js").is_file():
        sys.exit(f"bench: referee not found at {path} (set HFBATCH_REFEREE to its directory)")
    return path


def venv_python() -> str:
    p = REPO / ".venv" / "bin" / "python"
    return str(p) if p.exists() else sys.executable


def hfbatch_exe() -> list[str]:
    p = REPO / ".venv" / "bin" / "hfbatch"
    return [str(p)] if p.exists() else [venv_python(), "-m", "hfbatch"]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a measured child: no proxies (loopback only), nothing resumable."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    # Byte-code caches as an installed package has them (this sandbox sets PYTHONDONTWRITEBYTECODE,
    # and the editable hfbatch/ has no __pycache__): compiled once into bench/out/pycache, which
    # keeps the source trees untouched.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(OUT / "pycache")
    for k in ("HFBATCH_BASE_URL", "HFBATCH_CONCURRENCY", "HFBATCH_ROUTER_URL", "HFBATCH_HOME", "HFBATCH_DEBUG"):
        env.pop(k, None)
    env.update(extra)
    return env


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mock:
    """`node mock_provider.js PORT LATENCY_MS` on 127.0.0.1, on a free port."""

    def __init__(self, referee: Path, latency_ms: int, log: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.referee, self.latency_ms, self.env = referee, latency_ms, env
        self.log = log or (OUT / f"mock-{latency_ms}ms.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Mock:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a free port can be taken between the probe and node's listen: retry
            self.port = _free_port()
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    ["node", str(self.referee / "mock_provider.js"), str(self.port), str(self.latency_ms)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env={**os.environ, **(self.env or {})},
                )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    self.stats()
                    return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"the mock provider did not start (see {self.log})")

    def _call(self, method: str, path: str) -> dict[str, Any]:
        req = urllib.request.Request(self.base + path, method=method, data=b"" if method == "POST" else None)
        with _NO_PROXY.open(req, timeout=10) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/__stats")

    def reset(self) -> None:
        self._call("POST", "/__reset")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> Mock:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_HZ = os.sysconf("SC_CLK_TCK")
_NCPU = len(os.sched_getaffinity(0))


def system_busy_s() -> float:
    """CPU-seconds the whole machine has been busy (all CPUs; /proc/stat, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / _HZ  # user nice system idle iowait irq softirq steal


def proc_cpu_s(pid: int | None) -> float:
    """utime+stime of a live process (the mock), in seconds; 0 if unknown."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _HZ
    except (OSError, IndexError, ValueError):
        return 0.0


def foreign_share(seconds: float = 1.0) -> float:
    """Share of the machine's CPUs busy over `seconds` while we run nothing (other tenants)."""
    b0, t0 = system_busy_s(), time.monotonic()
    time.sleep(seconds)
    return (system_busy_s() - b0) / ((time.monotonic() - t0) * _NCPU)


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (at most max_wait s) until other processes use < threshold of the CPUs; the last share seen."""
    deadline = time.monotonic() + max_wait
    while True:
        share = foreign_share(0.5)
        if share < threshold or time.monotonic() >= deadline:
            return share


def run_measured(cmd: list[str], env: dict[str, str], timeout: float, *, stdout: Path | None = None,
                 stderr: Path | None = None, cwd: Path | None = None, mock_pid: int | None = None) -> dict[str, Any]:
    """Run one child; wall from perf_counter around it, CPU (user+sys) and peak RSS from os.wait4.

    Also how much CPU other processes (neither the child nor the mock) took meanwhile: the machine
    may be shared, and contention inflates both wall and CPU figures."""
    out = open(stdout, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115
    err = open(stderr, "wb") if stderr else subprocess.DEVNULL  # noqa: SIM115
    killed = threading.Event()
    busy0, mock0 = system_busy_s(), proc_cpu_s(mock_pid)
    try:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd)

        def kill() -> None:
            killed.set()
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        busy, mock_cpu = system_busy_s() - busy0, proc_cpu_s(mock_pid) - mock0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    finally:
        for f in (out, err):
            if f is not subprocess.DEVNULL:
                f.close()  # type: ignore[union-attr]
    return {
        "wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "cpu_s": ru.ru_utime + ru.ru_stime,
        "maxrss_kb": ru.ru_maxrss, "rc": p.returncode, "timed_out": killed.is_set(),
        "vol_ctx": ru.ru_nvcsw, "invol_ctx": ru.ru_nivcsw,
        "mock_cpu_s": mock_cpu,
        # CPU used by other processes during the run, as a share of all CPUs (0 = machine to ourselves)
        "foreign_share": max(0.0, busy - ru.ru_utime - ru.ru_stime - mock_cpu) / (wall * _NCPU),
    }


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            n += chunk.count(b"\n")
    return n


def gen_input(referee: Path, n: int) -> Path:
    """The referee's input file of n chat requests, cached under bench/out/inputs/."""
    d = OUT / "inputs"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"chat-{n}.jsonl"
    if path.exists() and count_lines(path) == n:
        return path
    tmp = path.with_suffix(".tmp")
    subprocess.run([venv_python(), str(referee / "gen_input.py"), str(n), str(tmp)], check=True)
    os.replace(tmp, path)
    return path


def source_fingerprint() -> dict[str, Any]:
    """Which hfbatch was measured (the tree changes under us): sha256 over hfbatch/*.py, newest mtime."""
    import hashlib

    h, newest, files = hashlib.sha256(), 0.0, sorted((REPO / "hfbatch").glob("*.py"))
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        newest = max(newest, f.stat().st_mtime)
    return {"sha256": h.hexdigest()[:16], "files": len(files),
            "newest_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(newest))}


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        node = "?"
    py = subprocess.run([venv_python(), "-c", "import sys;print(sys.version.split()[0])"],
                        capture_output=True, text=True).stdout.strip()
    mem_kb = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model, "python": py, "node": node,
            "kernel": platform.release(), "mem_gb": round(mem_kb / 1024 / 1024, 1)}
