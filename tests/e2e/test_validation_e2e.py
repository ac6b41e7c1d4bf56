"""End to end: input validation, strict (OpenAI's rule: nothing sent) and --skip-invalid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    assert_each_once,
    batch_from,
    chat_line,
    check_error_line,
    check_output_line,
    dumps,
    embeddings_line,
    ids,
    read_jsonl,
)

JUNK = b"\x00\xff\xfe\x80\x81\x9c\xc3( binary junk \xf0\x28\x8c\xbc"

# (raw line, expected code or None for valid, custom_id in the error line); line numbers are physical
BAD_FILE: list[tuple[bytes, str | None, str | None]] = [
    (dumps(chat_line("v1", "first")), None, None),                                       # 1
    (b"", None, None),                                                                   # 2 blank
    (b'{"custom_id": "broken", "method": "POST", not json', "invalid_json_line", None),  # 3
    (dumps(chat_line(None, "no id")), "invalid_request", None),                          # 4
    (dumps(chat_line("v1", "again")), "duplicate_custom_id", "v1"),                      # 5
    (dumps({**chat_line("get", "x"), "method": "GET"}), "invalid_request", "get"),       # 6
    (dumps({**chat_line("bad-url", "x"), "url": "/v1/unknown"}), "invalid_request", "bad-url"),  # 7
    (dumps(chat_line("stream", "x", stream=True)), "invalid_request", "stream"),         # 8
    (dumps({**chat_line("body-str", "x"), "body": "model=gpt"}), "invalid_request", "body-str"),  # 9
    (JUNK, "invalid_json_line", None),                                                   # 10
    (b"[1, 2]", "invalid_request", None),                                                # 11
    (dumps({**chat_line("no-model"), "body": {"messages": []}}), "invalid_request", "no-model"),  # 12
    (dumps(embeddings_line("emb", "x")), "url_mismatch", "emb"),                         # 13
    (dumps(chat_line("v2", "second")), None, None),                                      # 14
    (dumps(chat_line("", "empty id")), "invalid_request", None),                         # 15
]
EXPECTED = [(code, n) for n, (_, code, _) in enumerate(BAD_FILE, 1) if code]
NON_BLANK = sum(1 for raw, _, _ in BAD_FILE if raw)


def write_bad(tmp_path: Path) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"".join(raw + b"\n" for raw, _, _ in BAD_FILE))
    return p


def test_strict_default_lists_every_bad_line_and_sends_nothing(tmp_path: Path, fake, run_cli) -> None:
    write_bad(tmp_path)
    p = run_cli(["in.jsonl", "-q", "--endpoint", "/v1/chat/completions", "--summary", "summary.json"])
    assert p.returncode == 4, p.stderr
    assert fake.stats()["requests"] == 0
    batch = batch_from(p.stdout)
    assert batch["status"] == "failed" and batch["failed_at"] is not None
    got = [(e["code"], e["line"]) for e in batch["errors"]["data"]]
    assert got == EXPECTED
    assert all(e["message"] for e in batch["errors"]["data"])
    assert batch["request_counts"] == {"total": NON_BLANK, "completed": 0, "failed": 0}
    assert "in.jsonl:3" in p.stderr and "--skip-invalid" in p.stderr
    assert json.loads((tmp_path / "summary.json").read_text()) == batch
    assert read_jsonl(tmp_path / "in.output.jsonl") == []
    assert read_jsonl(tmp_path / "in.errors.jsonl") == []


def test_skip_invalid_writes_bad_lines_and_runs_the_rest(tmp_path: Path, fake, run_cli) -> None:
    write_bad(tmp_path)
    p = run_cli(["in.jsonl", "-q", "--skip-invalid", "--endpoint", "/v1/chat/completions"])
    assert p.returncode == 3, p.stderr
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    assert sorted(ids(out)) == ["v1", "v2"]
    for obj in out:
        check_output_line(obj, "/v1/chat/completions")
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"] in ("echo: first", "echo: second")
    assert len(err) == len(EXPECTED)
    for obj in err:
        check_error_line(obj)
        assert obj["response"] is None
    # match error lines to input lines by the "line N" in their message
    by_line = {}
    for obj in err:
        nums = [n for code, n in EXPECTED if f"line {n}" in obj["error"]["message"]]
        assert len(nums) == 1, obj["error"]["message"]
        by_line[nums[0]] = obj
    assert sorted(by_line) == [n for _, n in EXPECTED]
    for n, (_, code, cid) in enumerate(BAD_FILE, 1):
        if code:
            assert by_line[n]["error"]["code"] == code, (n, by_line[n])
            assert by_line[n]["custom_id"] == cid, (n, by_line[n])
    assert fake.stats()["requests"] == 2
    batch = batch_from(p.stdout)
    assert batch["status"] == "completed" and batch["errors"] is None
    assert batch["request_counts"] == {"total": NON_BLANK, "completed": 2, "failed": len(EXPECTED)}


@pytest.mark.parametrize("source, data", [("file", b""), ("file", b"\n\n   \r\n\t\n"), ("stdin", b"")],
                         ids=["empty", "blank-lines", "empty-stdin"])
def test_empty_input_fails_validation(tmp_path: Path, fake, run_cli, source: str, data: bytes) -> None:
    if source == "file":
        (tmp_path / "in.jsonl").write_bytes(data)
        p = run_cli(["in.jsonl", "-q"])
    else:
        p = run_cli(["-", "-q"], input_bytes=data)
    assert p.returncode == 4, p.stderr
    batch = batch_from(p.stdout)
    assert batch["status"] == "failed"
    assert [e["code"] for e in batch["errors"]["data"]] == ["empty_file"]
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert fake.stats()["requests"] == 0


def test_stdin_strict_invalid_names_stdin(tmp_path: Path, fake, run_cli) -> None:
    data = dumps(chat_line("a")) + b"\n{oops\n" + dumps(chat_line("b")) + b"\n"
    p = run_cli(["-", "-q"], input_bytes=data)
    assert p.returncode == 4, p.stderr
    assert "<stdin>:2" in p.stderr
    batch = batch_from(p.stdout)
    assert [(e["code"], e["line"]) for e in batch["errors"]["data"]] == [("invalid_json_line", 2)]
    assert fake.stats()["requests"] == 0


def test_stdin_skip_invalid(tmp_path: Path, fake, run_cli) -> None:
    good = [chat_line(f"g{i}", f"n{i}") for i in range(3)]
    data = (dumps(good[0]) + b"\n" + JUNK + b"\n\n" + dumps(good[1]) + b"\n"
            + dumps(chat_line("g0", "dup")) + b"\n" + dumps(good[2]) + b"\n")
    p = run_cli(["-", "-q", "--skip-invalid"], input_bytes=data)
    assert p.returncode == 3, p.stderr
    out, err = read_jsonl(tmp_path / "batch.output.jsonl"), read_jsonl(tmp_path / "batch.errors.jsonl")
    assert_each_once(ids(good), out)
    assert [(e["custom_id"], e["error"]["code"]) for e in err] in (
        [(None, "invalid_json_line"), ("g0", "duplicate_custom_id")],
        [("g0", "duplicate_custom_id"), (None, "invalid_json_line")])
    assert any("line 2" in e["error"]["message"] for e in err)
    assert any("line 5" in e["error"]["message"] for e in err)
    batch = batch_from(p.stdout)
    assert batch["request_counts"] == {"total": 5, "completed": 3, "failed": 2}


# ------------------------------------------------------------------ urls with and without --base-url


def test_base_url_still_refuses_a_url_that_is_no_endpoint(tmp_path: Path, fake, run_cli) -> None:
    """--base-url passes any /v1/... path and vLLM's endpoints through, not any path: /bad_url fails
    validation (exit 4) and nothing is sent."""
    lines = [chat_line("a"), {**chat_line("bad", "x"), "url": "/bad_url"},
             {**chat_line("tok", "x"), "url": "/v1/tokenize"}, {**chat_line("rr", "x"), "url": "/v2/rerank"}]
    (tmp_path / "in.jsonl").write_bytes(b"".join(dumps(x) + b"\n" for x in lines))
    p = run_cli(["in.jsonl", "-q", "--base-url", fake.url + "/v1"])
    assert p.returncode == 4, p.stderr
    assert fake.stats()["requests"] == 0
    batch = batch_from(p.stdout)
    assert [(e["code"], e["line"], e["param"]) for e in batch["errors"]["data"]] == [("invalid_request", 2, "url")]
    message = batch["errors"]["data"][0]["message"]
    assert '"/bad_url" is not a batch endpoint' in message and "/v2/rerank" in message, message
    assert "in.jsonl:2" in p.stderr


def test_vllm_endpoints_without_base_url_are_unsupported_lines(tmp_path: Path, fake, run_cli) -> None:
    """Valid batch lines, but the router serves none of vLLM's endpoints: unsupported_endpoint error lines."""
    lines = [chat_line("a"), {**chat_line("score", "x"), "url": "/score"},
             {**chat_line("rerank", "x"), "url": "/v2/rerank"}]
    (tmp_path / "in.jsonl").write_bytes(b"".join(dumps(x) + b"\n" for x in lines))
    p = run_cli(["in.jsonl", "-q"])
    assert p.returncode == 3, p.stderr
    err = read_jsonl(tmp_path / "in.errors.jsonl")
    assert sorted((e["custom_id"], e["error"]["code"]) for e in err) == [
        ("rerank", "unsupported_endpoint"), ("score", "unsupported_endpoint")]
    for obj in err:
        check_error_line(obj)
        assert "--base-url" in obj["error"]["message"]
    assert fake.stats()["requests"] == 1


def test_base_url_sends_vllm_endpoints_where_vllm_serves_them(tmp_path: Path, fake, run_cli) -> None:
    """/v1/... under --base-url; /score, /rerank and /v2/rerank at the server's root (not /v1/v2/rerank)."""
    lines = [chat_line("a"), {**chat_line("score", "x"), "url": "/score"},
             {**chat_line("rerank2", "x"), "url": "/v2/rerank"}, {**chat_line("rerank1", "x"), "url": "/v1/rerank"}]
    (tmp_path / "in.jsonl").write_bytes(b"".join(dumps(x) + b"\n" for x in lines))
    p = run_cli(["in.jsonl", "-q", "--base-url", fake.url + "/v1", "--max-attempts", "1"])
    assert p.returncode == 3, p.stderr  # the fake serves none of them: 404 error lines that name the path
    err = read_jsonl(tmp_path / "in.errors.jsonl")
    got = {e["custom_id"]: (e["response"]["status_code"], e["response"]["body"]["error"]["message"]) for e in err}
    assert got == {"score": (404, "no route for POST /score"), "rerank2": (404, "no route for POST /v2/rerank"),
                   "rerank1": (404, "no route for POST /v1/rerank")}, got
