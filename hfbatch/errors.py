"""Exit codes and the small exception tree that stops a whole run (request failures are data, not these).

    HfbatchError                 -> ExitCode.INTERNAL unless a subclass says otherwise
    ├── DependencyChanged        -> 1  a private API hfbatch relies on (huggingface_hub's provider helpers) changed
    ├── UsageError               -> 2  bad flag, missing file, missing token, refused output path
    │   └── AuthError            -> 2  401/403 from the provider: token or model access
    ├── InputError               -> 4  the input failed validation (strict mode), nothing sent
    ├── SomeFailed               -> 3  finished, but some requests failed (the summary was printed)
    ├── StoppedEarly             -> 5  credits exhausted (402) or budget reached; resumable
    │   ├── AlreadyRunning       -> 5  another process runs this batch
    │   └── WriteError           -> 5  a file could not be written (full disk, EIO, removed); resumable
    ├── EndedEarly               -> 6  the batch expired or was cancelled
    └── Interrupted              -> the process re-raises SIGINT/SIGTERM after cleanup (130/143)
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented exit codes (README, `hfbatch --help`)."""

    OK = 0  # every request succeeded
    INTERNAL = 1  # unexpected internal error (a bug: please report it)
    USAGE = 2  # bad flag, missing file, missing or rejected token
    SOME_FAILED = 3  # finished, but at least one request failed (see the error file)
    INVALID_INPUT = 4  # the input failed validation; nothing was sent
    STOPPED = 5  # stopped early and resumable (credits exhausted, budget reached)
    EXPIRED_OR_CANCELLED = 6  # the batch ended expired or cancelled
    SIGINT = 130
    SIGTERM = 143


class HfbatchError(Exception):
    """Base of every error that stops a run; its message is one line that says what to do next."""

    exit_code: ExitCode = ExitCode.INTERNAL


class DependencyChanged(HfbatchError):
    """A dependency's private API that hfbatch calls is not what it expects (an internal error, exit 1)."""


class UsageError(HfbatchError):
    exit_code = ExitCode.USAGE


class AuthError(UsageError):
    """The provider refused the token (401) or the model (403)."""


class InputError(HfbatchError):
    exit_code = ExitCode.INVALID_INPUT


class StoppedEarly(HfbatchError):
    exit_code = ExitCode.STOPPED


class SomeFailed(HfbatchError):
    exit_code = ExitCode.SOME_FAILED


class Interrupted(HfbatchError):
    """SIGINT/SIGTERM: the run stopped cleanly; the entry point re-raises `signum` so shells see 130/143."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = ExitCode.SIGINT if signum == 2 else ExitCode.SIGTERM


class AlreadyRunning(StoppedEarly):
    pass


class WriteError(StoppedEarly):
    """An output, error or registry file could not be written: the batch stopped and stays resumable."""


class EndedEarly(HfbatchError):
    exit_code = ExitCode.EXPIRED_OR_CANCELLED


def error_for_code(code: int, message: str) -> HfbatchError | None:
    """The exception that makes a replayed batch exit with its stored `code` (0: none)."""
    kinds: dict[int, type[HfbatchError]] = {
        1: HfbatchError, 2: UsageError, 3: SomeFailed, 4: InputError, 5: StoppedEarly, 6: EndedEarly,
    }
    return None if code == 0 else kinds.get(code, HfbatchError)(message)
