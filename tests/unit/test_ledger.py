"""batches.ledger.scan: the output and error files read back on resume; a torn last line is cut, any
other line that is not a batch line stops the run (UsageError naming the file and the line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hfbatch.batches.ledger import scan
from hfbatch.errors import ExitCode, UsageError
from hfbatch.summary import Stats


def ok(cid: str) -> bytes:
    return json.dumps({"id": "batch_req_1", "custom_id": cid, "error": None,
                       "response": {"status_code": 200, "request_id": "r", "body": {"usage": {}}}}).encode()


def http_error(cid: str, status: int) -> bytes:
    return json.dumps({"id": "batch_req_2", "custom_id": cid, "error": None,
                       "response": {"status_code": status, "request_id": "r", "body": {"error": {}}}}).encode()


def rejected(line_no: int, cid: str | None = None) -> bytes:
    return json.dumps({"id": "batch_req_3", "custom_id": cid, "response": None,
                       "error": {"code": "invalid_request", "message": f"line {line_no}: body.model is missing"}}
                      ).encode()


def files(tmp_path: Path, out: list[bytes], err: list[bytes], torn: bytes = b"") -> tuple[str, str]:
    o, e = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    o.write_bytes(b"".join(x + b"\n" for x in out) + torn)
    e.write_bytes(b"".join(x + b"\n" for x in err))
    return str(o), str(e)


def test_reads_answers_failures_and_rejected_lines(tmp_path: Path) -> None:
    o, e = files(tmp_path, [ok("a"), ok("b")], [http_error("c", 400), rejected(7), rejected(9, "dup")])
    stats = Stats()
    ledger = scan(o, e, stats)
    assert all(c in ledger.done for c in "abc") and "dup" not in ledger.done
    assert ledger.rejected == {7, 9}
    assert (stats.completed, stats.failed) == (2, 3)


def test_a_torn_last_line_is_cut_silently(tmp_path: Path) -> None:
    o, e = files(tmp_path, [ok("a"), ok("b")], [], torn=ok("c")[:30])
    ledger = scan(o, e, Stats())
    assert "a" in ledger.done and "b" in ledger.done and "c" not in ledger.done
    assert Path(o).read_bytes() == ok("a") + b"\n" + ok("b") + b"\n"


DAMAGE: list[tuple[bytes, str]] = [
    (b"typed by hand", "not JSON"),
    (ok("x")[:30], "not JSON"),
    (b"", "a blank line"),
    (b"[1, 2]", "a JSON array, not an object"),
    (b'"text"', "a JSON string, not an object"),
    (json.dumps({"id": "batch_req_1", "response": {"status_code": 200}, "error": None}).encode(), "no custom_id"),
    (json.dumps({"custom_id": 12, "response": {}, "error": None}).encode(), "custom_id is not a non-empty string"),
    (json.dumps({"custom_id": "", "response": {}, "error": None}).encode(), "custom_id is not a non-empty string"),
]


@pytest.mark.parametrize("line, what", DAMAGE, ids=["text", "half-line", "blank", "array", "string",
                                                    "no-custom_id", "int-custom_id", "empty-custom_id"])
@pytest.mark.parametrize("which", ["out", "err"])
def test_a_damaged_line_is_a_usage_error_naming_file_and_line(tmp_path: Path, which: str, line: bytes,
                                                               what: str) -> None:
    good = [ok("a"), ok("b")] if which == "out" else [http_error("a", 400), http_error("b", 404)]
    damaged = [good[0], line, good[1]]
    o, e = files(tmp_path, damaged if which == "out" else [ok("z")], damaged if which == "err" else [])
    with pytest.raises(UsageError) as info:
        scan(o, e, Stats())
    path = o if which == "out" else e
    assert str(info.value).startswith(f"{path}:2: not a batch output line ({what}")
    assert str(info.value).endswith("the file was edited or damaged: fix or delete that line, then rerun")
    assert info.value.exit_code == ExitCode.USAGE and "\n" not in str(info.value)


def test_an_output_line_without_a_response_object_is_damage(tmp_path: Path) -> None:
    o, e = files(tmp_path, [ok("a"), json.dumps({"custom_id": "b", "response": "x"}).encode()], [])
    with pytest.raises(UsageError, match=r"out\.jsonl:2: not a batch output line \(no response object\)"):
        scan(o, e, Stats())


def test_a_rejected_input_line_without_custom_id_belongs_in_the_error_file_only(tmp_path: Path) -> None:
    o, e = files(tmp_path, [ok("a"), rejected(3)], [])
    with pytest.raises(UsageError, match=r"out\.jsonl:2: .*\(no custom_id\)"):
        scan(o, e, Stats())
    # An error line with a null custom_id that is not a rejection is not a batch line either.
    line: dict[str, Any] = {"id": "batch_req_1", "custom_id": None, "response": None,
                            "error": {"code": "connection_error", "message": "reset"}}
    o, e = files(tmp_path, [ok("a")], [json.dumps(line).encode()])
    with pytest.raises(UsageError, match=r"err\.jsonl:1: .*\(no custom_id\)"):
        scan(o, e, Stats())


def test_retry_failed_rewrites_nothing_when_a_line_is_damaged(tmp_path: Path) -> None:
    o, e = files(tmp_path, [ok("a")], [http_error("b", 503), b"{garbage", http_error("c", 503)])
    before = Path(e).read_bytes()
    with pytest.raises(UsageError, match=r"err\.jsonl:2: "):
        scan(o, e, Stats(), retry_failed=True)
    assert Path(e).read_bytes() == before, "the error file was rewritten without the lines read so far"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err.jsonl", "out.jsonl"]


def test_retry_failed_drops_the_retryable_lines(tmp_path: Path) -> None:
    o, e = files(tmp_path, [ok("a")], [http_error("b", 503), http_error("c", 501), rejected(4)])
    ledger = scan(o, e, Stats(), retry_failed=True)
    assert ledger.retried == 1 and "b" not in ledger.done and "c" in ledger.done
    assert Path(e).read_bytes() == http_error("c", 501) + b"\n" + rejected(4) + b"\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err.jsonl", "out.jsonl"]
