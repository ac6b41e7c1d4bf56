"""End to end: nothing lost, nothing claimed that is not on disk. A full disk, files removed under a run,
two batches racing for one output file.

Each test runs the real CLI against the fake provider. The full-disk tests mount a small tmpfs (root
only: skipped with the reason otherwise; the sink's failure handling is also unit-tested with an
injected failing file in tests/unit/test_writer.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Cli,
    assert_each_once,
    batch_dirs,
    chat_file,
    check_batch,
    check_completed,
    check_interrupted,
    last_json,
    read_jsonl,
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KB tmpfs at tmp_path/disk (unmounted at teardown)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e}): the full-disk path is covered by the unit tests")
    if p.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?): "
                    f"{p.stderr.decode(errors='replace').strip()}; the unit tests cover the sink")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


def _enlarge(disk: Path) -> None:
    """Give the run room: copy what is on the small disk off it, unmount it, copy it back (same paths)."""
    keep = disk.parent / "kept"
    shutil.copytree(disk, keep)
    subprocess.run(["umount", "-l", str(disk)], check=True, timeout=10)
    for p in keep.iterdir():
        shutil.copy2(p, disk / p.name)
    shutil.rmtree(keep)


def fill_up(disk: Path) -> None:
    """Write `disk/filler` until the disk is full (ENOSPC)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_full_disk_stops_resumable_and_the_rerun_sends_only_what_is_missing(
        tmp_path: Path, small_disk: Path, make_fake, cli: Cli) -> None:
    fake = make_fake()
    n = 3000
    expected = chat_file(tmp_path / "in.jsonl", n)
    args = ("submit", "in.jsonl", "-q", "-c", "32", "-o", "disk/out.jsonl", "-e", "disk/err.jsonl")
    p = cli.run(*args, timeout=60)
    batch = check_batch(last_json(p.stdout))
    out = (small_disk / "out.jsonl").read_bytes()
    on_disk = out.count(b"\n")  # complete lines (a torn last one is not an answer)
    problems = []
    if p.returncode != 5:
        problems.append(f"exit {p.returncode} (want 5)")
    if batch["status"] == "completed" or batch["hfbatch"]["state"] != "interrupted":
        problems.append(f"status {batch['status']}/{batch['hfbatch']['state']}: a full disk is not a finished batch")
    if batch["request_counts"]["completed"] > on_disk:
        problems.append(f"the summary claims {batch['request_counts']['completed']} answers, {on_disk} are on disk")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    if len(lines) != 1 or "out.jsonl" not in lines[0] or "No space left on device" not in lines[0]:
        problems.append(f"stderr should be one line naming the file and the OS error: {p.stderr[-1500:]!r}")
    assert not problems, "; ".join(problems)
    assert batch["hfbatch"]["stop_reason"] == "write_error"
    check_interrupted(batch)
    sent_first = fake.stats()["requests"]
    fake.reset_stats()

    _enlarge(small_disk)
    p2 = cli.run(*args, timeout=60)
    assert p2.returncode == 0, p2.stderr
    done = check_batch(last_json(p2.stdout))
    check_completed(done)
    outs, errs = read_jsonl(small_disk / "out.jsonl"), read_jsonl(small_disk / "err.jsonl")
    assert_each_once(expected, outs, errs)
    assert not errs
    # The rerun sends exactly the lines that had no complete line on disk: nothing paid twice except
    # what the full disk dropped (answers received but never written).
    assert fake.stats()["requests"] == n - on_disk
    assert sent_first >= on_disk
    assert done["request_counts"] == {"total": n, "completed": n, "failed": 0}


def test_output_file_removed_under_a_run_is_not_a_completed_batch(tmp_path: Path, make_fake, cli: Cli) -> None:
    """The ledger is the files: one removed while the batch runs loses its lines, and the batch must say so."""
    make_fake(latency=0.05)
    expected = chat_file(tmp_path / "in.jsonl", 40)
    args = ("submit", "in.jsonl", "-q", "-c", "4", "-o", "out.jsonl", "-e", "err.jsonl")
    proc = cli.start(*args)
    from conftest import poll

    poll(lambda: (tmp_path / "out.jsonl").exists() and (tmp_path / "out.jsonl").stat().st_size > 0,
         "the first answers", proc=proc)
    (tmp_path / "out.jsonl").unlink()
    code, out, err = cli.finish(proc)
    batch = check_batch(last_json(out))
    assert code == 5, err
    assert batch["status"] == "in_progress" and batch["hfbatch"]["stop_reason"] == "write_error", batch["hfbatch"]
    assert "out.jsonl" in err and "removed" in err, err
    on_disk = len(read_jsonl(tmp_path / "out.jsonl"))
    assert batch["request_counts"]["completed"] <= on_disk
    p2 = cli.run(*args)
    assert p2.returncode == 0, p2.stderr
    assert_each_once(expected, read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "err.jsonl"))


@pytest.mark.parametrize("racers", [2, 8])
def test_simultaneous_submits_to_one_output_file_one_wins(tmp_path: Path, make_fake, cli: Cli, racers: int) -> None:
    """Different inputs, the same -o/-e, released at the same moment: one batch owns the files, every other
    submit exits 2 naming it, and the winner's files hold only its lines."""
    from conftest import wait_until_blocked_on_stdin

    fake = make_fake(latency=0.02)
    inputs = []
    for r in range(racers):
        lines = [json.dumps({"custom_id": f"b{r}-{i:03d}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "test-org/tiny-chat", "messages": [
                                 {"role": "user", "content": f"[[id:b{r}-{i:03d}]] {i}"}]}}) for i in range(100)]
        inputs.append(("\n".join(lines) + "\n").encode())
    procs = [cli.start("submit", "-", "-q", "-c", "8", "-o", "out.jsonl", "-e", "err.jsonl", stdin_pipe=True)
             for _ in range(racers)]
    wait_until_blocked_on_stdin(procs)
    for proc, data in zip(procs, inputs, strict=True):
        assert proc.stdin is not None
        proc.stdin.write(data)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
    results = [cli.finish(proc, timeout=60) for proc in procs]
    winners = [i for i, (code, _, _) in enumerate(results) if code == 0]
    assert len(winners) == 1, [(c, e[-300:]) for c, _, e in results]
    win = winners[0]
    owner = last_json(results[win][1])["id"]
    for i, (code, _, err) in enumerate(results):
        if i != win:
            assert code == 2, (code, err)
            assert owner in err and "out.jsonl" in err, err
    prefix = f"b{win}-"
    assert_each_once([f"{prefix}{i:03d}" for i in range(100)], read_jsonl(tmp_path / "out.jsonl"),
                     read_jsonl(tmp_path / "err.jsonl"))
    assert fake.stats()["requests"] == 100
    assert len(batch_dirs(cli.home)) == 1  # the losers registered nothing


def test_overwrite_takes_the_files_of_a_stopped_batch_which_then_cannot_resume(
        tmp_path: Path, make_fake, cli: Cli) -> None:
    fake = make_fake(fail_402_after=5)
    chat_file(tmp_path / "a.jsonl", 30, prefix="a")
    expected_b = chat_file(tmp_path / "b.jsonl", 30, prefix="b")
    pa = cli.run("submit", "a.jsonl", "-q", "-c", "1", "-o", "out.jsonl", "-e", "err.jsonl")
    assert pa.returncode == 5, pa.stderr  # credits exhausted: stopped, resumable, owns the files
    a = last_json(pa.stdout)["id"]
    fake.provider.config.fail_402_after = None
    pb = cli.run("submit", "b.jsonl", "-q", "-o", "out.jsonl", "-e", "err.jsonl")
    assert pb.returncode == 2 and a in pb.stderr and "has not finished" in pb.stderr, pb.stderr
    pb = cli.run("submit", "b.jsonl", "-q", "-o", "out.jsonl", "-e", "err.jsonl", "--overwrite")
    assert pb.returncode == 0, pb.stderr
    b = last_json(pb.stdout)["id"]
    assert_each_once(expected_b, read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "err.jsonl"))
    pr = cli.run("resume", a, "-q")  # A ended when its files were taken: replayed, nothing written
    assert pr.returncode == 6, pr.stderr
    old = check_batch(last_json(pr.stdout))
    assert old["status"] == "cancelled" and old["hfbatch"]["stop_reason"] == "overwritten", old
    pr = cli.run("submit", "a.jsonl", "-q", "-o", "out.jsonl", "-e", "err.jsonl", "--retry-failed")
    assert pr.returncode == 6 and b not in pr.stdout, pr.stderr
    assert_each_once(expected_b, read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "err.jsonl"))


def test_foreign_output_message_says_since_changed_only_when_the_input_changed(
        tmp_path: Path, make_fake, cli: Cli) -> None:
    make_fake()
    chat_file(tmp_path / "in.jsonl", 3)
    assert cli.run("submit", "in.jsonl", "-q", "-o", "out.jsonl", "-e", "err1.jsonl").returncode == 0
    same = cli.run("submit", "in.jsonl", "-q", "-o", "out.jsonl", "-e", "err2.jsonl")
    assert same.returncode == 2 and "already holds lines from batch" in same.stderr, same.stderr
    assert "since changed" not in same.stderr, same.stderr
    chat_file(tmp_path / "in.jsonl", 4)
    changed = cli.run("submit", "in.jsonl", "-q", "-o", "out.jsonl", "-e", "err2.jsonl")
    assert changed.returncode == 2 and "since changed" in changed.stderr, changed.stderr


def test_simultaneous_submits_to_one_file_through_a_symlink_one_wins(tmp_path: Path, make_fake, cli: Cli) -> None:
    """The claim is on the file, not on how it is spelled: `-o out.jsonl` and `-o link.jsonl` (a symlink to
    it) started at the same moment both exited 0 and mixed their lines in one file."""
    from conftest import wait_until_blocked_on_stdin

    fake = make_fake(latency=0.05)
    (tmp_path / "link.jsonl").symlink_to("out.jsonl")
    inputs = []
    for r in range(2):
        lines = [json.dumps({"custom_id": f"b{r}-{i:03d}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "test-org/tiny-chat", "messages": [
                                 {"role": "user", "content": f"[[id:b{r}-{i:03d}]] {i}"}]}}) for i in range(40)]
        inputs.append(("\n".join(lines) + "\n").encode())
    procs = [cli.start("submit", "-", "-q", "-c", "8", "-o", out, "-e", f"err{r}.jsonl", stdin_pipe=True)
             for r, out in enumerate(("out.jsonl", "link.jsonl"))]
    wait_until_blocked_on_stdin(procs)
    for proc, data in zip(procs, inputs, strict=True):
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.close()
    results = [cli.finish(proc, timeout=60) for proc in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(c, e[-300:]) for c, _, e in results]
    win = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    owner = last_json(results[win][1])["id"]
    assert owner in results[1 - win][2], results[1 - win][2]
    assert_each_once([f"b{win}-{i:03d}" for i in range(40)], read_jsonl(tmp_path / "out.jsonl"),
                     read_jsonl(tmp_path / f"err{win}.jsonl"))
    assert fake.stats()["requests"] == 40


def test_summary_never_replaces_an_output_file_or_the_input(tmp_path: Path, make_fake, cli: Cli) -> None:
    """--summary FILE is replaced at the end of a run: pointed at the batch's own -o, at its input, or at
    another batch's output file, it destroyed those lines (exit 0 both, answers gone)."""
    fake = make_fake()
    chat_file(tmp_path / "a.jsonl", 20, prefix="a")
    expected_b = chat_file(tmp_path / "b.jsonl", 20, prefix="b")
    assert cli.run("submit", "a.jsonl", "-q", "-o", "a.out", "-e", "a.err").returncode == 0
    a_out = (tmp_path / "a.out").read_bytes()
    a_in = (tmp_path / "a.jsonl").read_bytes()
    fake.reset_stats()
    for target in ("b.out", "b.err", "b.jsonl", "a.out", "a.err"):
        p = cli.run("submit", "b.jsonl", "-q", "-o", "b.out", "-e", "b.err", "--summary", target)
        assert p.returncode == 2 and target in p.stderr and "--summary" in p.stderr, (target, p.returncode, p.stderr)
    assert fake.stats()["requests"] == 0
    assert (tmp_path / "a.out").read_bytes() == a_out and (tmp_path / "a.jsonl").read_bytes() == a_in
    assert (tmp_path / "b.jsonl").exists()
    p = cli.run("submit", "b.jsonl", "-q", "-o", "b.out", "-e", "b.err", "--summary", "b.summary.json")
    assert p.returncode == 0, p.stderr
    assert_each_once(expected_b, read_jsonl(tmp_path / "b.out"), read_jsonl(tmp_path / "b.err"))
    assert json.loads((tmp_path / "b.summary.json").read_text())["status"] == "completed"


def test_full_disk_under_stdout_counts_what_is_there_and_promises_no_resume(
        tmp_path: Path, small_disk: Path, make_fake, cli: Cli) -> None:
    """-o - with stdout redirected to a file on a full disk: the summary claimed more answers than the file
    held (154 for 142 lines and a torn one), and the message promised that a rerun sends only what is missing
    although output on stdout keeps no ledger (the rerun, or `hfbatch resume`, sent all 3,000 again)."""
    import sys

    fake = make_fake()
    chat_file(tmp_path / "in.jsonl", 3000)
    with open(small_disk / "stdout.jsonl", "wb") as out:
        p = subprocess.run([sys.executable, "-m", "hfbatch", "submit", "in.jsonl", "-q", "-o", "-", "-e", "err.jsonl"],
                           cwd=tmp_path, env=cli._env(), stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.PIPE, timeout=60)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 5, err
    batch = check_batch(json.loads(next(ln for ln in err.splitlines() if ln.startswith("{"))))
    on_disk = (small_disk / "stdout.jsonl").read_bytes().count(b"\n")
    assert batch["request_counts"]["completed"] == on_disk, (batch["request_counts"], on_disk)
    assert batch["hfbatch"]["stop_reason"] == "write_error"
    message = [ln for ln in err.splitlines() if ln.startswith("hfbatch:")]
    assert len(message) == 1 and "stdout" in message[0] and "No space left on device" in message[0], err
    assert "send only those" not in message[0] and "cannot be resumed" in message[0], message[0]
    assert fake.stats()["requests"] <= on_disk + 32 + 1  # dispatching stopped at the failure
    assert os.path.getsize(small_disk / "stdout.jsonl") > 0


def test_summary_on_a_full_disk_is_a_write_error_naming_it(
        tmp_path: Path, small_disk: Path, make_fake, cli: Cli) -> None:
    """--summary on a full disk: exit 2 (a usage error), "No space left on device" without the file's name,
    a `.tmp` left behind and the Batch object never printed. Now: exit 5 naming the file, the Batch object on
    stdout, nothing left behind; the rerun (a replay) writes it and sends nothing."""
    fake = make_fake()
    chat_file(tmp_path / "in.jsonl", 20)
    fill_up(small_disk)
    args = ("submit", "in.jsonl", "-q", "-o", "out.jsonl", "-e", "err.jsonl", "--summary", "disk/summary.json")
    p = cli.run(*args)
    assert p.returncode == 5, (p.returncode, p.stderr)
    assert "disk/summary.json" in p.stderr and "No space left on device" in p.stderr, p.stderr
    check_completed(check_batch(last_json(p.stdout)))
    assert sorted(x.name for x in small_disk.iterdir()) == ["filler"]
    (small_disk / "filler").unlink()
    fake.reset_stats()
    p = cli.run(*args)
    assert p.returncode == 0, p.stderr
    assert fake.stats()["requests"] == 0
    assert json.loads((small_disk / "summary.json").read_text())["status"] == "completed"


def test_a_registry_on_a_full_disk_is_a_write_error_naming_the_file(
        tmp_path: Path, small_disk: Path, make_fake, cli: Cli) -> None:
    """HFBATCH_HOME on a full disk: exit 2 (a usage error) with 'No space left on device' and no file named,
    a temp file left behind. A file that cannot be written is exit 5, named; nothing was sent, and the
    rerun with space runs the batch."""
    import sys

    fake = make_fake()
    expected = chat_file(tmp_path / "in.jsonl", 20)
    fill_up(small_disk)
    env = dict(cli._env(), HFBATCH_HOME=str(small_disk / "home"))
    argv = [sys.executable, "-m", "hfbatch", "submit", "in.jsonl", "-q", "-o", "out.jsonl", "-e", "err.jsonl"]
    p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=30)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 5, (p.returncode, err)
    assert str(small_disk / "home") in err and "No space left on device" in err, err
    assert fake.stats()["requests"] == 0
    assert not [f for f in small_disk.rglob("*.tmp")], list(small_disk.rglob("*"))
    (small_disk / "filler").unlink()
    p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert_each_once(expected, read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "err.jsonl"))


@pytest.mark.parametrize("output, errors", [("in-link.jsonl", "err.jsonl"), ("out.jsonl", "out-link.jsonl")])
def test_an_output_file_that_is_the_input_or_the_other_output_through_a_symlink_is_refused(
        tmp_path: Path, make_fake, cli: Cli, output: str, errors: str) -> None:
    """-o or -e naming the input (or each other) through a symlink passed the 'must not be the input file' and
    'must be different files' checks, which compared absolute paths: with --overwrite, the input was
    truncated to nothing and the batch ended `completed`, exit 0, with nothing sent."""
    fake = make_fake()
    chat_file(tmp_path / "in.jsonl", 10)
    (tmp_path / "out.jsonl").write_bytes(b"")
    (tmp_path / "in-link.jsonl").symlink_to("in.jsonl")
    (tmp_path / "out-link.jsonl").symlink_to("out.jsonl")
    before = (tmp_path / "in.jsonl").read_bytes()
    p = cli.run("submit", "in.jsonl", "-q", "-o", output, "-e", errors, "--overwrite")
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert (tmp_path / "in.jsonl").read_bytes() == before
    assert fake.stats()["requests"] == 0 and not batch_dirs(cli.home)


def test_an_input_truncated_under_a_run_is_not_a_completed_batch(tmp_path: Path, make_fake, cli: Cli) -> None:
    """The input is read as requests are dispatched: rewritten in place (`> in.jsonl`) while the batch ran,
    the reader met its end early and the batch ended `completed`, exit 0, with most requests never sent
    (their count missing from both completed and failed); the rerun of the original file is then refused."""
    from conftest import poll

    make_fake(latency=0.05)
    chat_file(tmp_path / "in.jsonl", 400)
    original = (tmp_path / "in.jsonl").read_bytes()
    proc = cli.start("submit", "in.jsonl", "-q", "-c", "2", "-o", "out.jsonl", "-e", "err.jsonl")
    poll(lambda: (tmp_path / "out.jsonl").exists() and (tmp_path / "out.jsonl").stat().st_size > 0,
         "the first answers", proc=proc)
    with open(tmp_path / "in.jsonl", "r+b") as f:  # rewritten in place: the run's open file shrinks
        f.truncate(original.index(b"\n") + 1)
    code, out, err = cli.finish(proc, timeout=60)
    batch = check_batch(last_json(out))
    counts = batch["request_counts"]
    assert counts["completed"] + counts["failed"] < counts["total"] == 400
    assert batch["status"] != "completed" and code != 0, (code, batch["status"], err)
    assert "in.jsonl" in err and "changed" in err, err
    (tmp_path / "in.jsonl").write_bytes(original)  # put back: the rerun finishes the batch
    p = cli.run("submit", "in.jsonl", "-q", "-c", "8", "-o", "out.jsonl", "-e", "err.jsonl", timeout=60)
    assert p.returncode == 0, p.stderr
    check_completed(check_batch(last_json(p.stdout)))
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 400


def test_resume_refuses_a_batch_whose_answers_went_to_stdout(tmp_path: Path, make_fake, cli: Cli) -> None:
    """A batch that wrote to stdout keeps no record of what it delivered: `hfbatch resume` of it sent every request
    again (each paid twice). It is refused, naming why and what to do, and nothing is sent."""
    fake = make_fake(fail_402_after=10, latency=0.02)
    chat_file(tmp_path / "in.jsonl", 60)
    first = cli.run("submit", "in.jsonl", "-q", "-c", "4", "-o", "-", "-e", "err.jsonl")
    assert first.returncode == 5, first.stderr  # out of credits: stopped, unfinished
    batch_id = json.loads(next(ln for ln in first.stderr.splitlines() if ln.startswith("{")))["id"]
    sent = fake.stats()["requests"]
    again = cli.run("resume", batch_id, "-q")
    assert again.returncode == 2, again.stderr
    message = [ln for ln in again.stderr.splitlines() if ln.startswith("hfbatch:")]
    assert len(message) == 1 and "stdout" in message[0] and "-o" in message[0], again.stderr
    assert fake.stats()["requests"] == sent  # nothing sent, nothing paid twice


def test_lines_appended_to_the_input_under_a_run_are_not_part_of_the_batch(tmp_path: Path, make_fake,
                                                                           cli: Cli) -> None:
    """The batch is the file as it was submitted: lines appended while it runs (here copies of its own custom_ids)
    are not sent, and no custom_id gets two lines."""
    from conftest import poll

    fake = make_fake(latency=0.05)
    ids = chat_file(tmp_path / "in.jsonl", 200)
    original = (tmp_path / "in.jsonl").read_bytes()
    proc = cli.start("submit", "in.jsonl", "-q", "-c", "2", "-o", "out.jsonl", "-e", "err.jsonl")
    poll(lambda: (tmp_path / "out.jsonl").exists() and (tmp_path / "out.jsonl").stat().st_size > 0,
         "the first answers", proc=proc)
    with open(tmp_path / "in.jsonl", "ab") as f:  # the same 200 lines again: every custom_id twice
        f.write(original)
    code, out, err = cli.finish(proc, timeout=60)
    assert code == 0, err
    batch = check_batch(last_json(out))
    assert batch["request_counts"] == {"total": 200, "completed": 200, "failed": 0}
    assert_each_once(ids, read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "err.jsonl"))
    assert fake.stats()["requests"] == 200
