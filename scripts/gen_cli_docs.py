"""Generate docs/cli.md from the CLI's own --help pages (`make docs`); `--check` fails on drift."""

from __future__ import annotations

import sys
from pathlib import Path

from typer.testing import CliRunner

from hfbatch.cli import app

COMMANDS = ["", "submit", "resume", "estimate", "list", "status", "cancel", "wait", "results", "prepare", "merge",
            "cache stats", "cache clear", "serve"]
DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def render() -> str:
    runner = CliRunner()
    parts = ["# hfbatch command reference", "", "Generated from `--help` by `make docs`; do not edit.", ""]
    for cmd in COMMANDS:
        args = cmd.split() + ["--help"]
        result = runner.invoke(app, args, prog_name="hfbatch", terminal_width=100, env={"COLUMNS": "100"})
        if result.exit_code != 0:
            raise SystemExit(f"`hfbatch {' '.join(args)}` failed: {result.output}")
        parts += [f"## hfbatch {cmd}".rstrip(), "", "```", result.output.rstrip(), "```", ""]
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            print("docs/cli.md is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
