"""Entry point: main(argv) -> exit code; the one place that maps exceptions to exit codes."""

from __future__ import annotations

import os
import signal
import sys
import traceback

from .errors import ExitCode, HfbatchError, Interrupted, UsageError


def main(argv: list[str] | None = None, prog_name: str = "hfbatch") -> int:
    """Run the CLI and return its exit code (never raises for a known error)."""
    from .cli import app

    try:
        if prog_name != "hfbatch" and {"--install-completion", "--show-completion"} & set(
                sys.argv[1:] if argv is None else argv):
            raise UsageError("shell completion is for the hfbatch command: run `hfbatch --install-completion`")
        app(args=argv, prog_name=prog_name, standalone_mode=True)
    except SystemExit as e:  # typer/click: --help, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else ExitCode.USAGE)
    except HfbatchError as e:
        if os.environ.get("HFBATCH_DEBUG"):
            traceback.print_exc()
        print(f"hfbatch: {e}", file=sys.stderr)
        if isinstance(e, Interrupted):
            raise
        return int(e.exit_code)
    except OSError as e:  # a path we cannot read or write: the user's to fix
        if os.environ.get("HFBATCH_DEBUG"):
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"hfbatch: {e.strerror or e}{where}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except Exception:  # noqa: BLE001 - the last resort: one line, unless debugging
        if os.environ.get("HFBATCH_DEBUG"):
            traceback.print_exc()
        else:
            etype, value, _ = sys.exc_info()
            print(f"hfbatch: internal error: {etype.__name__ if etype else 'Error'}: {value} "
                  "(set HFBATCH_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return int(ExitCode.INTERNAL)
    return 0


def run() -> None:
    """Console script: exit with main()'s code; after a clean stop on SIGINT/SIGTERM, die by that
    signal so the shell sees 130/143 and loops stop. Installed as `hfbatch` and as `hf-batch`, the `hf` CLI's
    extension (`hf batch ...` runs it): its help then names the command people typed."""
    prog_name = "hf batch" if os.path.basename(sys.argv[0]) == "hf-batch" else "hfbatch"
    try:
        code = main(prog_name=prog_name)
    except Interrupted as e:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(e.signum, signal.SIG_DFL)
        os.kill(os.getpid(), e.signum)
        code = int(e.exit_code)
    sys.exit(code)


if __name__ == "__main__":
    run()
