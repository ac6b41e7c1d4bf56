"""The real CLI on a pseudo-terminal 80 columns wide: submit shows its progress line, the batch's figures and one
line naming its files, not the Batch object; status shows a short view; --json (and every pipe, as the rest of the
suite checks) still gets the JSON."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from conftest import TOKEN, chat_file, chat_line, cli_env, write_jsonl

from hfbatch.testing.fake_provider import ThreadedFakeProvider

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def on_terminal(tmp_path: Path, fake: ThreadedFakeProvider | None, *args: str, columns: int = 80,
                env_extra: dict[str, str | None] | None = None) -> tuple[int, str]:
    """Run `hfbatch ARGS` with stdout and stderr on one pseudo-terminal; (exit code, what it showed)."""
    env = cli_env(tmp_path, fake, {"COLUMNS": str(columns), "LINES": "40", "TERM": "xterm-256color",
                                   **(env_extra or {})})
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "hfbatch", *args], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                         stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    os.close(master)
    code = p.wait(10)
    text = ANSI.sub("", out.decode("utf-8", "replace")).replace("\r\n", "\n")
    assert "Traceback" not in text and TOKEN not in text
    return code, text


def test_submit_and_status_on_an_80_column_terminal(tmp_path: Path, fake: ThreadedFakeProvider) -> None:
    chat_file(tmp_path / "in.jsonl", 40)
    code, shown = on_terminal(tmp_path, fake, "submit", "in.jsonl", "-c", "4")
    assert code == 0, shown
    assert '"object"' not in shown  # no Batch object on a terminal
    final = shown.rsplit("\r", 1)[-1]
    batch_id = re.search(r"batch_[0-9a-f]{24}", final)
    assert batch_id, shown
    assert "40/40" in shown and "eta" in shown  # the progress line, done/total whole
    assert "40/40 done · 40 ok · 0 failed" in final and "output in.output.jsonl" in final
    for line in final.splitlines():
        assert len(line) <= 80, line

    code, status = on_terminal(tmp_path, fake, "status", batch_id.group(0))
    assert code == 0 and batch_id.group(0) in status and "40/40 done" in status and '"object"' not in status
    code, raw = on_terminal(tmp_path, fake, "status", batch_id.group(0), "--json")
    assert code == 0 and json.loads(raw.strip().splitlines()[-1])["id"] == batch_id.group(0)


def test_a_gpu_run_on_an_80_column_terminal(tmp_path: Path) -> None:
    """--engine vllm (the stand-in vllm): the progress line, then the batch's figures with one row per run (part,
    model, stage, answered, flavor, process id), no HTTP or latency figures, and the cost it cannot know."""
    from hfbatch.testing.vllm import install

    vllm = install(tmp_path / "bin")
    write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", f"q{i}", model="org-a/chat-one" if i % 2 else
                                                  "org-b/chat-two") for i in range(12)])
    code, shown = on_terminal(tmp_path, None, "submit", "in.jsonl", "--engine", "vllm",
                              env_extra={"HFBATCH_VLLM": str(vllm), "FAKE_VLLM_DELAY": "0.02"})
    assert code == 0, shown
    assert '"object"' not in shown
    final = shown.rsplit("\r", 1)[-1]
    assert "12/12" in shown and "eta" in shown  # the progress line
    assert "12/12 done · 12 ok · 0 failed" in final, shown
    for part in ("p0001", "p0002"):
        assert part in final, final
    assert "org-a/chat-one" in final and "org-b/chat-two" in final and "COMPLETED" in final and "6/6" in final
    assert "local" in final and "pid " in final
    assert "unknown (pass --gpu-price USD_PER_HOUR)" in final
    assert "p50" not in final and "retries" not in final and "in flight" not in shown
    for line in final.splitlines():
        assert len(line) <= 80, line


def test_shell_completion_completes_commands(tmp_path: Path) -> None:
    """What the script `hfbatch --install-completion` installs runs: bash asks, hfbatch answers."""
    env = cli_env(tmp_path, None, {"COMP_WORDS": "hfbatch pre", "COMP_CWORD": "1",
                                   "_HFBATCH_COMPLETE": "complete_bash"})
    p = subprocess.run([sys.executable, "-m", "hfbatch"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.split() == ["prepare"], (p.stdout, p.stderr)
