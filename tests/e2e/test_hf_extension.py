"""`hf batch ...`: the `hf-batch` console script is the hfbatch app, and huggingface_hub's own dispatcher runs it
when it is installed the way `hf extensions install OWNER/hf-batch` lays a Python extension out
(huggingface_hub/cli/extensions.py: ~/.local/share/hf/extensions/hf-<name>/{venv/bin/hf-<name>, manifest.json})."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import cli_env

from hfbatch import __version__

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_hf_batch_is_the_hfbatch_app(tmp_path: Path) -> None:
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "hf-batch"]
    assert script.value == "hfbatch.__main__:run"
    p = subprocess.run([BIN / "hf-batch", "--help"], env=cli_env(tmp_path, None), capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Usage: hf batch [OPTIONS] COMMAND")  # the command people typed
    for command in ("submit", "prepare", "merge", "status"):
        assert f"\n  {command} " in p.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from hfbatch.__main__ import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"hfbatch {__version__}\n"


def test_hf_runs_the_installed_extension(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ext = home / ".local" / "share" / "hf" / "extensions" / "hf-batch"
    exe = ext / "venv" / "bin" / "hf-batch"
    exe.parent.mkdir(parents=True)
    # What pip writes into the extension's venv: the console script (here pointing at this venv's python, which
    # has hfbatch installed, instead of a fresh venv's).
    shutil.copy2(BIN / "hf-batch", exe)
    description = json.loads((ROOT / "manifest.json").read_text())["description"]
    # The fields hf's ExtensionManifest saves after an install (the description read from our manifest.json).
    (ext / "manifest.json").write_text(json.dumps({
        "owner": "someone", "repo": "hf-batch", "repo_id": "someone/hf-batch", "short_name": "batch",
        "executable_path": str(exe), "type": "python", "installed_at": datetime.now(UTC).isoformat(),
        "description": description, "commit_sha": "0" * 40}))
    env = cli_env(tmp_path, None, {"HOME": str(home), "HF_HUB_DISABLE_UPDATE_CHECK": "1"})
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"

    def hf(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([BIN / "hf", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)

    listed = hf("--help")
    assert listed.returncode == 0, listed.stderr
    section = listed.stdout.split("Extension commands", 1)[1]
    assert "batch" in section and description[:40] in " ".join(section.split())

    helped = hf("batch", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("Usage: hf batch [OPTIONS] COMMAND") and "\n  prepare " in helped.stdout

    failed = hf("batch", "submit", "no-such-file.jsonl")  # the exit code comes back through hf
    assert failed.returncode == 2 and "input file not found: no-such-file.jsonl" in failed.stderr
