"""Shared fixtures and helpers for the hfbatch test suite.

The e2e tests run `python -m hfbatch submit ...` as a real subprocess against a real local HTTP
server (hfbatch.fake_provider), never mocks. Every run is checked for two global invariants:
no Python traceback on stderr, and the token never appears in any stream or file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types import Batch, Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from openai.types.shared import ErrorObject

from hfbatch.testing.fake_provider import FakeConfig, ThreadedFakeProvider

pytest_plugins = ["ray_cluster"]  # one local Ray for the Ray engine's tests (tests/ray_cluster.py)

TOKEN = "hf_test_secret_token_123"
CHAT_MODEL = "test-org/tiny-chat"
EMBED_MODEL = "test-org/tiny-embed"
# Nothing listens on the discard port: a run that forgot its fake fails fast, never reaches the internet.
NOWHERE = "http://127.0.0.1:9"
LINE_ID_RE = re.compile(r"^batch_req_[0-9a-f]+$")
OUTPUT_KEYS = ["id", "custom_id", "response", "error"]
RESPONSE_KEYS = ["status_code", "request_id", "body"]
ERROR_ENVELOPE_KEYS = {"message", "type", "param", "code"}
NO_ANSWER_CODES = {"request_timeout", "connection_error", "invalid_response"}

_BODY_MODELS: dict[str, Any] = {
    "chat.completion": ChatCompletion,
    "response": Response,
    "list": CreateEmbeddingResponse,
    "text_completion": Completion,
}
_URL_OBJECTS = {
    "/v1/chat/completions": "chat.completion",
    "/v1/responses": "response",
    "/v1/embeddings": "list",
    "/v1/completions": "text_completion",
}


# --------------------------------------------------------------------------- input helpers


def chat_line(cid: str | None, text: str = "hello", model: str = CHAT_MODEL, **body: Any) -> dict[str, Any]:
    """One /v1/chat/completions batch line; `body` adds/overrides body fields."""
    b: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}], **body}
    line: dict[str, Any] = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": b}
    if cid is None:
        del line["custom_id"]
    return line


def responses_line(cid: str, text: str = "hello", model: str = CHAT_MODEL, **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/responses",
            "body": {"model": model, "input": text, **body}}


def embeddings_line(cid: str, inp: Any = "hello", model: str = EMBED_MODEL, **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": model, "input": inp, **body}}


def completions_line(cid: str, prompt: Any = "hello", model: str = CHAT_MODEL) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": prompt}}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def write_jsonl(path: Path | str, objs: Iterable[Any], newline: bytes = b"\n") -> Path:
    """Write objects (dicts are JSON-encoded, bytes/str written as is) one per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for o in objs:
        if isinstance(o, bytes):
            parts.append(o)
        elif isinstance(o, str):
            parts.append(o.encode())
        else:
            parts.append(dumps(o))
    path.write_bytes(b"".join(p + newline for p in parts))
    return path


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Parse a JSONL file; every line must be complete (newline-terminated) JSON. Missing file: []."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if not data:
        return []
    assert data.endswith(b"\n"), f"{path.name}: last line is incomplete: {data[-200:]!r}"
    out = []
    for i, raw in enumerate(data.split(b"\n")[:-1], 1):
        assert raw.strip(), f"{path.name}:{i}: blank line in output"
        try:
            out.append(json.loads(raw))
        except json.JSONDecodeError as e:  # pragma: no cover - a failure path
            raise AssertionError(f"{path.name}:{i}: not JSON ({e}): {raw[:200]!r}") from None
    return out


def parse_jsonl_text(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- hostile answers

MIB = 1 << 20
_ZERO_MIB = bytes(MIB)


@functools.cache
def _bomb_parts(wbits: int) -> tuple[bytes, bytes, bytes]:
    """A deflate stream in three parts: its start (with the gzip/zlib header), a segment that inflates to
    1 MiB of zeros and can be repeated (a full flush byte-aligns it and resets the window), its final block."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = c.compress(_ZERO_MIB) + c.flush(zlib.Z_FULL_FLUSH)
    seg = c.compress(_ZERO_MIB) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush()
    trailer = {31: 8, 15: 4, -15: 0}[wbits]
    return head, seg, tail[:len(tail) - trailer]


@functools.cache
def _zeros_check(wbits: int, mib: int) -> bytes:
    """The trailer of a stream of `mib` MiB of zeros: gzip's CRC-32 and size, zlib's Adler-32, nothing for raw."""
    if wbits == -15:
        return b""
    value = 0 if wbits == 31 else 1
    fold = zlib.crc32 if wbits == 31 else zlib.adler32
    for _ in range(mib):
        value = fold(_ZERO_MIB, value)
    if wbits == 31:
        return struct.pack("<II", value, (mib * MIB) & 0xFFFFFFFF)
    return struct.pack(">I", value)


def deflate_bomb(mib: int, wbits: int = 31) -> tuple[int, Iterator[bytes]]:
    """A valid gzip (wbits 31), zlib (15) or raw deflate (-15) stream that inflates to `mib` MiB of zeros,
    as (its length, its parts): about 1 KB per MiB, generated while it is sent (nothing big is held)."""
    head, seg, end = _bomb_parts(wbits)
    trailer = _zeros_check(wbits, mib)
    length = len(head) + (mib - 1) * len(seg) + len(end) + len(trailer)

    def parts() -> Iterator[bytes]:
        yield head
        for _ in range(mib - 1):
            yield seg
        yield end + trailer

    return length, parts()


# --------------------------------------------------------------------------- oracles


def check_body(body: Any, url: str | None = None) -> Any:
    """Validate a 2xx body with the openai SDK's own model for its endpoint; returns the model."""
    assert isinstance(body, dict), body
    kind = _URL_OBJECTS[url] if url else body.get("object")
    assert body.get("object") == kind, (url, body.get("object"))
    model = _BODY_MODELS[kind]
    return model.model_validate(body, strict=True)


def check_output_line(obj: dict[str, Any], url: str | None = None) -> dict[str, Any]:
    """An output-file line: exact keys in OpenAI's order, 2xx, request_id, body valid for the endpoint."""
    assert list(obj) == OUTPUT_KEYS, list(obj)
    assert isinstance(obj["id"], str) and LINE_ID_RE.match(obj["id"]), obj["id"]
    assert isinstance(obj["custom_id"], str) and obj["custom_id"], obj
    resp = obj["response"]
    assert isinstance(resp, dict) and list(resp) == RESPONSE_KEYS, resp
    assert isinstance(resp["status_code"], int) and 200 <= resp["status_code"] < 300, resp["status_code"]
    assert isinstance(resp["request_id"], str) and resp["request_id"], resp
    assert obj["error"] is None
    check_body(resp["body"], url)
    return obj


def check_error_envelope(body: Any) -> dict[str, Any]:
    """OpenAI's error envelope {"error": {"message", "type", "param", "code"}}."""
    assert isinstance(body, dict) and list(body) == ["error"], body
    err = body["error"]
    assert isinstance(err, dict) and ERROR_ENVELOPE_KEYS <= set(err), err
    ErrorObject.model_validate(err, strict=True)
    return err


def check_error_line(obj: dict[str, Any]) -> dict[str, Any]:
    """An error-file line: either an HTTP answer (response set, error null) or no answer (response null)."""
    assert list(obj) == OUTPUT_KEYS, list(obj)
    assert isinstance(obj["id"], str) and LINE_ID_RE.match(obj["id"]), obj["id"]
    assert obj["custom_id"] is None or (isinstance(obj["custom_id"], str) and obj["custom_id"]), obj
    if obj["response"] is not None:
        resp = obj["response"]
        assert list(resp) == RESPONSE_KEYS, resp
        assert isinstance(resp["status_code"], int) and not 200 <= resp["status_code"] < 300, resp
        assert isinstance(resp["request_id"], str) and resp["request_id"], resp
        assert obj["error"] is None, obj
        check_error_envelope(resp["body"])
    else:
        err = obj["error"]
        assert isinstance(err, dict) and list(err) == ["code", "message"], err
        assert isinstance(err["code"], str) and err["code"], err
        assert isinstance(err["message"], str) and err["message"], err
    return obj


def check_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The summary is an OpenAI Batch object plus our "hfbatch" figures."""
    Batch.model_validate(batch, strict=True)
    assert batch["object"] == "batch"
    hb = batch["hfbatch"]
    for key in ("elapsed_seconds", "requests_per_second", "http_requests", "retries", "latency_ms",
                "providers", "models", "endpoints", "unsent", "abandoned", "state", "stop_reason"):
        assert key in hb, key
    rc = batch["request_counts"]
    assert set(rc) == {"total", "completed", "failed"}
    return batch


def batch_from(text: str) -> dict[str, Any]:
    """The Batch object: the (last) JSON line whose object is "batch" in a stream."""
    found = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and obj.get("object") == "batch":
                found = obj
    assert found is not None, f"no Batch object in: {text[-2000:]!r}"
    return check_batch(found)


def ids(lines: Iterable[dict[str, Any]]) -> list[str | None]:
    return [obj["custom_id"] for obj in lines]


def assert_each_once(expected: Iterable[str], *files: list[dict[str, Any]]) -> None:
    """Every expected custom_id is in exactly one line across `files`, and nothing else is."""
    seen: list[str | None] = [cid for f in files for cid in ids(f)]
    dupes = sorted({c for c in seen if seen.count(c) > 1}, key=str)
    assert not dupes, f"custom_ids written more than once: {dupes[:20]}"
    exp = set(expected)
    assert set(seen) == exp, (f"missing: {sorted(exp - set(seen))[:20]}, "
                              f"unexpected: {sorted(set(seen) - exp, key=str)[:20]}")


# --------------------------------------------------------------------------- byte-code caches


def pytest_configure(config: pytest.Config) -> None:
    """Byte-code caches for the hundreds of `python -m hfbatch` children, as an installed package has them.

    Where PYTHONDONTWRITEBYTECODE is set (this project's sandbox), the editable hfbatch/ never gets a __pycache__
    and every child compiles hfbatch again (~60 ms a start): the children may write it (git ignores it). The
    standard library's and the dependencies' caches are used as they are. (A PYTHONPYCACHEPREFIX would set those
    aside too: a fresh checkout's first run then compiled everything again, ~10-20 s more.)
    """
    if not hasattr(config, "workerinput"):
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def _expected_length(item: pytest.Item) -> int:
    """0 for the longest tests (the Ray engine's, waiting on a cluster), 1 for the CLI's subprocess runs, 2 for
    the virtual-time simulations, 3 for the rest (milliseconds)."""
    path = item.path.as_posix()
    if path.endswith("/e2e/test_ray_engine.py"):
        return 0
    if "/e2e/" in path:
        return 1
    return 2 if item.get_closest_marker("simulation") else 3


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first (a stable sort: a module's tests stay together). `make test` hands the tests out one at a
    time in this order (`--dist load --maxschedchunk 1`), so the last to start are milliseconds long and no
    worker is left running a 10 s test while the others are done."""
    items.sort(key=_expected_length)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def _fakes() -> Iterable[list[ThreadedFakeProvider]]:
    started: list[ThreadedFakeProvider] = []
    yield started
    for f in started:
        f.stop()


@pytest.fixture
def make_fake(_fakes: list[ThreadedFakeProvider]) -> Callable[..., ThreadedFakeProvider]:
    """Factory: make_fake(latency=0.1, fail_429=0.1, ...) -> a started fake, stopped after the test."""

    def make(**config: Any) -> ThreadedFakeProvider:
        fake = ThreadedFakeProvider(FakeConfig(**config)).start()
        _fakes.append(fake)
        return fake

    return make


@pytest.fixture
def fake(request: pytest.FixtureRequest,
         make_fake: Callable[..., ThreadedFakeProvider]) -> ThreadedFakeProvider:
    """A started fake; parametrize indirectly with a dict of FakeConfig fields."""
    return make_fake(**getattr(request, "param", {}))


def cli_env(tmp_path: Path, fake: ThreadedFakeProvider | None,
            env_extra: dict[str, str | None] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HFBATCH_")
           and k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT",
                         "HF_TOKEN_PATH", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME")
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    home = tmp_path / "_home"
    (home / "hf").mkdir(parents=True, exist_ok=True)
    # $HFBATCH_HOME itself is left for hfbatch to create (0700): an existing folder is never chmod'ed.
    url = fake.url if fake is not None else NOWHERE
    env.update(
        HF_HOME=str(home / "hf"), HFBATCH_HOME=str(home / "hfbatch"), HF_TOKEN=TOKEN,
        HFBATCH_ROUTER_URL=url, HF_ENDPOINT=url, HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1",
    )
    for k, v in (env_extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _secrets(args: list[str], env_extra: dict[str, str | None] | None) -> set[str]:
    found = {TOKEN}
    for i, a in enumerate(args):
        if a == "--token" and i + 1 < len(args):
            found.add(args[i + 1])
        elif a.startswith("--token="):
            found.add(a.split("=", 1)[1])
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if env_extra and env_extra.get(k):
            found.add(str(env_extra[k]))
    return {s for s in found if len(s) >= 8}


def assert_clean(tmp_path: Path, stdout: str, stderr: str, secrets: set[str]) -> None:
    """No traceback on stderr; no secret in stdout, stderr or any file written under tmp_path."""
    assert "Traceback" not in stderr, stderr[-3000:]
    for s in secrets:
        assert s not in stdout, "the token leaked to stdout"
        assert s not in stderr, "the token leaked to stderr"
        for p in tmp_path.rglob("*"):
            if p.is_file():  # output, error, summary files and hfbatch's own state (HFBATCH_HOME)
                assert s.encode() not in p.read_bytes(), f"the token leaked into {p.name}"


@pytest.fixture
def run_cli(tmp_path: Path,
            _fakes: list[ThreadedFakeProvider]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """run_cli(args, env_extra=None, input_bytes=None, timeout=60, fake=None) -> CompletedProcess (text).

    Runs `python -m hfbatch submit *args` in tmp_path against `fake` (default: the latest fake of
    the test). env_extra values of None remove a variable. Asserts the global invariants.
    """

    def run(args: list[str], env_extra: dict[str, str | None] | None = None, input_bytes: bytes | None = None,
            timeout: float = 60, fake: ThreadedFakeProvider | None = None,
            command: str = "submit") -> subprocess.CompletedProcess[str]:
        target = fake if fake is not None else (_fakes[-1] if _fakes else None)
        env = cli_env(tmp_path, target, env_extra)
        stdin: dict[str, Any] = ({"input": input_bytes} if input_bytes is not None
                                 else {"stdin": subprocess.DEVNULL})
        cmd = [sys.executable, "-m", "hfbatch", *([command] if command else []), *args]
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=timeout, **stdin)
        except subprocess.TimeoutExpired as e:
            err = (e.stderr or b"").decode("utf-8", "replace")
            pytest.fail(f"`hfbatch {command} {' '.join(args)}` did not exit within {timeout} s "
                        f"(killed); stderr: {err[-2000:]!r}")
        out = p.stdout.decode("utf-8", "replace")
        err = p.stderr.decode("utf-8", "replace")
        result = subprocess.CompletedProcess(cmd, p.returncode, out, err)
        result.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
        assert_clean(tmp_path, out, err, _secrets(args, env_extra))
        return result

    return run


@pytest.fixture
def popen_cli(tmp_path: Path,
              _fakes: list[ThreadedFakeProvider]) -> Iterable[Callable[..., subprocess.Popen[bytes]]]:
    """Start `python -m hfbatch submit *args` without waiting (signal tests); killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], fake: ThreadedFakeProvider | None = None) -> subprocess.Popen[bytes]:
        target = fake if fake is not None else (_fakes[-1] if _fakes else None)
        p = subprocess.Popen([sys.executable, "-m", "hfbatch", "submit", *args], cwd=tmp_path,
                             env=cli_env(tmp_path, target), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


# --------------------------------------------------------------------------- the CLI as a subprocess (lifecycle)

UMASK = 0o022  # a permissive umask: hfbatch must still keep its registry private


# --------------------------------------------------------------------------- helpers


def chat_file(path: Path, n: int, prefix: str = "r", extra: dict[int, str] | None = None) -> list[str]:
    """n chat lines with [[id:...]] markers (the fake counts duplicate answers); extra[i] is
    prepended to line i's text (scripted faults, sleeps)."""
    lines = [chat_line(f"{prefix}{i:03d}", f"{(extra or {}).get(i, '')}[[id:{prefix}{i:03d}]] message {i}")
             for i in range(n)]
    write_jsonl(path, lines)
    return ids(lines)  # type: ignore[return-value]


def count_lines(path: Path) -> int:
    """Complete (newline-terminated) lines in a file that another process is appending to."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def poll(cond: Callable[[], Any], what: str, timeout: float = 15.0,
         proc: subprocess.Popen[bytes] | None = None) -> Any:
    """Poll `cond` every 20 ms until truthy; fail after `timeout` s (or when `proc` has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = cond()  # it may have happened just before the process ended
            if value:
                return value
            out, err = proc.communicate()
            pytest.fail(f"process exited ({proc.returncode}) while waiting for {what}: "
                        f"{err.decode(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def check_stamps(batch: dict[str, Any], *keys: str) -> None:
    """`keys` (status timestamps) are set, and in order after created_at."""
    missing = [k for k in keys if not isinstance(batch.get(k), int)]
    assert not missing, f"status {batch['status']!r} but {missing} not set: " + json.dumps(
        {k: v for k, v in batch.items() if k.endswith("_at")})
    seq = [batch["created_at"], *(batch[k] for k in keys)]
    assert seq == sorted(seq), f"timestamps out of order: {list(zip(('created_at', *keys), seq, strict=True))}"


def check_completed(batch: dict[str, Any]) -> None:
    assert batch["status"] == "completed", batch["status"]
    assert batch["hfbatch"]["state"] == "finished", batch["hfbatch"]
    check_stamps(batch, "in_progress_at", "finalizing_at", "completed_at")


def check_interrupted(batch: dict[str, Any]) -> None:
    """A resumable batch: still in_progress for OpenAI, interrupted for us."""
    assert batch["status"] == "in_progress", batch["status"]
    assert batch["hfbatch"]["state"] == "interrupted", batch["hfbatch"]
    assert batch["completed_at"] is None and batch["finalizing_at"] is None, batch
    check_stamps(batch, "in_progress_at")


def check_private(home: Path) -> None:
    """Everything under HFBATCH_HOME: directories 0700, files 0600."""
    bad = []
    for p in [home, *sorted(home.rglob("*"))]:
        st = p.lstat()
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if stat.S_IMODE(st.st_mode) != want:
            bad.append(f"{p.relative_to(home.parent)}: {oct(stat.S_IMODE(st.st_mode))} (want {oct(want)})")
    assert not bad, "registry entries not private: " + "; ".join(bad)


def batch_dirs(home: Path) -> list[Path]:
    root = home / "batches"
    return sorted(p for p in root.iterdir() if (p / "meta.json").exists()) if root.is_dir() else []


def last_json(text: str) -> dict[str, Any]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines, "nothing on stdout"
    obj: dict[str, Any] = json.loads(lines[-1])
    return obj


class Cli:
    """`python -m hfbatch ...` as a subprocess: run() waits, start() does not (killed at teardown)."""

    def __init__(self, tmp_path: Path, fakes: list[ThreadedFakeProvider]) -> None:
        self.tmp_path, self.fakes = tmp_path, fakes
        self.home = tmp_path / "_home" / "hfbatch"
        self.procs: list[subprocess.Popen[bytes]] = []

    def _env(self) -> dict[str, str]:
        return cli_env(self.tmp_path, self.fakes[-1] if self.fakes else None)

    def run(self, *args: str, cwd: Path | None = None, input_bytes: bytes | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        stdin: dict[str, Any] = ({"input": input_bytes} if input_bytes is not None
                                 else {"stdin": subprocess.DEVNULL})
        t0 = time.monotonic()
        try:
            p = subprocess.run([sys.executable, "-m", "hfbatch", *args], cwd=cwd or self.tmp_path,
                               env=self._env(), capture_output=True, timeout=timeout,
                               preexec_fn=lambda: os.umask(UMASK), **stdin)
        except subprocess.TimeoutExpired as e:
            err = (e.stderr or b"").decode("utf-8", "replace")
            pytest.fail(f"`hfbatch {' '.join(args)}` did not exit within {timeout} s: {err[-2000:]!r}")
        out, err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
        assert_clean(self.tmp_path, out, err, {TOKEN})
        result = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        result.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
        return result

    def start(self, *args: str, cwd: Path | None = None, stdin_pipe: bool = False) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-m", "hfbatch", *args], cwd=cwd or self.tmp_path,
                             env=self._env(), stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: os.umask(UMASK))
        self.procs.append(p)
        return p

    def finish(self, p: subprocess.Popen[bytes], timeout: float = 20) -> tuple[int, str, str]:
        if p.stdin is not None and p.stdin.closed:
            p.stdin = None  # communicate() would flush it
        try:
            out_b, err_b = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out_b, err_b = p.communicate()
            pytest.fail(f"hfbatch did not exit within {timeout} s: {err_b.decode(errors='replace')[-2000:]}")
        out, err = out_b.decode("utf-8", "replace"), err_b.decode("utf-8", "replace")
        assert_clean(self.tmp_path, out, err, {TOKEN})
        return p.returncode, out, err

    def kill9(self, p: subprocess.Popen[bytes]) -> None:
        p.send_signal(signal.SIGKILL)
        p.wait(10)  # reaped: no zombie that still looks alive to `kill -0`

    def batch(self, *args: str) -> dict[str, Any]:
        """Run a command that prints one Batch object (status, cancel, wait) and validate it."""
        p = self.run(*args)
        assert p.returncode == 0, (args, p.returncode, p.stderr)
        return check_batch(last_json(p.stdout))

    def listing(self, *args: str) -> list[dict[str, Any]]:
        p = self.run("list", *args)
        assert p.returncode == 0, p.stderr
        rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
        for r in rows:
            check_batch(r)
        return rows

    def only_batch_id(self) -> str:
        dirs = batch_dirs(self.home)
        assert len(dirs) == 1, f"expected one batch in the registry, found {[d.name for d in dirs]}"
        return dirs[0].name

    def stored(self, batch_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        d = self.home / "batches" / batch_id
        return json.loads((d / "batch.json").read_bytes()), json.loads((d / "meta.json").read_bytes())

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def cli(tmp_path: Path, _fakes: list[ThreadedFakeProvider]) -> Iterable[Cli]:
    c = Cli(tmp_path, _fakes)
    yield c
    c.close()


def wait_until_blocked_on_stdin(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """Until every process has imported everything and sits reading its stdin."""
    _wait_until_blocked(procs, "pipe_read", timeout)


def wait_until_blocked_on_lock(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """Until every process sits waiting for a file lock (a batch another process runs: --wait)."""
    _wait_until_blocked(procs, "lock_inode_wait", timeout)


def _wait_until_blocked(procs: list[subprocess.Popen[bytes]], wchan: str, timeout: float) -> None:
    def ready() -> bool:
        for p in procs:
            try:  # any thread: stdin and locks are waited for in a worker thread (asyncio.to_thread)
                if not any(wchan in (t / "wchan").read_text() for t in Path(f"/proc/{p.pid}/task").iterdir()):
                    return False
            except OSError:
                return False
        return True

    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return  # no /proc/PID/wchan here: go on anyway (only the timing gets looser)
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.02)
