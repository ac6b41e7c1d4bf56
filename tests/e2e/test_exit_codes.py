"""End to end: exit codes, early stops (401/403/402), the token, usage errors and signals."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import (
    TOKEN,
    assert_clean,
    batch_from,
    chat_line,
    check_output_line,
    ids,
    read_jsonl,
    write_jsonl,
)


def chat_file(tmp_path: Path, n: int, name: str = "in.jsonl", prefix: str = "r") -> list[str]:
    lines = [chat_line(f"{prefix}{i:03d}", f"[[id:{prefix}{i:03d}]] message {i}") for i in range(n)]
    write_jsonl(tmp_path / name, lines)
    return ids(lines)  # type: ignore[return-value]


def assert_no_lines(tmp_path: Path, stem: str = "in") -> None:
    assert read_jsonl(tmp_path / f"{stem}.output.jsonl") == []
    assert read_jsonl(tmp_path / f"{stem}.errors.jsonl") == []


def stop_problems(batch: dict, reason: str) -> list[str]:  # type: ignore[type-arg]
    """What is wrong with the Batch object of a run stopped early (resumable) for `reason`."""
    problems = []
    hb, rc = batch["hfbatch"], batch["request_counts"]
    if batch["status"] != "in_progress":
        problems.append(f"status is {batch['status']!r}, expected 'in_progress'")
    if batch["completed_at"] is not None:
        problems.append("completed_at is set")
    if hb["state"] != "interrupted":
        problems.append(f"hfbatch.state is {hb['state']!r}, expected 'stopped'")
    if hb["stop_reason"] != reason:
        problems.append(f"hfbatch.stop_reason is {hb['stop_reason']!r}, expected {reason!r}")
    if hb["unsent"] != rc["total"] - rc["completed"] - rc["failed"]:
        problems.append(f"hfbatch.unsent {hb['unsent']} != total - completed - failed ({rc})")
    return problems


def assert_stopped(batch: dict, reason: str) -> None:  # type: ignore[type-arg]
    problems = stop_problems(batch, reason)
    assert not problems, "; ".join(problems)


# ------------------------------------------------------------------ 401 / 403 / 402


def test_401_stops_at_once_with_exit_2(tmp_path: Path, make_fake, run_cli) -> None:
    fake = make_fake(fail_401=True)
    chat_file(tmp_path, 30)
    flag_token = "hf_distinctive_flag_token_4242"
    p = run_cli(["in.jsonl", "-q", "-c", "2", "--token", flag_token], timeout=20)
    assert p.returncode == 2, p.stderr
    assert "token" in p.stderr.lower() and "401" in p.stderr
    st = fake.stats()
    assert 1 <= st["requests"] <= 2, f"{st['requests']} requests sent after a 401"
    assert st["s401"] == st["requests"] and st["auth_missing"] == 0
    assert_no_lines(tmp_path)  # nothing answered: a rerun sends everything
    batch = batch_from(p.stdout)
    assert batch["request_counts"] == {"total": 30, "completed": 0, "failed": 0}
    assert batch["hfbatch"]["unsent"] == 30
    assert_stopped(batch, "auth")


def test_403_stops_at_once_with_exit_2(tmp_path: Path, fake, run_cli) -> None:
    lines = [chat_line("first", "[[fault:403,403]] gated")] + [chat_line(f"n{i}", f"m{i}") for i in range(9)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "-c", "1"], timeout=20)
    assert p.returncode == 2, p.stderr
    assert "403" in p.stderr
    assert fake.stats()["requests"] == 1
    assert_no_lines(tmp_path)
    assert_stopped(batch_from(p.stdout), "auth")


def test_402_stops_dispatching_exit_5_and_leaves_the_rest_resumable(tmp_path: Path, make_fake,
                                                                    run_cli) -> None:
    fake = make_fake(fail_402_after=10, latency=0.02)
    all_ids = chat_file(tmp_path, 60)
    p = run_cli(["in.jsonl", "-q", "-c", "4"], timeout=10)  # the run itself takes < 1 s
    assert p.returncode == 5, p.stderr
    low = p.stderr.lower()
    assert "credits" in low and "top up" in low
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    st = fake.stats()
    assert err == [], "a request refused with 402 must not get an error line (it is resumable)"
    assert 10 <= len(out) == st["ok"] < 60
    assert len(set(ids(out))) == len(out) and set(ids(out)) <= set(all_ids)
    for obj in out:
        check_output_line(obj, "/v1/chat/completions")
    batch = batch_from(p.stdout)
    assert batch["request_counts"] == {"total": 60, "completed": len(out), "failed": 0}
    assert batch["hfbatch"]["unsent"] == 60 - len(out) > 0
    assert_stopped(batch, "credits")


# ------------------------------------------------------------------ token


def test_missing_token_exits_2_before_any_request(tmp_path: Path, fake, run_cli) -> None:
    chat_file(tmp_path, 3)
    p = run_cli(["in.jsonl", "-q"], env_extra={"HF_TOKEN": None})
    assert p.returncode == 2, p.stderr
    assert "HF_TOKEN" in p.stderr
    assert fake.stats()["requests"] == 0
    assert not (tmp_path / "in.output.jsonl").exists()


def test_token_is_sent_but_never_printed_or_written(tmp_path: Path, make_fake, run_cli) -> None:
    # Successes, provider errors, no-answer errors and a validation error, with the token from the env.
    fake = make_fake(retry_after="0")
    token = "hf_VeryDistinctiveSecret_zq81"
    lines = [chat_line("ok", "fine"), chat_line("bad", "x", model="test-org/NonExist-1"),
             chat_line("reset", "[[fault:reset,reset]] x"), chat_line("e500", "[[fault:500,500]] x")]
    write_jsonl(tmp_path / "in.jsonl", [*lines, b"{not json"])
    p = run_cli(["in.jsonl", "-q", "--skip-invalid", "--max-attempts", "2", "--summary", "s.json"],
                env_extra={"HF_TOKEN": token})
    assert p.returncode == 3, p.stderr
    assert fake.stats()["auth_missing"] == 0  # it was sent...
    # ...and run_cli already checked that it is in no stream and no file; check the summary too:
    assert token not in (tmp_path / "s.json").read_text()


def test_a_token_with_a_line_break_is_refused_before_any_request(tmp_path: Path, fake, run_cli) -> None:
    # It becomes an HTTP header value: a line break inside would end the header and smuggle others.
    chat_file(tmp_path, 2)
    p = run_cli(["in.jsonl", "-q"], env_extra={"HF_TOKEN": "hf_Distinct7\r\nx-smuggled: 1"})
    assert p.returncode == 2, p.stderr
    assert "line break" in p.stderr and "Distinct7" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert fake.stats()["requests"] == 0


# ------------------------------------------------------------------ usage errors


@pytest.mark.parametrize("args", [
    ["missing.jsonl"],
    ["in.jsonl", "--bogus-flag"],
    ["in.jsonl", "-c", "0"],
    ["in.jsonl", "-c", "lots"],
    ["in.jsonl", "--timeout", "0"],
    ["in.jsonl", "--max-attempts", "0"],
    ["in.jsonl", "-e", "-"],
    ["in.jsonl", "-o", "same.jsonl", "-e", "same.jsonl"],
    ["in.jsonl", "-o", "in.jsonl"],
    ["in.jsonl", "--base-url", "ftp://example.com/v1"],
    [],
], ids=["missing-input", "bad-flag", "concurrency-0", "concurrency-text", "timeout-0", "attempts-0",
        "errors-stdout", "same-files", "output-is-input", "bad-base-url", "no-input"])
def test_usage_errors_exit_2(tmp_path: Path, fake, run_cli, args: list[str]) -> None:
    chat_file(tmp_path, 2)
    before = (tmp_path / "in.jsonl").read_bytes()
    p = run_cli(["-q", *args] if args else [])
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stderr.strip()
    assert fake.stats()["requests"] == 0
    assert (tmp_path / "in.jsonl").read_bytes() == before


@pytest.mark.parametrize("window", ["999999h", "8d", "0s", "-1h", "nan", "inf", "1e309s"])
def test_completion_window_outside_the_range_exits_2(tmp_path: Path, fake, run_cli, window: str) -> None:
    chat_file(tmp_path, 2)
    p = run_cli(["in.jsonl", "-q", f"--completion-window={window}"])
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--completion-window" in lines[0] and "from 1s to 7d" in lines[0], p.stderr
    assert fake.stats()["requests"] == 0
    assert not (tmp_path / "in.output.jsonl").exists()


def test_the_completion_window_is_kept_as_openai_spells_it(tmp_path: Path, fake, run_cli) -> None:
    """The flag takes " 2H"; the Batch object (which OpenAI's clients read) says "2h"."""
    chat_file(tmp_path, 2)
    p = run_cli(["in.jsonl", "-q", "--completion-window", " 2H"])
    assert p.returncode == 0, p.stderr
    batch = batch_from(p.stdout)
    assert batch["completion_window"] == "2h" and batch["expires_at"] == batch["created_at"] + 7200


def test_unwritable_output_path_is_a_usage_error(tmp_path: Path, fake, run_cli) -> None:
    # A user mistake (the directory does not exist): exit 2 with a clear message, not an internal error.
    chat_file(tmp_path, 2)
    p = run_cli(["in.jsonl", "-q", "-o", "no/such/dir/out.jsonl"])
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "internal error" not in p.stderr
    assert "no/such/dir" in p.stderr


def test_all_succeeded_exits_0(tmp_path: Path, fake, run_cli) -> None:
    want = chat_file(tmp_path, 5)
    p = run_cli(["in.jsonl", "-q"])
    assert p.returncode == 0, p.stderr
    assert sorted(ids(read_jsonl(tmp_path / "in.output.jsonl"))) == want
    assert read_jsonl(tmp_path / "in.errors.jsonl") == []
    assert p.stderr.strip() == ""  # -q: nothing to say on success
    batch = batch_from(p.stdout)
    assert p.stdout.count("\n") == 1, "the Batch object is one JSON line on stdout"
    assert batch["status"] == "completed" and batch["hfbatch"]["state"] == "finished"


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly(tmp_path: Path, make_fake, popen_cli, sig: signal.Signals) -> None:
    fake = make_fake(latency=0.3)
    all_ids = chat_file(tmp_path, 200)
    grace = 30  # in-flight requests take 0.3 s: ending before the grace shows it waited for them, not for it
    proc = popen_cli(["in.jsonl", "-q", "-c", "4", "--grace", str(grace)])
    deadline = time.monotonic() + 20
    while (fake.stats()["ok"] < 4 or fake.stats()["inflight"] < 1) and time.monotonic() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)  # until the run is under way with requests in flight
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    t0 = time.monotonic()
    try:
        out_b, err_b = proc.communicate(timeout=grace + 15)
    except Exception:  # pragma: no cover - a hang is a failure
        proc.kill()
        out_b, err_b = proc.communicate()
        pytest.fail(f"hfbatch did not exit after {sig.name}: {err_b.decode(errors='replace')[-2000:]}")
    stop_seconds = time.monotonic() - t0
    stdout, stderr = out_b.decode("utf-8", "replace"), err_b.decode("utf-8", "replace")
    assert_clean(tmp_path, stdout, stderr, {TOKEN})
    assert proc.returncode == -sig, (proc.returncode, stderr)

    out = read_jsonl(tmp_path / "in.output.jsonl")  # complete lines only
    err = read_jsonl(tmp_path / "in.errors.jsonl")
    got = ids(out) + ids(err)
    assert len(got) == len(set(got)), "a custom_id was written twice"
    assert set(got) <= set(all_ids)
    for obj in out:
        check_output_line(obj, "/v1/chat/completions")
    assert fake.stats()["dup_ok"] == 0
    batch = batch_from(stdout)
    assert batch["request_counts"]["completed"] == len(out)
    assert 0 < batch["hfbatch"]["unsent"] < 200
    problems = stop_problems(batch, "signal")
    # In-flight requests take 0.3 s: the run must end when they finish, not when the grace period ends.
    if stop_seconds >= grace:
        problems.append(f"took {stop_seconds:.1f} s to exit after {sig.name}: it waited out the grace period")
    assert not problems, "; ".join(problems)



@pytest.mark.parametrize("flag", ["-o", "-e", "--summary"])
def test_a_directory_as_an_output_path_is_named_at_once(tmp_path: Path, fake, run_cli, flag: str) -> None:
    chat_file(tmp_path, 2)
    (tmp_path / "adir").mkdir()
    p = run_cli(["in.jsonl", "-q", flag, "adir"])
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "adir" in lines[0] and "is a directory" in lines[0], p.stderr
    assert "--overwrite" not in p.stderr
    assert fake.stats()["requests"] == 0


def test_sigterm_counts_hung_requests_apart_from_unsent_ones(tmp_path: Path, make_fake, popen_cli) -> None:
    """Requests sent and never answered are not "not sent": the message and the summary say which is which."""
    fake = make_fake()
    lines = [chat_line(f"h{i}", f"[[fault:hang]] hung {i}") for i in range(3)]
    lines += [chat_line(f"q{i}", f"queued {i}") for i in range(20)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    proc = popen_cli(["in.jsonl", "-q", "-c", "3", "--grace", "0.2", "--no-adapt"])
    deadline = time.monotonic() + 20
    while fake.stats()["hang"] < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert fake.stats()["hang"] == 3, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out_b, err_b = proc.communicate(timeout=20)
    stdout, stderr = out_b.decode(), err_b.decode()
    assert_clean(tmp_path, stdout, stderr, {TOKEN})
    batch = batch_from(stdout)
    assert batch["hfbatch"]["unsent"] == 23 and batch["hfbatch"]["abandoned"] == 3, batch["hfbatch"]
    assert "3 were sent and got no answer" in stderr and "20 were not sent" in stderr, stderr
