"""End to end: `hfbatch serve`, driven by the official openai SDK, unchanged, as the client.

The server runs as a real subprocess (`python -m hfbatch serve --port 0`, its URL read from the
startup line on stderr) against the fake provider. Files -> batches -> poll -> results, pagination,
cancel, metadata, bad uploads, OpenAI's error envelopes, the completion window's range, each
pass-through token seeing only its own files and batches (and --api-key seeing all), a restart
mid-batch, and the refusal to bind a public address without a key. Every server's stderr and files
are checked for tracebacks and token leaks (the clients' pass-through keys included).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import (
    TOKEN,
    assert_clean,
    assert_each_once,
    chat_line,
    check_batch,
    check_error_envelope,
    check_error_line,
    check_output_line,
    cli_env,
    parse_jsonl_text,
)

from hfbatch.testing.fake_provider import FakeConfig, ThreadedFakeProvider

CLIENT_KEY = "hf_client_passthrough_key_456"  # the client's API key = its HF token (pass-through)
OTHER_KEY = "hf_other_client_key_321"  # a second pass-through client: must never see the first's objects
LOCAL_KEY = "local-serve-api-key-789"  # --api-key (via $HFBATCH_API_KEY)
SECRETS = {TOKEN, CLIENT_KEY, OTHER_KEY, LOCAL_KEY}
URL = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


class Server:
    """`hfbatch serve --port 0 ...` as a subprocess; its stderr is collected by a thread."""

    def __init__(self, tmp: Path, fake: ThreadedFakeProvider, args: list[str],
                 env_extra: dict[str, str | None] | None = None) -> None:
        self.tmp, self.home = tmp, tmp / "_home" / "hfbatch"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hfbatch", "serve", "--port", "0", *args], cwd=tmp,
            env=cli_env(tmp, fake, env_extra), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if "listening on" in line:
                    ready.set()
            ready.set()

        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()
        if not ready.wait(30) or self.proc.poll() is not None:
            self.proc.kill()
            pytest.fail(f"hfbatch serve did not start: {''.join(self.lines)[-2000:]}")
        m = re.search(r"listening on (http://\S+/v1)", "".join(self.lines))
        assert m, self.lines
        self.url = m.group(1)
        self.startup = self.lines[-1]

    def client(self, key: str = CLIENT_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=20)

    def raw(self, method: str, path: str, key: str | None = CLIENT_KEY, body: bytes | None = None,
            content_type: str = "application/json") -> tuple[int, Any]:
        """(status, parsed JSON body) of one plain HTTP request (no SDK in the way)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail("hfbatch serve did not stop within 20 s of SIGTERM")
        self.pump.join(10)  # the pump thread reads the last lines, until the pipe closes
        err = "".join(self.lines)
        assert_clean(self.tmp, "", err, SECRETS)
        return err


def chat_jsonl(n: int, prefix: str = "r", text: str = "", bad: set[int] | None = None) -> tuple[bytes, list[str]]:
    lines = [chat_line(f"{prefix}{i:03d}", f"{text}[[id:{prefix}{i:03d}]] message {i}",
                       model="NonExistent-org/model" if i in (bad or set()) else "test-org/tiny-chat")
             for i in range(n)]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines), [x["custom_id"] for x in lines]


def multipart(fields: dict[str, bytes], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "hfbatch-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
              f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
              for k, (name, data) in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(c: openai.OpenAI, data: bytes, name: str = "input.jsonl") -> str:
    f = c.files.create(file=(name, data), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(data) and f.filename == name and f.id.startswith("file-")
    return f.id


def wait_for(c: openai.OpenAI, batch_id: str, status: set[str] = TERMINAL, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        b = c.batches.retrieve(batch_id)
        if b.status in status:
            return b
        if time.monotonic() > deadline:
            pytest.fail(f"batch {batch_id} still {b.status} after {timeout} s: {b.request_counts}")
        time.sleep(0.05)


def content(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    return parse_jsonl_text(c.files.content(file_id).text) if file_id else []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One pass-through server for the module: no token of its own, so every request the fake
    (which requires a token) answers proves the client's key was passed through."""
    tmp = tmp_path_factory.mktemp("serve")
    fake = ThreadedFakeProvider(FakeConfig(require_token=True)).start()
    srv = Server(tmp, fake, ["--max-upload", "64KB", "--concurrency", "4"], {"HF_TOKEN": None})
    yield srv
    srv.stop()
    fake.stop()


# --------------------------------------------------------------------------- the OpenAI flow


def test_files_batches_results_round_trip(server: Server) -> None:
    c = server.client()
    data, expected = chat_jsonl(8, bad={3})
    fid = upload(c, data)
    batch = c.batches.create(input_file_id=fid, endpoint=URL, completion_window="24h",
                             metadata={"project": "serve-test", "run": "1"})
    assert batch.status == "validating" and re.match(r"^batch_[0-9a-f]{24}$", batch.id)
    assert batch.input_file_id == fid and batch.endpoint == URL
    done = wait_for(c, batch.id)
    check_batch(done.model_dump())
    assert done.status == "completed", done
    assert done.input_file_id == fid and done.metadata == {"project": "serve-test", "run": "1"}
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 7, 1)
    assert done.output_file_id and done.error_file_id and done.output_file_id != done.error_file_id
    for file_id, kind in ((done.output_file_id, "output"), (done.error_file_id, "error")):
        f = c.files.retrieve(file_id)
        assert f.purpose == "batch_output" and f.filename == f"{batch.id}_{kind}.jsonl" and f.bytes > 0
    out, err = content(c, done.output_file_id), content(c, done.error_file_id)
    for line in out:
        check_output_line(line, URL)
    for line in err:
        check_error_line(line)
    assert [e["custom_id"] for e in err] == ["r003"]
    assert_each_once(expected, out, err)
    listed = {f.id: f.purpose for f in c.files.list()}
    assert listed[fid] == "batch" and listed[done.output_file_id] == "batch_output"
    # The batch is in the registry: `hfbatch list` shows it (with the same HFBATCH_HOME).
    p = subprocess.run([sys.executable, "-m", "hfbatch", "list", "--json"], env=cli_env(server.tmp, None),
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and batch.id in p.stdout, p.stderr
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(batch.id)  # it has ended
    bad = []
    for path in [server.home, *server.home.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode != (0o700 if path.is_dir() else 0o600):
            bad.append(f"{path.name}: {oct(mode)}")
    assert not bad, bad


def test_batches_list_pagination(server: Server) -> None:
    c = server.client()
    fid = upload(c, chat_jsonl(1, prefix="p")[0])
    ids = [c.batches.create(input_file_id=fid, endpoint=URL, completion_window="24h").id for _ in range(3)]
    for bid in ids:
        wait_for(c, bid)
    page = c.batches.with_raw_response.list(limit=2).http_response.json()
    assert page["object"] == "list" and [b["id"] for b in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True and page["first_id"] == ids[2] and page["last_id"] == ids[1]
    nxt = c.batches.list(limit=2, after=page["last_id"])
    assert nxt.data[0].id == ids[0]
    everything = [b.id for b in c.batches.list(limit=1)]  # the SDK's auto-pagination, one per page
    assert len(everything) == len(set(everything)) >= 3
    assert [i for i in everything if i in ids] == ids[::-1]
    last = c.batches.with_raw_response.list(limit=100, after=everything[-1]).http_response.json()
    assert last == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    for limit in (0, 101):
        status, body = server.raw("GET", f"/batches?limit={limit}")
        assert status == 400 and check_error_envelope(body)["param"] == "limit"


def test_cancel(server: Server) -> None:
    c = server.client()
    data, expected = chat_jsonl(20, prefix="c", text="[[sleep:0.4]] ")
    fid = upload(c, data)
    batch = c.batches.create(input_file_id=fid, endpoint=URL, completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        c.files.delete(fid)  # the input of a batch that has not ended
    cancelling = c.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(c, batch.id)
    assert done.status == "cancelled" and done.cancelled_at and done.cancelling_at, done
    out, err = content(c, done.output_file_id), content(c, done.error_file_id)
    assert_each_once(expected, out, err)
    cancelled = [e for e in err if e["error"] and e["error"]["code"] == "batch_cancelled"]
    assert len(cancelled) >= 12 and len(cancelled) == len(err)  # 4 in flight at most finish
    assert c.batches.cancel(batch.id).status == "cancelled"  # cancelling again is harmless
    assert c.files.delete(fid).deleted is True
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(fid)


@pytest.mark.parametrize("data, errors", [
    (b"this is not json\n{\"custom_id\": \"x\"}\n", [(1, "invalid_json_line"), (2, "invalid_request")]),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", [(i, "invalid_json_line") for i in (1, 2, 3)]),
    (b"", [(None, "empty_file")]),
    (json.dumps(chat_line("a")).encode() + b"\n"
     + json.dumps({**chat_line("b"), "url": "/v1/embeddings"}).encode() + b"\n", [(2, "url_mismatch")]),
], ids=["text", "binary", "empty", "endpoint-mismatch"])
def test_bad_upload_fails_the_batch(server: Server, data: bytes, errors: list[tuple[int | None, str]]) -> None:
    c = server.client()
    fid = upload(c, data, name="bad.jsonl")
    done = wait_for(c, c.batches.create(input_file_id=fid, endpoint=URL, completion_window="24h").id)
    check_batch(done.model_dump())
    assert done.status == "failed" and done.failed_at and done.errors and done.errors.data, done
    got = [(e.line or None, e.code) for e in done.errors.data]
    assert got == errors, got
    assert done.output_file_id is None and done.error_file_id is None


def test_openai_error_envelopes(server: Server) -> None:
    c = server.client()

    def envelope(r: tuple[int, Any], status: int, type_: str) -> dict[str, Any]:
        assert r[0] == status, r
        err = check_error_envelope(r[1])
        assert err["type"] == type_, err
        return err

    for key in (None, ""):
        err = envelope(server.raw("GET", "/files", key=key), 401, "authentication_error")
        assert err["code"] == "invalid_api_key"
    for path in ("/files/file-nope", "/files/..%2F..%2Fserve/content", "/files/file-a%2F..%2Fx/content",
                 "/batches/batch_nothex", "/batches/batch_0123abcd", "/batches/..%2Fbatch_01", "/models"):
        envelope(server.raw("GET", path), 404, "not_found_error")
    with pytest.raises(openai.NotFoundError) as nf:
        c.batches.retrieve("batch_ffffffffffffffffffffffff")
    assert nf.value.status_code == 404

    fid = upload(c, chat_jsonl(1, prefix="e")[0])
    for body, param in [
        ({"input_file_id": "file-missing", "endpoint": URL, "completion_window": "24h"}, "input_file_id"),
        ({"input_file_id": "../../etc/passwd", "endpoint": URL, "completion_window": "24h"}, "input_file_id"),
        ({"input_file_id": fid, "endpoint": "/v1/nope", "completion_window": "24h"}, "endpoint"),
        ({"input_file_id": fid, "endpoint": URL, "completion_window": "soon"}, "completion_window"),
        ({"input_file_id": fid, "endpoint": URL, "completion_window": "24h",
          "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ]:
        err = envelope(server.raw("POST", "/batches", body=json.dumps(body).encode()), 400, "invalid_request_error")
        assert err["param"] == param, err
    envelope(server.raw("POST", "/batches", body=b"{not json"), 400, "invalid_request_error")

    before = {f.id for f in c.files.list()}
    with pytest.raises(openai.BadRequestError) as bad:
        c.files.create(file=("x.jsonl", b"{}\n"), purpose="assistants")
    assert bad.value.body["param"] == "purpose"  # type: ignore[index]
    envelope(server.raw("POST", "/files", body=b'{"purpose": "batch"}'), 400, "invalid_request_error")
    no_file = multipart({"purpose": b"batch"}, {})
    err = envelope(server.raw("POST", "/files", CLIENT_KEY, *no_file), 400, "invalid_request_error")
    assert err["param"] == "file"
    # Over --max-upload (64 KB) by less than the early Content-Length check allows: refused while streaming.
    with pytest.raises(openai.APIStatusError) as big:
        c.files.create(file=("big.jsonl", b"x" * 100_000), purpose="batch")
    assert big.value.status_code == 413 and big.value.body["code"] == "file_too_large"  # type: ignore[index]
    huge = multipart({"purpose": b"batch"}, {"file": ("h.jsonl", b"y" * 300_000)})
    envelope(server.raw("POST", "/files", CLIENT_KEY, *huge), 413, "invalid_request_error")
    assert {f.id for f in c.files.list()} == before
    assert not list((server.home / "files").glob(".*.part")), "a refused upload left a partial file"


# --------------------------------------------------------------------------- the completion window


@pytest.mark.parametrize("window", ["999999h", "0s", "-1h", "8d", "604801s", "0.5s", "nan", "inf", "1e309s",
                                    " 24h", "24H", "24h\n"])  # (OpenAI takes "24h" exactly: no other spelling)
def test_completion_window_outside_the_range_is_refused(server: Server, window: str) -> None:
    c = server.client()
    fid = upload(c, chat_jsonl(1, prefix="w")[0])
    links = set((server.home / "serve").glob("batch_*.json"))
    body = json.dumps({"input_file_id": fid, "endpoint": URL, "completion_window": window}).encode()
    status, answer = server.raw("POST", "/batches", body=body)
    assert status == 400, (status, answer)
    err = check_error_envelope(answer)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "completion_window", "invalid_value")
    assert "from 1s to 7d" in err["message"], err
    with pytest.raises(openai.BadRequestError) as bad:
        c.batches.create(input_file_id=fid, endpoint=URL, completion_window=window)  # type: ignore[arg-type]
    assert bad.value.body["param"] == "completion_window"  # type: ignore[index]
    assert set((server.home / "serve").glob("batch_*.json")) == links, "a refused batch was created"


@pytest.mark.parametrize("window, seconds", [("24h", 86400), ("2h", 7200), ("7d", 7 * 86400)])
def test_completion_window_in_the_range_is_accepted(server: Server, window: str, seconds: int) -> None:
    c = server.client()
    batch = c.batches.create(input_file_id=upload(c, chat_jsonl(1, prefix="w")[0]), endpoint=URL,
                             completion_window=window)  # type: ignore[arg-type]
    assert batch.completion_window == window and batch.expires_at == batch.created_at + seconds, batch
    assert wait_for(c, batch.id).status == "completed"


# --------------------------------------------------------------------------- ownership


def assert_hidden(server: Server, key: str, method: str, path: str, real: str, missing: str) -> None:
    """`key` gets for `real` (another owner's id) exactly the answer it gets for a `missing` id."""
    got, want = server.raw(method, path.format(real), key=key), server.raw(method, path.format(missing), key=key)
    assert want[0] in (400, 404) and got[0] == want[0], (method, path, got, want)
    expected = {**want[1]["error"], "message": want[1]["error"]["message"].replace(missing, real)}
    assert check_error_envelope(got[1]) == expected, (method, path, got)


def test_pass_through_tokens_see_only_their_own_objects(server: Server) -> None:
    """Two clients with two tokens on one pass-through server: B can neither see nor touch A's
    files and batches (404 as for a missing id, as OpenAI answers across projects); A still can."""
    a, b = server.client(CLIENT_KEY), server.client(OTHER_KEY)
    a_data, a_ids = chat_jsonl(4, prefix="own", text="[[sleep:0.3]] ")
    slow = a.batches.create(input_file_id=upload(a, a_data), endpoint=URL, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        b.batches.cancel(slow.id)
    fa = upload(a, chat_jsonl(2, prefix="a")[0])
    done = wait_for(a, a.batches.create(input_file_id=fa, endpoint=URL, completion_window="24h").id)
    assert done.status == "completed" and done.output_file_id
    a_files = {fa, slow.input_file_id, done.output_file_id}
    a_batches = {slow.id, done.id}

    fb = upload(b, chat_jsonl(1, prefix="b")[0])
    b_batches = [b.batches.create(input_file_id=fb, endpoint=URL, completion_window="24h").id for _ in range(2)]
    b_files = {fb} | {wait_for(b, bid).output_file_id for bid in b_batches}
    assert {f.id for f in b.files.list()} == b_files
    assert [x.id for x in b.batches.list(limit=1)] == b_batches[::-1]  # the SDK's pagination, one per page
    first = b.batches.with_raw_response.list(limit=1).http_response.json()
    assert [x["id"] for x in first["data"]] == [b_batches[1]] and first["has_more"] is True
    status, rest = server.raw("GET", f"/batches?limit=1&after={first['last_id']}", key=OTHER_KEY)
    assert status == 200 and [x["id"] for x in rest["data"]] == [b_batches[0]] and rest["has_more"] is False
    status, foreign = server.raw("GET", f"/batches?after={done.id}", key=OTHER_KEY)  # A's id as a cursor
    assert status == 200 and foreign["data"] == [] and foreign["has_more"] is False
    status, files_page = server.raw("GET", "/files?limit=1", key=OTHER_KEY)
    assert status == 200 and files_page["data"][0]["id"] in b_files and files_page["has_more"] is True

    missing_file, missing_batch = "file-0123456789abcdef01234567", "batch_0123456789abcdef01234567"
    for fid in a_files:
        assert_hidden(server, OTHER_KEY, "GET", "/files/{}", fid, missing_file)
        assert_hidden(server, OTHER_KEY, "DELETE", "/files/{}", fid, missing_file)
        with pytest.raises(openai.NotFoundError):
            b.files.content(fid)
        with pytest.raises(openai.NotFoundError):
            b.files.retrieve(fid)
        with pytest.raises(openai.NotFoundError):
            b.files.delete(fid)
        create = json.dumps({"input_file_id": "{}", "endpoint": URL, "completion_window": "24h"})
        got = server.raw("POST", "/batches", OTHER_KEY, create.replace("{}", fid).encode())
        want = server.raw("POST", "/batches", OTHER_KEY, create.replace("{}", missing_file).encode())
        assert got[0] == want[0] == 400 and got[1]["error"]["param"] == "input_file_id", got
        assert got[1]["error"]["message"] == want[1]["error"]["message"].replace(missing_file, fid), got
    for bid in a_batches:
        assert_hidden(server, OTHER_KEY, "GET", "/batches/{}", bid, missing_batch)
        assert_hidden(server, OTHER_KEY, "POST", "/batches/{}/cancel", bid, missing_batch)
        with pytest.raises(openai.NotFoundError):
            b.batches.retrieve(bid)
    assert {x.id for x in b.batches.list()} == set(b_batches)

    # A still has everything, and sees none of B's.
    finished = wait_for(a, slow.id)
    assert finished.status == "completed" and finished.request_counts.completed == 4, finished
    assert_each_once(a_ids, content(a, finished.output_file_id))
    a_listed = {f.id for f in a.files.list()}
    assert a_files <= a_listed and not b_files & a_listed
    a_listed_batches = {x.id for x in a.batches.list()}
    assert a_batches <= a_listed_batches and not set(b_batches) & a_listed_batches
    assert a.files.retrieve(fa).id == fa and len(content(a, fa)) == 2
    status, obj = server.raw("GET", f"/files/{fa}")
    assert status == 200 and "owner" not in obj and "owner" not in server.raw("GET", "/files")[1]["data"][0]
    assert a.batches.retrieve(done.id).status == "completed"


def _drop_owner(path: Path) -> None:
    """Make a stored object look like one written before owners were recorded."""
    obj = json.loads(path.read_bytes())
    obj.pop("owner", None)
    path.write_bytes(json.dumps(obj).encode())


def test_api_key_owns_everything_and_unowned_objects_stay_private(tmp_path: Path, make_fake: Any) -> None:
    """Objects outlive a mode switch: a pass-through token keeps its own across restarts (the salt
    persists); the --api-key key sees and resumes every object (any owner, or none) and what it
    creates is visible to no pass-through token; objects without an owner (written before owners
    were recorded) are visible to no pass-through token; a batch resumed by the --api-key server
    still belongs to the token that created it, output files included."""
    fake = make_fake(require_token=True)
    no_token = {"HF_TOKEN": None}
    first = Server(tmp_path, fake, ["--concurrency", "2"], no_token)
    a, b = first.client(CLIENT_KEY), first.client(OTHER_KEY)
    fa = upload(a, chat_jsonl(2, prefix="a")[0])
    ba = wait_for(a, a.batches.create(input_file_id=fa, endpoint=URL, completion_window="24h").id)
    legacy = wait_for(a, a.batches.create(input_file_id=fa, endpoint=URL, completion_window="24h").id)
    fl = upload(a, chat_jsonl(1, prefix="l")[0])
    fb = upload(b, chat_jsonl(1, prefix="b")[0])
    slow_data, slow_ids = chat_jsonl(12, prefix="s", text="[[sleep:0.3]] ")
    slow = a.batches.create(input_file_id=upload(a, slow_data), endpoint=URL, completion_window="24h")
    first.stop()  # SIGTERM: the slow batch is left unfinished, resumable
    _drop_owner(first.home / "files" / f"{fl}.json")
    _drop_owner(first.home / "serve" / f"{legacy.id}.json")
    _drop_owner(first.home / "files" / f"{legacy.output_file_id}.json")

    second = Server(tmp_path, fake, [], no_token)
    assert "1 unfinished batches wait for a server token" in second.startup, second.startup
    a, b = second.client(CLIENT_KEY), second.client(OTHER_KEY)
    assert {f.id for f in a.files.list()} == {fa, slow.input_file_id, ba.output_file_id}
    assert {x.id for x in a.batches.list()} == {ba.id, slow.id}
    assert {f.id for f in b.files.list()} == {fb} and not list(b.batches.list())
    for c in (a, b):
        for fid in (fl, legacy.output_file_id):
            with pytest.raises(openai.NotFoundError):
                c.files.retrieve(fid)
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve(legacy.id)
    second.stop()

    third = Server(tmp_path, fake, [], {"HFBATCH_API_KEY": LOCAL_KEY})  # the server's token: TOKEN
    assert "1 batches resumed" in third.startup, third.startup
    k = third.client(LOCAL_KEY)
    resumed = wait_for(k, slow.id)
    assert resumed.status == "completed" and resumed.request_counts.completed == 12, resumed
    everything = {fa, fl, fb, slow.input_file_id, ba.output_file_id, legacy.output_file_id, resumed.output_file_id}
    assert everything <= {f.id for f in k.files.list()}
    assert {ba.id, legacy.id, slow.id} <= {x.id for x in k.batches.list()}
    assert k.batches.retrieve(legacy.id).status == "completed" and len(content(k, fl)) == 1
    fk = upload(k, chat_jsonl(1, prefix="k")[0])
    bk = wait_for(k, k.batches.create(input_file_id=fk, endpoint=URL, completion_window="24h").id)
    assert bk.status == "completed" and bk.output_file_id
    third.stop()

    fourth = Server(tmp_path, fake, [], no_token)
    a = fourth.client(CLIENT_KEY)
    mine = a.batches.retrieve(slow.id)  # resumed and finished by the --api-key server: still A's
    assert mine.status == "completed" and mine.output_file_id == resumed.output_file_id
    assert_each_once(slow_ids, content(a, mine.output_file_id))
    for key in (CLIENT_KEY, OTHER_KEY, LOCAL_KEY):  # the key's objects: no pass-through token sees them
        c = fourth.client(key)
        assert not {fk, bk.output_file_id} & {f.id for f in c.files.list()}
        assert bk.id not in {x.id for x in c.batches.list()}
        with pytest.raises(openai.NotFoundError):
            c.files.retrieve(fk)
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve(bk.id)
    with pytest.raises(openai.NotFoundError):
        fourth.client(OTHER_KEY).batches.retrieve(slow.id)
    fourth.stop()


# --------------------------------------------------------------------------- restart, --api-key, binding


def test_restart_mid_batch_resumes(tmp_path: Path, make_fake: Any) -> None:
    """Two pass-through batches; the server (no token of its own) is killed mid-batch. Restarted
    without a token, it cannot resume them (the client's token was only in memory), but one can be
    cancelled. Restarted with --api-key and a token, the other resumes on the server's token and
    every line is answered exactly once."""
    fake = make_fake(require_token=True)
    no_token = {"HF_TOKEN": None}
    first = Server(tmp_path, fake, ["--concurrency", "2"], no_token)
    c = first.client()
    data, expected = chat_jsonl(24, prefix="k", text="[[sleep:0.15]] ")
    fid = upload(c, data)
    batch, other = (c.batches.create(input_file_id=fid, endpoint=URL, completion_window="24h", metadata={"k": k})
                    for k in ("resumed", "cancelled"))
    link = json.loads((first.home / "serve" / f"{batch.id}.json").read_bytes())
    out_path = first.home / "files" / f"{link['output_file_id']}.jsonl"
    deadline = time.monotonic() + 15
    while not out_path.exists() or out_path.read_bytes().count(b"\n") < 6:
        assert time.monotonic() < deadline, "no output lines after 15 s"
        time.sleep(0.02)
    first.stop(signal.SIGKILL)
    assert out_path.read_bytes().count(b"\n") < 24, "the batch ended before the kill: nothing to resume"

    second = Server(tmp_path, fake, [], no_token)
    assert "0 batches resumed; 2 unfinished batches wait for a server token" in second.startup, second.startup
    c = second.client()
    stuck = c.batches.retrieve(batch.id)
    assert stuck.status == "in_progress" and stuck.hfbatch["state"] == "interrupted", stuck  # type: ignore[attr-defined]
    assert c.batches.cancel(other.id).status == "cancelling"
    cancelled = wait_for(c, other.id)
    assert cancelled.status == "cancelled", cancelled
    assert_each_once(expected, content(c, cancelled.output_file_id), content(c, cancelled.error_file_id))
    second.stop()

    third = Server(tmp_path, fake, ["--concurrency", "4"], {"HFBATCH_API_KEY": LOCAL_KEY})
    assert "1 batches resumed" in third.startup, third.startup
    with pytest.raises(openai.AuthenticationError) as denied:
        third.client(CLIENT_KEY).batches.retrieve(batch.id)
    assert denied.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    c = third.client(LOCAL_KEY)
    done = wait_for(c, batch.id)
    assert done.status == "completed" and done.metadata == {"k": "resumed"}, done
    assert (done.request_counts.completed, done.request_counts.failed) == (24, 0)
    out = content(c, done.output_file_id)
    assert_each_once(expected, out)
    for line in out:
        check_output_line(line, URL)
    assert fake.stats()["auth_missing"] == 0
    third.stop()


def test_refuses_public_bind_without_key(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "hfbatch", "serve", "--host", "0.0.0.0", "--port", "0"],
                       env=cli_env(tmp_path, None), capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "--api-key" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "_home" / "hfbatch" / "files")


def test_concurrency_is_one_server_wide_limit_shared_fairly(tmp_path: Path) -> None:
    """`serve -c 4` means 4 requests in flight at the provider whatever the number of batches (before:
    -c per batch, so 6 batches put 24 in flight)."""
    fake = ThreadedFakeProvider(FakeConfig(latency=0.05)).start()
    srv = Server(tmp_path, fake, ["--concurrency", "4"])
    try:
        c = srv.client()
        batches = []
        for k in range(6):
            data, _ = chat_jsonl(16, prefix=f"b{k}-")
            batches.append(c.batches.create(input_file_id=upload(c, data), endpoint=URL, completion_window="24h").id)
        done = [wait_for(c, bid, timeout=30) for bid in batches]
        assert all(b.status == "completed" and b.request_counts.completed == 16 for b in done), done
        st = fake.stats()
        assert st["requests"] == 96 and st["dup_ok"] == 0
        assert st["max_inflight"] <= 4, f"{st['max_inflight']} requests in flight with serve -c 4"
    finally:
        srv.stop()
        fake.stop()
