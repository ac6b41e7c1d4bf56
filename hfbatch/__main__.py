"""Entry point: main(argv) -> exit code; the one place that maps exceptions to exit codes."""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback

from .errors import ExitCode, HfbatchError, Interrupted, UsageError

# OS errors that say a file could not be written for want of room or a working disk: exit 5 ("a file could
# not be written"), like a failed write during a run (WriteError), not 2.
_WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG})


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
        if e.errno in _WRITE_FAILURES:  # a full disk, a quota, an I/O error: not a usage error
            print(f"hfbatch: cannot write {e.filename or 'a file'}: {e.strerror or e}. Fix that, then rerun the "
                  "same command", file=sys.stderr)
            return int(ExitCode.STOPPED)
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
