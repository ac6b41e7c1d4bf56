"""End to end: an answer over --max-response-bytes (default 64 MB) ends as one `response_too_large` error line,
whatever the server sends (a gzip bomb, a 1 GiB Content-Length, an endless chunked body), with the process's
peak memory measured (the kernel's ru_maxrss of the CLI process) and the flag's plumbing (env, resume,
--retry-failed).

The hostile server is raw sockets in a thread of this process, streaming what it sends as it sends it; the CLI
is killed past CEILING so that a regression cannot take a shared machine down with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    MIB,
    assert_clean,
    batch_from,
    chat_line,
    check_error_line,
    cli_env,
    ids,
    read_jsonl,
    write_jsonl,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the RSS watchdog")

BOUND = 600 * MIB  # the default cap is 64 MB: a run stays far under this whatever it is sent
CEILING = 2048 * MIB  # the watchdog kills the CLI past this (the old code went past 6 GB)
DEADLINE = 90.0  # seconds; the default --timeout is 300 s: a run that waits for it is killed first
GIB = 1 << 30


class HostileServer:
    """HTTP/1.1 on a raw socket: GET (the price list) gets a 404; every POST gets `mode`'s answer."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.posts = 0
        self.sent = 0  # body bytes written to the POSTs' connections before they ended
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    while len(buf) < length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    buf = buf[length:]
                    if head.startswith(b"GET "):
                        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
                        continue
                    self.posts += 1
                    self._attack(conn)
                    return
            except OSError:
                return  # the client hung up: what a capped client does

    def _send(self, conn: socket.socket, data: bytes) -> None:
        if self.stop.is_set():
            raise OSError("the test is over")
        conn.sendall(data)
        self.sent += len(data)

    def _attack(self, conn: socket.socket) -> None:
        if self.mode == "gzip-bomb":  # ~2 MB on the wire that inflate to 2 GiB
            from conftest import deflate_bomb

            length, parts = deflate_bomb(2 * GIB // MIB)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                         b"Content-Length: %d\r\n\r\n" % length)
            for part in parts:
                self._send(conn, part)
        elif self.mode == "huge-length":  # announces 1 GiB and sends it
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % GIB)
            zeros = bytes(MIB)
            for _ in range(GIB // MIB):
                self._send(conn, zeros)
        elif self.mode == "endless-chunked":  # never ends
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%b\r\n" % (MIB, bytes(MIB))
            while True:
                self._send(conn, chunk)
        conn.shutdown(socket.SHUT_WR)


@dataclass
class Measured:
    returncode: int
    peak_rss: int  # bytes
    elapsed: float
    killed: str | None
    stdout: str
    stderr: str


def run_measured(args: list[str], cwd: Path, env: dict[str, str]) -> Measured:
    """`python -m hfbatch submit *args`, with its peak RSS from the kernel (wait4's ru_maxrss), killed past
    CEILING or DEADLINE."""
    out_path, err_path = cwd / "_stdout", cwd / "_stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "hfbatch", "submit", *args], cwd=cwd, env=env,
                             stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    t0 = time.monotonic()
    killed: str | None = None
    while True:
        pid, status, usage = os.wait4(p.pid, 0 if killed else os.WNOHANG)
        if pid:
            break
        rss = _rss(p.pid)
        if rss > CEILING:
            killed = f"RSS {rss / MIB:.0f} MB passed the {CEILING / MIB:.0f} MB ceiling"
        elif time.monotonic() - t0 > DEADLINE:
            killed = f"still running after {DEADLINE:.0f} s"
        if killed:
            os.kill(p.pid, signal.SIGKILL)
        else:
            time.sleep(0.01)
    elapsed = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return Measured(p.returncode, usage.ru_maxrss * 1024, elapsed, killed,
                    out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


@pytest.fixture
def hostile() -> Iterator[Callable[[str], HostileServer]]:
    servers: list[HostileServer] = []

    def make(mode: str) -> HostileServer:
        servers.append(HostileServer(mode))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.mark.parametrize("client", ["lean", "aiohttp"])
@pytest.mark.parametrize("mode", ["gzip-bomb", "huge-length", "endless-chunked"])
def test_a_hostile_answer_ends_as_response_too_large_in_bounded_memory(
        tmp_path: Path, hostile: Callable[[str], HostileServer], mode: str, client: str) -> None:
    srv = hostile(mode)
    write_jsonl(tmp_path / "in.jsonl", [chat_line("big")])
    env = cli_env(tmp_path, None, {"HFBATCH_HTTP": "aiohttp" if client == "aiohttp" else None})
    r = run_measured(["in.jsonl", "--base-url", srv.url, "-q"], tmp_path, env)
    figures = (f"{mode} via {client}: peak RSS {r.peak_rss / MIB:.0f} MB in {r.elapsed:.1f} s, "
               f"{srv.sent / MIB:.0f} MB of body sent; {r.killed or 'exited ' + str(r.returncode)}")
    print(figures)
    assert r.killed is None, f"{figures}; stderr: {r.stderr[-1000:]}"
    assert r.peak_rss < BOUND, figures
    assert r.returncode == 3, f"{figures}; stderr: {r.stderr[-1000:]}"  # finished, a request failed
    assert_clean(tmp_path, r.stdout, r.stderr, set())
    assert read_jsonl(tmp_path / "in.output.jsonl") == []
    [line] = read_jsonl(tmp_path / "in.errors.jsonl")
    check_error_line(line)
    assert line["custom_id"] == "big" and line["response"] is None
    assert line["error"]["code"] == "response_too_large", line
    assert "--max-response-bytes" in line["error"]["message"] and "64 MB" in line["error"]["message"]
    assert srv.posts == 1, "a too-large answer was retried"
    assert batch_from(r.stdout)["request_counts"] == {"total": 1, "completed": 0, "failed": 1}


def test_the_flag_env_resume_and_retry_failed(tmp_path: Path, make_fake, run_cli) -> None:
    """A cap under the fake's answers (~300 bytes): every line is response_too_large, final (neither retried
    nor re-sent by --retry-failed); the cap is kept in the batch's options for `hfbatch resume`."""
    fake = make_fake()
    write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", f"hello {i}") for i in range(3)])
    p = run_cli(["in.jsonl", "-q", "--max-response-bytes", "100"])
    assert p.returncode == 3, p.stderr
    err = read_jsonl(tmp_path / "in.errors.jsonl")
    assert sorted(ids(err)) == ["r0", "r1", "r2"]
    for line in err:
        check_error_line(line)
        assert line["error"]["code"] == "response_too_large"
        assert "100 bytes" in line["error"]["message"]
    sent = fake.stats()["requests"]
    assert sent == 3, "a too-large answer was retried"
    batch = batch_from(p.stdout)
    meta_path = tmp_path / "_home" / "hfbatch" / "batches" / batch["id"] / "meta.json"
    assert json.loads(meta_path.read_text())["options"]["max_response_bytes"] == 100

    p = run_cli(["in.jsonl", "-q", "--max-response-bytes", "100", "--retry-failed"])
    assert p.returncode == 3, p.stderr
    assert fake.stats()["requests"] == sent, "--retry-failed re-sent a response_too_large line"

    # The environment variable, with a unit: 1KB is more than the fake's answers, 100 bytes less.
    (tmp_path / "in2.jsonl").write_bytes((tmp_path / "in.jsonl").read_bytes())
    p = run_cli(["in2.jsonl", "-q"], env_extra={"HFBATCH_MAX_RESPONSE_BYTES": "1KB"})
    assert p.returncode == 0, p.stderr
    p = run_cli(["in2.jsonl", "-q", "-o", "b.out.jsonl", "-e", "b.err.jsonl"],
                env_extra={"HFBATCH_MAX_RESPONSE_BYTES": "100"})
    assert p.returncode == 3, p.stderr
    assert {e["error"]["code"] for e in read_jsonl(tmp_path / "b.err.jsonl")} == {"response_too_large"}


@pytest.mark.parametrize("value", ["lots", "0", "-5MB", "12XB"])
def test_a_bad_size_is_a_usage_error(tmp_path: Path, fake, run_cli, value: str) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat_line("r0")])
    p = run_cli(["in.jsonl", "-q", "--max-response-bytes", value])
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "--max-response-bytes" in p.stderr and "64MB" in p.stderr
    assert fake.stats()["requests"] == 0
