"""End to end: the batch lifecycle. The registry ($HFBATCH_HOME/batches/<id>/), the registry commands
(list, status, cancel, resume, wait, results), exactly-once resume (rerun, kill -9, torn lines,
--retry-failed, --skip-invalid duplicates), one process per batch, signals, expiry, cancel, --detach.

Every CLI call here runs as a real subprocess (umask 0o022) against a real fake provider; every run
is checked for tracebacks and token leaks, and every Batch object is validated with the openai SDK.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Cli,
    assert_each_once,
    batch_dirs,
    batch_from,
    chat_file,
    chat_line,
    check_batch,
    check_completed,
    check_error_line,
    check_interrupted,
    check_output_line,
    check_private,
    check_stamps,
    count_lines,
    ids,
    last_json,
    poll,
    read_jsonl,
    wait_until_blocked_on_lock,
    wait_until_blocked_on_stdin,
    write_jsonl,
)

URL = "/v1/chat/completions"
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
TERMINAL = {"completed", "failed", "expired", "cancelled"}
# --------------------------------------------------------------------------- registry and commands


def test_registry_commands_and_replay(tmp_path: Path, make_fake, cli: Cli) -> None:
    """Submitted with relative paths in proj/; the registry commands are run from another directory."""
    fake = make_fake()
    proj = tmp_path / "proj"
    all_ids = chat_file(proj / "in.jsonl", 20, extra={7: "[[fault:400]] "})
    p = cli.run("submit", "in.jsonl", "-q", "-c", "4", cwd=proj)
    assert p.returncode == 3, p.stderr  # one line answered 400
    printed = batch_from(p.stdout)
    check_completed(printed)
    assert printed["request_counts"] == {"total": 20, "completed": 19, "failed": 1}
    out, err = read_jsonl(proj / "in.output.jsonl"), read_jsonl(proj / "in.errors.jsonl")
    assert_each_once(all_ids, out, err)

    # The registry: batches/<id>/{batch.json, meta.json}, private whatever the umask.
    batch_id = cli.only_batch_id()
    assert batch_id == printed["id"]
    stored, meta = cli.stored(batch_id)
    assert stored == printed, "batch.json differs from the Batch object printed at the end"
    digest = hashlib.sha256((proj / "in.jsonl").read_bytes()).hexdigest()
    assert meta["input_sha256"] == digest
    assert meta["input_path"] in ("in.jsonl", str(proj / "in.jsonl")), meta["input_path"]
    assert os.path.abspath(proj / meta["output_path"]) == str(proj / "in.output.jsonl")
    assert os.path.abspath(proj / meta["errors_path"]) == str(proj / "in.errors.jsonl")
    assert meta["options"]["concurrency"] == 4
    assert meta["exit_code"] == 3
    assert meta["pid"] is None, "a finished batch still names a process"
    check_private(cli.home)

    # list (piped: JSON lines), status, results [--errors]: from tmp_path, not proj.
    rows = cli.listing()
    assert [r["id"] for r in rows] == [batch_id]
    assert rows[0] == stored
    assert cli.batch("status", batch_id) == stored
    for flag, path in (((), proj / "in.output.jsonl"), (("--errors",), proj / "in.errors.jsonl")):
        r = cli.run("results", batch_id, *flag)
        assert r.returncode == 0, r.stderr
        assert r.stdout.encode() == path.read_bytes(), (
            f"`hfbatch results {batch_id} {' '.join(flag)}` from another directory printed "
            f"{len(r.stdout.splitlines())} lines, not {path.name} (paths kept relative to the submit's cwd?)")

    # The same command again: nothing sent, the stored Batch printed, the stored exit code.
    before = fake.stats()["requests"]
    again = cli.run("submit", "in.jsonl", "-q", "-c", "4", cwd=proj)
    assert again.returncode == 3, again.stderr
    assert fake.stats()["requests"] == before, "a finished batch sent requests again"
    assert batch_from(again.stdout) == stored
    assert len(batch_dirs(cli.home)) == 1
    assert read_jsonl(proj / "in.output.jsonl") == out and read_jsonl(proj / "in.errors.jsonl") == err
    check_private(cli.home)


def test_list_is_newest_first(tmp_path: Path, make_fake, cli: Cli) -> None:
    """Batches registered a few tens of ms apart (the same second) are still listed newest first."""
    make_fake()
    n = 3
    procs = [cli.start("submit", "-", "-q", "-o", f"o{k}.jsonl", "-e", f"e{k}.jsonl", stdin_pipe=True)
             for k in range(n)]
    wait_until_blocked_on_stdin(procs)
    while time.time() % 1 > 0.3:  # register them all early in one second, if we can
        time.sleep(0.01)
    order = []
    for k, proc in enumerate(procs):
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(chat_line(f"list-{k}", f"batch {k}")).encode() + b"\n")
        proc.stdin.close()
        poll(lambda k=k: len(batch_dirs(cli.home)) == k + 1, f"batch {k} registered", proc=proc)
        order.append(next(d.name for d in batch_dirs(cli.home) if d.name not in order))
    for proc in procs:
        code, _, err = cli.finish(proc)
        assert code == 0, err
    for k, batch_id in enumerate(order):  # stdin is kept in the registry (privately)
        data = (cli.home / "batches" / batch_id / "input.jsonl").read_bytes()
        assert json.loads(data)["custom_id"] == f"list-{k}"
    check_private(cli.home)
    rows = cli.listing("--json")
    got = [r["id"] for r in rows]
    created = {r["id"]: r["created_at"] for r in rows}
    assert got == order[::-1], (f"not newest first: got {got}, registered in order {order}; created_at: "
                                f"{[created[i] for i in order]}")


# --------------------------------------------------------------------------- exactly-once resume


def test_kill9_then_rerun_resends_at_most_the_in_flight(tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake(latency=0.2)
    n, c = 28, 4
    all_ids = chat_file(tmp_path / "in.jsonl", n)
    proc = cli.start("submit", "in.jsonl", "-q", "-c", str(c))
    poll(lambda: count_lines(tmp_path / "in.output.jsonl") >= 8, "8 output lines", proc=proc)
    cli.kill9(proc)
    done_before = len(read_jsonl(tmp_path / "in.output.jsonl"))
    assert done_before < n

    # A registry written by a crashed process still reads; the batch shows as interrupted.
    batch_id = cli.only_batch_id()
    rows = cli.listing("--json")
    assert [r["id"] for r in rows] == [batch_id]
    check_interrupted(rows[0])

    p = cli.run("submit", "in.jsonl", "-q", "-c", str(c))
    assert p.returncode == 0, p.stderr
    batch = batch_from(p.stdout)
    assert batch["id"] == batch_id
    check_completed(batch)
    assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert_each_once(all_ids, out, read_jsonl(tmp_path / "in.errors.jsonl"))
    for obj in out:
        check_output_line(obj, URL)
    st = fake.stats()
    assert st["distinct_ok"] == n
    assert st["dup_ok"] <= c, f"{st['dup_ok']} answered requests were sent again (concurrency {c})"
    check_private(cli.home)


def test_sigint_then_rerun_finishes_once_and_repairs_a_torn_line(tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake(latency=0.1)
    n = 40
    all_ids = chat_file(tmp_path / "in.jsonl", n)
    proc = cli.start("submit", "in.jsonl", "-q", "-c", "4")
    poll(lambda: fake.stats()["ok"] >= 8, "8 answers", proc=proc)
    proc.send_signal(signal.SIGINT)
    code, stdout, stderr = cli.finish(proc)
    assert code == -signal.SIGINT, (code, stderr)
    first = batch_from(stdout)
    check_interrupted(first)
    assert first["hfbatch"]["stop_reason"] == "signal"
    assert cli.stored(first["id"])[0] == first
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert 0 < len(out) < n and len(set(ids(out))) == len(out)
    assert fake.stats()["dup_ok"] == 0

    # A crash mid-write leaves a torn last line: cut the last line in half.
    path = tmp_path / "in.output.jsonl"
    data = path.read_bytes()
    torn_id = out[-1]["custom_id"]
    path.write_bytes(data[: len(data) - 1 - (len(data.rstrip(b"\n").split(b"\n")[-1]) // 2)])
    assert not path.read_bytes().endswith(b"\n")

    p = cli.run("submit", "in.jsonl", "-q", "-c", "4")
    assert p.returncode == 0, p.stderr
    batch = batch_from(p.stdout)
    assert batch["id"] == first["id"]
    check_completed(batch)
    assert batch["in_progress_at"] == first["in_progress_at"], "resume forgot when the batch started"
    assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    out = read_jsonl(path)  # asserts the file ends with a complete line
    assert_each_once(all_ids, out, read_jsonl(tmp_path / "in.errors.jsonl"))
    for obj in out:
        check_output_line(obj, URL)
    st = fake.stats()
    # Resent: exactly the lines without a complete line (the torn one included), nothing else.
    assert st["requests"] == n + 1, f"{st['requests']} requests for {n} lines and one torn line"
    assert st["dup_ok"] == 1, f"dup_ok {st['dup_ok']}: only the torn line ({torn_id}) should be sent again"
    check_private(cli.home)


def test_sigterm_then_hfbatch_resume(tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake(latency=0.1)
    n = 20
    all_ids = chat_file(tmp_path / "in.jsonl", n)
    proc = cli.start("submit", "in.jsonl", "-q", "-c", "2")
    poll(lambda: fake.stats()["ok"] >= 2, "2 answers", proc=proc)
    proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = cli.finish(proc)
    assert code == -signal.SIGTERM, (code, stderr)
    batch = batch_from(stdout)
    check_interrupted(batch)
    stored, meta = cli.stored(batch["id"])
    assert stored == batch and meta["pid"] is None and meta["exit_code"] is not None, meta

    p = cli.run("resume", batch["id"], "-q")
    assert p.returncode == 0, p.stderr
    done = batch_from(p.stdout)
    assert done["id"] == batch["id"]
    check_completed(done)
    assert done["request_counts"] == {"total": n, "completed": n, "failed": 0}
    assert_each_once(all_ids, read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl"))
    st = fake.stats()
    assert st["requests"] == n and st["dup_ok"] == 0, st


def test_retry_failed_resends_only_retryable_failures(tmp_path: Path, make_fake, cli: Cli) -> None:
    """--retry-failed re-sends exactly what the run itself would have retried (retry.is_retryable): 429, 500,
    502-504, timeouts, resets, broken answers; a 501, 505 or 599 is as final as a 400."""
    fake = make_fake()
    n = 20
    retryable = {2: "[[fault:503]] ", 5: "[[fault:503]] ", 9: "[[fault:429]] ", 3: "[[fault:500]] ",
                 4: "[[fault:502]] ", 6: "[[fault:504]] ", 7: "[[fault:hang]] ", 8: "[[fault:reset]] ",
                 10: "[[fault:garbage]] "}
    permanent = {12: "[[fault:400]] ", 15: "[[fault:404]] ", 13: "[[fault:501]] ", 14: "[[fault:505]] ",
                 16: "[[fault:599]] "}
    all_ids = chat_file(tmp_path / "in.jsonl", n, extra={**retryable, **permanent})
    # --no-adapt: a 429 at the door spends no attempt under the adaptive limit (r009 could be answered on a second)
    args = ["submit", "in.jsonl", "-q", "--max-attempts", "1", "--timeout", "1", "--no-adapt"]
    p = cli.run(*args)
    failed = len(retryable) + len(permanent)
    assert p.returncode == 3, p.stderr
    assert batch_from(p.stdout)["request_counts"] == {"total": n, "completed": n - failed, "failed": failed}
    err = read_jsonl(tmp_path / "in.errors.jsonl")
    assert len(err) == failed
    no_answer = {e["custom_id"]: e["error"]["code"] for e in err if e["response"] is None}
    assert no_answer == {"r007": "request_timeout", "r008": "connection_error", "r010": "invalid_response"}

    sent = fake.stats()["requests"]
    p = cli.run(*args, "--retry-failed")
    assert p.returncode == 3, p.stderr  # the permanent failures remain
    resent = fake.stats()["requests"] - sent
    assert resent == len(retryable), f"re-sent {resent} requests, not the {len(retryable)} retryable ones"
    batch = batch_from(p.stdout)
    check_completed(batch)
    assert batch["request_counts"] == {"total": n, "completed": n - len(permanent), "failed": len(permanent)}
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    assert_each_once(all_ids, out, err)
    assert sorted(ids(err)) == [f"r{i:03d}" for i in sorted(permanent)]
    assert sorted(e["response"]["status_code"] for e in err) == [400, 404, 501, 505, 599]
    for obj in err:
        check_error_line(obj)
    for obj in out:
        check_output_line(obj, URL)
    assert cli.stored(batch["id"])[1]["exit_code"] == 3
    assert fake.stats()["dup_ok"] == 0
    check_private(cli.home)


def _without_custom_id(line: bytes) -> bytes:
    obj = json.loads(line)
    del obj["custom_id"]
    return json.dumps(obj).encode()


@pytest.mark.parametrize("which, damage, what", [
    ("output", lambda line: b"this line was typed by hand", "not JSON"),
    ("output", _without_custom_id, "no custom_id"),
    ("errors", lambda line: line[: len(line) // 2], "not JSON"),  # a line cut in half, more lines after it
    ("errors", _without_custom_id, "no custom_id"),
], ids=["output-text", "output-no-custom_id", "errors-half-line", "errors-no-custom_id"])
def test_a_damaged_line_stops_the_rerun_before_anything_is_sent(
        tmp_path: Path, make_fake, cli: Cli, which: str, damage: Any, what: str) -> None:
    """A line in the middle of the output or error file that is not a batch line would make its request
    look unanswered (paid twice) or crash the resume: the rerun stops (exit 2), names the file and the
    line, and sends nothing. Once the line is removed, the rerun sends exactly what has no line.
    (Every kind of damage is in tests/unit/test_ledger.py.)"""
    fake = make_fake(fail_402_after=5)
    n = 20
    all_ids = chat_file(tmp_path / "in.jsonl", n, extra={1: "[[fault:400]] ", 3: "[[fault:404]] "})
    p = cli.run("submit", "in.jsonl", "-q", "-c", "1")
    assert p.returncode == 5, p.stderr  # credits exhausted after 5 answers: stopped, resumable
    path = tmp_path / f"in.{which}.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 2, lines
    lines.insert(1, damage(lines[0].rstrip(b"\n")) + b"\n")  # line 2 of the file
    path.write_bytes(b"".join(lines))
    damaged = path.read_bytes()
    fake.provider.config.fail_402_after = None
    fake.reset_stats()

    p = cli.run("submit", "in.jsonl", "-q", "-c", "1")
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stderr.strip().count("\n") == 0, f"not one line: {p.stderr!r}"
    assert f"in.{which}.jsonl:2: not a batch output line ({what}" in p.stderr, p.stderr
    assert "the file was edited or damaged: fix or delete that line, then rerun" in p.stderr, p.stderr
    assert fake.stats()["requests"] == 0, "sent requests despite a damaged ledger"
    assert path.read_bytes() == damaged, "the damaged file was changed"

    p = cli.run("submit", "in.jsonl", "-q", "-c", "1", "--retry-failed")  # same with --retry-failed
    assert p.returncode == 2 and f"in.{which}.jsonl:2: " in p.stderr, (p.returncode, p.stderr)
    assert fake.stats()["requests"] == 0 and path.read_bytes() == damaged
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"

    del lines[1]
    path.write_bytes(b"".join(lines))
    p = cli.run("submit", "in.jsonl", "-q", "-c", "1")
    assert p.returncode == 3, p.stderr  # the 400 and 404 remain
    assert batch_from(p.stdout)["request_counts"] == {"total": n, "completed": n - 2, "failed": 2}
    assert_each_once(all_ids, read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl"))
    st = fake.stats()
    assert st["requests"] == n - 7 and st["dup_ok"] == 0, st


def test_skip_invalid_duplicate_is_not_taken_for_the_answer(tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake()
    lines = [chat_line("a", "[[sleep:1]] [[id:a]] the valid a"), chat_line("a", "[[id:a-dup]] duplicate a"),
             chat_line("b", "[[id:b]] b"), chat_line("c", "[[id:c]] c")]
    write_jsonl(tmp_path / "in.jsonl", lines)
    args = ["submit", "in.jsonl", "-q", "-c", "4", "--skip-invalid"]
    proc = cli.start(*args)
    poll(lambda: count_lines(tmp_path / "in.output.jsonl") >= 2 and count_lines(tmp_path / "in.errors.jsonl") >= 1,
         "b, c answered and the duplicate rejected", proc=proc)
    cli.kill9(proc)  # "a" (1 s) is still in flight
    assert "a" not in ids(read_jsonl(tmp_path / "in.output.jsonl"))

    p = cli.run(*args)
    assert p.returncode == 3, p.stderr  # the rejected duplicate is a failed line
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    assert sorted(ids(out)) == ["a", "b", "c"], f"output custom_ids: {ids(out)}"
    answer_a = next(o for o in out if o["custom_id"] == "a")
    assert "the valid a" in answer_a["response"]["body"]["choices"][0]["message"]["content"]
    assert len(err) == 1, f"the rejection should appear once: {err}"
    assert err[0]["error"]["code"] == "duplicate_custom_id" and err[0]["error"]["message"].startswith("line 2:")
    st = fake.stats()
    assert st["distinct_ok"] == 3 and st["dup_ok"] == 0
    assert batch_from(p.stdout)["request_counts"] == {"total": 4, "completed": 3, "failed": 1}


def test_foreign_output_files_are_refused_unless_overwrite(tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake()
    all_ids = chat_file(tmp_path / "in.jsonl", 20)
    junk = json.dumps({"id": "batch_req_0", "custom_id": "zzz", "response": None, "error": None}) + "\n"
    (tmp_path / "out.jsonl").write_text(junk)
    args = ["submit", "in.jsonl", "-q", "-o", "out.jsonl", "-e", "err.jsonl"]
    p = cli.run(*args)
    assert p.returncode == 2, p.stderr
    assert "out.jsonl" in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert fake.stats()["requests"] == 0 and (tmp_path / "out.jsonl").read_text() == junk

    p = cli.run(*args, "--overwrite")
    assert p.returncode == 0, p.stderr
    batch_id = batch_from(p.stdout)["id"]
    assert_each_once(all_ids, read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "err.jsonl"))

    # The input changes: the same output paths now hold another input's lines.
    chat_file(tmp_path / "in.jsonl", 21)
    sent = fake.stats()["requests"]
    p = cli.run(*args)
    assert p.returncode == 2, p.stderr
    assert batch_id in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert fake.stats()["requests"] == sent


# --------------------------------------------------------------------------- one process per batch


def test_second_submit_exits_5_or_waits_and_replays(tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake(latency=0.05)
    n = 30
    all_ids = chat_file(tmp_path / "in.jsonl", n, extra={0: "[[hold]] "})  # the first run lasts until released
    args = ["submit", "in.jsonl", "-q", "-c", "4"]
    first = cli.start(*args)
    poll(lambda: fake.stats()["ok"] >= 4, "the first run under way", proc=first)

    second = cli.run(*args)
    assert second.returncode == 5, (second.returncode, second.stderr)
    assert f"pid {first.pid}" in second.stderr, second.stderr
    # (It did not wait for the first: that one is held until released below, so waiting would never end.)
    assert first.poll() is None, "the first run ended before the second was refused"

    waiter = cli.start(*args, "--wait")
    wait_until_blocked_on_lock([waiter])
    fake.release()
    code1, out1, err1 = cli.finish(first)
    code2, out2, err2 = cli.finish(waiter)
    assert code1 == 0, err1
    assert code2 == 0, err2
    b1, b2 = batch_from(out1), batch_from(out2)
    check_completed(b1)
    assert b2 == b1, "--wait did not replay the stored result"
    st = fake.stats()
    assert st["requests"] == n and st["dup_ok"] == 0, st
    assert_each_once(all_ids, read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl"))
    assert len(batch_dirs(cli.home)) == 1


def test_simultaneous_identical_submits_run_the_batch_once(tmp_path: Path, make_fake, cli: Cli) -> None:
    """Two identical submits (stdin input: same content, same paths) released at the same moment."""
    fake = make_fake(latency=0.05)
    n = 20
    lines = [chat_line(f"s{i:02d}", f"[[id:s{i:02d}]] same {i}") for i in range(n)]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    procs = [cli.start("submit", "-", "-q", "-c", "2", "-o", "out.jsonl", "-e", "err.jsonl", stdin_pipe=True)
             for _ in range(2)]
    wait_until_blocked_on_stdin(procs)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(data)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
    results = [cli.finish(proc) for proc in procs]
    codes = sorted(r[0] for r in results)
    st = fake.stats()
    registered = [d.name for d in batch_dirs(cli.home)]
    problems = []
    if len(registered) != 1:
        problems.append(f"{len(registered)} batches registered for one identity: {registered}")
    if st["requests"] != n or st["dup_ok"]:
        problems.append(f"the fake got {st['requests']} requests for {n} lines (dup_ok {st['dup_ok']})")
    if codes[0] != 0 or any(c not in (0, 5) for c in codes):
        problems.append(f"exit codes {codes}; stderr: {[r[2][-500:] for r in results]}")
    try:
        assert_each_once(ids(lines), read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "err.jsonl"))
    except AssertionError as e:
        problems.append(f"output: {e}")
    assert not problems, "; ".join(problems)


# --------------------------------------------------------------------------- expiry and cancel


def test_completion_window_expires(tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake(latency=0.3)
    n = 40
    all_ids = chat_file(tmp_path / "in.jsonl", n)
    args = ["submit", "in.jsonl", "-q", "-c", "2", "--completion-window", "2s"]
    p = cli.run(*args)
    assert p.returncode == 6, p.stderr
    batch = batch_from(p.stdout)
    assert batch["status"] == "expired", batch["status"]
    check_stamps(batch, "in_progress_at", "expired_at")
    assert batch["completed_at"] is None and batch["cancelled_at"] is None
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    assert_each_once(all_ids, out, err)
    assert 0 < len(out) < n
    for obj in err:
        check_error_line(obj)
        assert obj["error"] == {"code": "batch_expired", "message": EXPIRED_MESSAGE}, obj
    assert batch["request_counts"] == {"total": n, "completed": len(out), "failed": len(err)}
    assert batch["error_file_id"] is not None
    assert fake.stats()["requests"] == len(out), "a request sent before the expiry got no answer line"
    stored, meta = cli.stored(batch["id"])
    assert stored == batch and meta["exit_code"] == 6, meta


def test_cancel_a_running_batch(tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake(latency=0.3)
    n = 40
    all_ids = chat_file(tmp_path / "in.jsonl", n)
    proc = cli.start("submit", "in.jsonl", "-q", "-c", "2")
    poll(lambda: batch_dirs(cli.home) and fake.stats()["ok"] >= 2, "the run under way", proc=proc)
    rows = cli.listing("--json")
    assert len(rows) == 1 and rows[0]["status"] == "in_progress", rows
    batch_id = rows[0]["id"]
    c = cli.run("cancel", batch_id)
    assert c.returncode == 0, c.stderr
    cancelling = check_batch(last_json(c.stdout))

    code, stdout, stderr = cli.finish(proc, timeout=10)
    assert code == 6, (code, stderr)
    batch = batch_from(stdout)
    assert batch["id"] == batch_id and batch["status"] == "cancelled", batch["status"]
    check_stamps(batch, "in_progress_at", "cancelling_at", "cancelled_at")
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    assert_each_once(all_ids, out, err)
    assert err and all(e["error"]["code"] == "batch_cancelled" for e in err), err[:3]
    for obj in err:
        check_error_line(obj)
    assert batch["request_counts"] == {"total": n, "completed": len(out), "failed": len(err)}
    assert fake.stats()["requests"] == len(out)
    assert cli.stored(batch_id)[0] == batch
    check_private(cli.home)
    # What `hfbatch cancel` printed: a cancelling batch, stamped as such.
    assert cancelling["status"] in ("cancelling", "cancelled"), cancelling["status"]
    check_stamps(cancelling, "in_progress_at", "cancelling_at")


def test_cancel_after_kill9_closes_the_batch_out(tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake(latency=0.3)
    n = 40
    all_ids = chat_file(tmp_path / "in.jsonl", n)
    proc = cli.start("submit", "in.jsonl", "-q", "-c", "2")
    poll(lambda: count_lines(tmp_path / "in.output.jsonl") >= 2, "2 output lines", proc=proc)
    cli.kill9(proc)
    batch_id = cli.only_batch_id()
    sent = fake.stats()["requests"]
    check_interrupted(cli.batch("status", batch_id))  # what a crashed process left still reads

    batch = cli.batch("cancel", batch_id)  # closes it out itself: exit 0
    assert batch["status"] == "cancelled", batch["status"]
    check_stamps(batch, "in_progress_at", "cancelling_at", "cancelled_at")
    assert fake.stats()["requests"] == sent, "cancel sent requests"
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    assert_each_once(all_ids, out, err)
    assert all(e["error"]["code"] == "batch_cancelled" for e in err)
    assert batch["request_counts"] == {"total": n, "completed": len(out), "failed": len(err)}

    stored, meta = cli.stored(batch_id)
    assert stored == batch and meta["exit_code"] == 6, meta  # what `hfbatch wait` and a rerun exit with
    check_private(cli.home)


# --------------------------------------------------------------------------- --detach


def test_detach_status_wait_results(tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake(latency=0.05)
    n = 40
    # Line 0 is held until the test has seen a live refresh of batch.json (every ~2 s) and asked
    # `hfbatch status` about it.
    all_ids = chat_file(tmp_path / "in.jsonl", n, extra={0: "[[hold]] ", 3: "[[fault:400]] "})
    p = cli.run("submit", "in.jsonl", "-q", "-c", "2", "--detach")
    assert p.returncode == 0, p.stderr
    # (It returned without waiting for the run: line 0 is held until released below.)
    first = check_batch(last_json(p.stdout))
    batch_id = first["id"]
    assert first["status"] in ("validating", "in_progress"), first["status"]

    # Live progress while it runs: batch.json is refreshed every ~2 s, and `status` shows it.
    def live_counts() -> dict[str, Any] | None:
        try:
            b = cli.stored(batch_id)[0]
        except (OSError, ValueError):
            return None
        return b if b["status"] in TERMINAL or b["request_counts"]["completed"] > 0 else None

    seen = poll(live_counts, "live request_counts in batch.json", timeout=10)
    assert seen["status"] == "in_progress", f"no live counts before the batch ended ({seen['status']})"
    live = cli.batch("status", batch_id)
    assert live["status"] == "in_progress" and live["hfbatch"]["state"] == "running", live
    assert 0 < live["request_counts"]["completed"] < n and live["request_counts"]["total"] == n

    fake.release()
    w = cli.run("wait", batch_id, "--timeout", "20", timeout=30)
    assert w.returncode == 3, (w.returncode, w.stderr)  # the batch's own exit code: one line failed
    done = check_batch(last_json(w.stdout))
    check_completed(done)
    assert done["request_counts"] == {"total": n, "completed": n - 1, "failed": 1}
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    assert_each_once(all_ids, out, err)
    assert fake.stats()["requests"] == n and fake.stats()["dup_ok"] == 0
    assert cli.stored(batch_id)[1]["exit_code"] == 3
    check_private(cli.home)



def test_crash_during_registration_does_not_wedge_the_command(tmp_path: Path, make_fake, cli: Cli) -> None:
    """kill -9 between writing meta.json and batch.json leaves a batch with no batch.json: `list`
    still works, and the same command run again still runs the batch (it must not fail forever)."""
    fake = make_fake()
    n = 20
    all_ids = chat_file(tmp_path / "in.jsonl", n)
    p = cli.run("submit", "in.jsonl", "-q")
    assert p.returncode == 0, p.stderr
    # Rewind the registry and the files to that moment of the first run (its process is gone).
    d = cli.home / "batches" / batch_from(p.stdout)["id"]
    meta = json.loads((d / "meta.json").read_bytes())
    meta.update(exit_code=None, total=None, pid=None)
    (d / "meta.json").write_text(json.dumps(meta))
    for name in ("batch.json", "lock", "cancel"):
        (d / name).unlink(missing_ok=True)
    for name in ("in.output.jsonl", "in.errors.jsonl"):
        (tmp_path / name).unlink(missing_ok=True)
    fake.reset_stats()

    p = cli.run("submit", "in.jsonl", "-q")
    assert p.returncode == 0, (p.returncode, p.stderr)
    batch = batch_from(p.stdout)
    check_completed(batch)
    assert_each_once(all_ids, read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl"))
    assert fake.stats()["requests"] == n
