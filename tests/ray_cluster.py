"""One local Ray for the Ray engine's tests, started once per `pytest` run, in the background.

The controlling pytest process (xdist's, or the only one) starts it when the run selects tests/e2e/test_ray_engine.py
and `ray` is installed: a child process that calls `ray.init(num_cpus=2, num_gpus=1)` (one declared GPU, no real
one: the GPU mode runs the stand-in `vllm`) and waits. Its start (~5 s) overlaps the other tests; every xdist worker
joins the same cluster through the address it writes; it is stopped (SIGTERM: Ray ends the processes it started)
when the run ends. The `ray_address` fixture waits for it, or skips saying why when `ray` is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ENV = "HFBATCH_TEST_RAY_ADDRESS_FILE"
TARGET = Path(__file__).resolve().parent / "e2e" / "test_ray_engine.py"
OWNER = """
import os, signal, sys
import ray
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
         logging_level="ERROR")
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(ray.get_runtime_context().gcs_address)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
signal.pause()
"""


def _selected(config: pytest.Config) -> bool:
    """Does this run include the Ray engine's tests (by the paths it was given)?"""
    paths = [a.split("::")[0] for a in config.args] or [str(config.rootpath / "tests")]
    for a in paths:
        p = Path(config.invocation_params.dir, a).resolve()
        if p == TARGET or (p.is_dir() and TARGET.is_relative_to(p)):
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or ENV in os.environ or importlib.util.find_spec("ray") is None:
        return
    if not _selected(config):
        return
    # Ray's token authentication: its clients send the token (~/.ray/auth_token) only when told to, and every
    # process of the run inherits this (the cluster's owner, the workers, the CLI under test).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    folder = tempfile.mkdtemp(prefix="hfbatch-ray-")
    address_file = os.path.join(folder, "address")
    log = open(os.path.join(folder, "log"), "wb")  # noqa: SIM115 - the child's, closed at unconfigure
    proc = subprocess.Popen([sys.executable, "-c", OWNER, address_file], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    config.stash[_KEY] = (proc, log)
    Path(folder, "pid").write_text(str(proc.pid))
    os.environ[ENV] = address_file  # the xdist workers inherit it


_KEY = pytest.StashKey[tuple[subprocess.Popen[bytes], object]]()


def pytest_unconfigure(config: pytest.Config) -> None:
    found = config.stash.get(_KEY, None)
    if found is None:
        return
    proc, log = found
    if proc.poll() is None:
        proc.terminate()  # ray.init's SIGTERM handler ends the cluster's processes, then the owner
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    log.close()  # type: ignore[attr-defined]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    pytest.importorskip("ray", reason="the `ray` extra is not installed: pip install 'hfbatch[ray]'")
    address_file = os.environ.get(ENV)
    if not address_file:
        pytest.skip("no local Ray was started for this run (run the Ray tests by their path, or the whole suite)")
    folder = Path(os.path.dirname(address_file))
    deadline = time.monotonic() + 90
    while not os.path.exists(address_file):
        if time.monotonic() > deadline or not _alive(int((folder / "pid").read_text())):
            said = (folder / "log").read_text(errors="replace")[-2000:]
            pytest.fail(f"the local Ray did not start: {said}")
        time.sleep(0.05)
    yield Path(address_file).read_text()
