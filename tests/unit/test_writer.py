"""writer: JsonlSink batching/flushing, success_line / error_line shapes, orjson.Fragment passthrough;
executor.error_body: every provider error shape becomes OpenAI's error envelope."""

from __future__ import annotations

import asyncio
import errno
import io
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import LINE_ID_RE, check_error_envelope, check_error_line, check_output_line

from hfbatch.models import Outcome
from hfbatch.outcomes import error_body
from hfbatch.writer import JsonlSink, error_line, escape_separators, new_line_id, success_line

CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

# ------------------------------------------------------------------ JsonlSink


def test_sink_writes_newline_terminated_lines(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    sink = JsonlSink.open(str(p))
    sink.write(b'{"a":1}')
    sink.write(b'{"b":2}')
    assert sink.lines == 2
    sink.close()
    assert p.read_bytes() == b'{"a":1}\n{"b":2}\n'


def test_sink_writes_through_outside_an_event_loop(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    sink = JsonlSink.open(str(p))
    sink.write(b"1")
    assert p.read_bytes() == b"1\n"  # no loop to batch in: handed to the OS at once
    sink.flush()  # nothing new: nothing written twice
    sink.write(b"2")
    sink.close()
    assert p.read_bytes() == b"1\n2\n"


def test_sink_coalesces_one_loop_iteration_into_one_write(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    sink = JsonlSink.open(str(p))

    async def scenario() -> tuple[bytes, bytes]:
        sink.write(b"1")
        sink.write(b"2")
        during = p.read_bytes()  # same iteration: still buffered
        await asyncio.sleep(0)  # one iteration later: both lines reached the OS
        return during, p.read_bytes()

    during, after = asyncio.run(scenario())
    sink.close()
    assert during == b""
    assert after == b"1\n2\n"


def test_sink_flushes_by_itself_past_one_mebibyte(tmp_path: Path) -> None:
    p = tmp_path / "big.jsonl"
    sink = JsonlSink.open(str(p))
    chunk = b"x" * (256 * 1024)
    for _ in range(5):
        sink.write(chunk)
    assert p.stat().st_size >= 4 * len(chunk)
    sink.close()
    assert p.read_bytes() == (chunk + b"\n") * 5


def test_sink_truncates_by_default_and_appends_on_request(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    p.write_bytes(b"old\n")
    s = JsonlSink.open(str(p))
    s.write(b"new")
    s.close()
    assert p.read_bytes() == b"new\n"
    s = JsonlSink.open(str(p), append=True)
    s.write(b"more")
    s.close()
    assert p.read_bytes() == b"new\nmore\n"


def test_sink_empty_close_leaves_an_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "e.jsonl"
    JsonlSink.open(str(p)).close()
    assert p.read_bytes() == b""


def test_sink_to_a_stream() -> None:
    buf = io.BytesIO()
    s = JsonlSink.stream(buf)
    s.write(b"a")
    s.write(b"b")
    s.flush()
    assert buf.getvalue() == b"a\nb\n"
    s.close()
    assert buf.getvalue() == b"a\nb\n" and s.lines == 2


class FullDisk:
    """A Target that accepts `room` bytes, then fails like a full disk (a partial write first)."""

    name = "full.jsonl"

    def __init__(self, room: int, fail_sync: bool = False) -> None:
        self.room, self.data, self.fail_sync, self.syncs = room, bytearray(), fail_sync, 0

    def write(self, data: memoryview) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(data), self.room)
        self.data += data[:n]
        self.room -= n
        return n

    def sync(self) -> None:
        self.syncs += 1
        if self.fail_sync:
            raise OSError(errno.EIO, "Input/output error")

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_full_disk_is_recorded_never_raised_and_nothing_is_dropped() -> None:
    disk = FullDisk(room=25)
    seen: list[OSError] = []
    sink = JsonlSink(disk, on_error=lambda s, e: seen.append(e))
    loop_errors: list[dict[str, object]] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
        for i in range(5):
            sink.write(b'{"line":%d}' % i)  # 10 bytes + newline each
        await asyncio.sleep(0)  # the end-of-iteration flush meets the full disk
        sink.write(b'{"line":5}')
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert not loop_errors, loop_errors  # nothing escaped into asyncio's "exception was never retrieved"
    assert len(seen) == 1 and seen[0].errno == errno.ENOSPC and sink.error is seen[0]
    assert bytes(disk.data) == b'{"line":0}\n{"line":1}\n{"l'  # two whole lines and a torn third
    assert sink.unwritten_lines() == 4  # the torn one counts: it is not an answer on disk
    assert "full.jsonl" in sink.describe_error() and "No space left" in sink.describe_error()
    disk.room = 10_000  # space again (the grace period's retries)
    sink.flush()
    sink.close()
    assert bytes(disk.data) == b"".join(b'{"line":%d}\n' % i for i in range(6))  # the torn line completed
    assert sink.unwritten_lines() == 0 and len(seen) == 1


def test_a_failed_fsync_is_a_failed_write() -> None:
    disk = FullDisk(room=1000, fail_sync=True)
    sink = JsonlSink(disk)
    sink.write(b"1")
    sink.close()
    assert sink.error is not None and sink.error.errno == errno.EIO
    assert disk.syncs == 1


def test_a_file_removed_or_truncated_under_the_sink_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    sink = JsonlSink.open(str(p), fsync_interval=0)
    sink.write(b"1")
    assert sink.error is None
    p.unlink()
    sink.write(b"2")
    assert sink.error is not None and "removed" in sink.describe_error()
    sink.close()
    q = tmp_path / "q.jsonl"
    sink = JsonlSink.open(str(q), fsync_interval=0)
    sink.write(b"12345")
    q.write_bytes(b"")  # truncated by someone else
    sink.write(b"6")
    assert sink.error is not None and "truncated" in sink.describe_error()
    sink.close()


def test_a_closed_stream_is_an_error_not_a_traceback() -> None:
    class Closed(io.BytesIO):
        def write(self, b: object) -> int:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    sink = JsonlSink.stream(Closed())
    sink.write(b"x")
    sink.close()
    assert sink.error is not None and sink.unwritten_lines() == 1
    assert "stdout" in sink.describe_error()


@pytest.mark.parametrize("buffered", [True, False])
def test_a_full_stdout_counts_what_reached_it_and_retries_without_duplicates(buffered: bool) -> None:
    """-o - on a full disk (stdout redirected to a file there): the summary claimed 154 answers where 142
    lines (and a torn one) were. Unbuffered (PYTHONUNBUFFERED=1), stdout is a FileIO whose partial write
    was taken as whole; buffered, its buffer hid how much of a write reached the file. The sink writes to
    the file and counts what the OS took, as it does for a file."""

    class FullRaw(io.RawIOBase):
        def __init__(self, room: int) -> None:
            self.room, self.data = room, bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            if self.room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            n = min(len(b), self.room)
            self.data += bytes(b)[:n]
            self.room -= n
            return n

    raw = FullRaw(room=25)
    sink = JsonlSink.stream(io.BufferedWriter(raw, buffer_size=8192) if buffered else raw)  # type: ignore[arg-type]
    for i in range(5):
        sink.write(b'{"line":%d}' % i)
    sink.flush()
    assert sink.error is not None and sink.error.errno == errno.ENOSPC
    assert bytes(raw.data) == b'{"line":0}\n{"line":1}\n{"l'
    assert sink.lines - sink.unwritten_lines() == bytes(raw.data).count(b"\n") == 2
    raw.room = 10_000
    sink.write(b'{"line":5}')
    sink.flush()
    sink.close()
    assert bytes(raw.data) == b"".join(b'{"line":%d}\n' % i for i in range(6))
    assert sink.unwritten_lines() == 0


# ------------------------------------------------------------------ lines


def test_new_line_ids_are_unique_batch_req_hex() -> None:
    got = {new_line_id() for _ in range(200)}
    assert len(got) == 200 and all(LINE_ID_RE.match(i) for i in got)


def test_success_line_shape_and_key_order() -> None:
    obj = json.loads(success_line("c-1", 200, "req_9", CHAT))
    check_output_line(obj, "/v1/chat/completions")
    assert obj["custom_id"] == "c-1"
    assert obj["response"] == {"status_code": 200, "request_id": "req_9", "body": CHAT}


def test_success_line_passes_fragment_bytes_through_unchanged() -> None:
    raw = b'{"object":"list",  "data":[{"object":"embedding","index":0,"embedding":[1.50,2e0,-0.0]}],' \
          b'"model":"m","usage":{"prompt_tokens":1,"total_tokens":1},"extra":"\\u00e9"}'
    line = success_line("c", 200, "r", orjson.Fragment(raw))
    assert raw in line
    assert b"\n" not in line
    obj = json.loads(line)
    check_output_line(obj, "/v1/embeddings")
    assert list(obj["response"]) == ["status_code", "request_id", "body"]


def test_success_line_keeps_non_ascii() -> None:
    line = success_line("ü", 200, "r", {"object": "x", "text": "日本"})
    assert "日本".encode() in line and "ü".encode() in line


def test_error_line_for_an_http_answer() -> None:
    envelope = {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}
    resp = {"status_code": 400, "request_id": "req_1", "body": envelope}
    obj = json.loads(error_line("c", "", "", resp))
    check_error_line(obj)
    assert obj["response"] == resp and obj["error"] is None


def test_error_line_without_an_answer() -> None:
    obj = json.loads(error_line("c", "request_timeout", "timed out"))
    check_error_line(obj)
    assert obj["response"] is None
    assert obj["error"] == {"code": "request_timeout", "message": "timed out"}


def test_error_line_for_an_unreadable_line_has_null_custom_id() -> None:
    obj = json.loads(error_line(None, "invalid_json_line", "line 3: not JSON"))
    check_error_line(obj)
    assert obj["custom_id"] is None


# ------------------------------------------------------------------ executor.error_body


def outcome(status: int, body: bytes) -> Outcome:
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    return Outcome(status, body, parsed)


def test_openai_envelope_passes_through() -> None:
    env = {"error": {"message": "The model is not supported", "type": "invalid_request_error",
                     "param": "model", "code": "model_not_supported"}}
    assert error_body(400, outcome(400, orjson.dumps(env))) == env


@pytest.mark.parametrize("status, body, text", [
    (400, b'{"error": "Model is overloaded"}', "Model is overloaded"),
    (422, b'{"detail": "field required"}', "field required"),
    (404, b'{"message": "Not Found"}', "Not Found"),
    (503, b"<html><body>Service Unavailable</body></html>", "Service Unavailable"),
    (502, b"upstream connect error", "upstream connect error"),
    (500, b"", "500"),
    (413, b"[1, 2]", "[1"),
    (400, b'{"error": ["a", "b"]}', "a"),
    (429, b'{"error": {"code": 429}}', "429"),
])
def test_other_error_shapes_are_wrapped(status: int, body: bytes, text: str) -> None:
    got = error_body(status, outcome(status, body))
    err = check_error_envelope(got)
    assert text in err["message"]


def test_partial_openai_envelope_is_completed() -> None:
    # {"error": {"message": ...}} without type/param/code must still be a full OpenAI envelope.
    got = error_body(400, outcome(400, b'{"error": {"message": "bad input"}}'))
    err = check_error_envelope(got)
    assert err["message"] == "bad input"


@pytest.mark.parametrize("status, kind", [(400, "invalid_request_error"), (401, "authentication_error"),
                                          (403, "permission_error"), (404, "not_found_error"),
                                          (429, "rate_limit_error"), (500, "server_error"),
                                          (503, "server_error")])
def test_wrapped_error_type_follows_the_status(status: int, kind: str) -> None:
    assert error_body(status, outcome(status, b'{"error": "x"}'))["error"]["type"] == kind


def test_hf_error_type_becomes_the_code() -> None:
    got = error_body(400, outcome(400, b'{"error": "Input validation error", "error_type": "validation"}'))
    assert got["error"]["code"] == "validation"
    check_error_envelope(got)


def test_line_separators_are_escaped_and_every_other_byte_kept() -> None:
    raw = '{"text": "a\u2028b\u2029c\u0085d — ’",  "n": 1.50}'.encode()
    line = success_line("c", 200, "r", orjson.Fragment(raw))
    assert b"\xe2\x80\xa8" not in line and b"\xe2\x80\xa9" not in line and b"\xc2\x85" not in line
    assert '"a\\u2028b\\u2029c\\u0085d — ’",  "n": 1.50}'.encode() in line  # spacing and 1.50 untouched
    assert json.loads(line)["response"]["body"]["text"] == "a\u2028b\u2029c\u0085d — ’"
    assert escape_separators(b'{"x":"plain"}') == b'{"x":"plain"}'
