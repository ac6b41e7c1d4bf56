"""The Engine seam: how a batch's pending requests get answered. Over HTTP today (engines/http.py); vLLM,
Hugging Face Jobs and Ray are the next engines, each one module here and nowhere else.

The lifecycle (batches.run.BatchRun) owns everything around it: the registry, validation, the resume
ledger, the output/error files, the live Batch object, stop/cancel/expiry and the conclusion. An engine
is given a `Work`: it answers every pending request exactly once (`work.answers.write`), keeps
`work.stats` current (usage, cost, figures), and stops dispatching as soon as `work.stop.reason` is
set (stop.hard: at once; otherwise in-flight work may finish: the lifecycle cancels `run` after the
grace period). Requests it never answers get no line: the rerun sends them.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from ..limits import StopControl
from ..models import Request
from ..summary import Stats
from ..writer import Answers


@dataclass
class Work:
    """What the lifecycle hands an engine."""

    requests: Iterator[Request]  # the pending ones: valid, no line yet, in file order (read lazily)
    answers: Answers  # where each answer goes: exactly one line per request
    stats: Stats  # live counters: progress and the Batch object
    stop: StopControl  # set: dispatch no more (hard: cancel in-flight work too)
    duplicates: dict[int, int] = field(default_factory=dict)  # request fingerprint -> occurrences (dedupe)
    stored: dict[str, Any] | None = None  # the stored Batch object of a resumed batch (its spend so far)
    # The batch's folder in the registry: an engine's own state lives in `engine/` under it (part files,
    # job ids), so that the rerun finds it. None: nowhere to keep state (an engine that needs it refuses).
    batch_dir: Path | None = None
    answered: Container[str] = frozenset()  # custom_ids that had a line when the run started (the ledger)
    # --detach with an engine that runs remotely (hf-jobs): launch the work and return; a background process
    # follows it. Engines that run here ignore it (BatchRun only sets it for those that say `remote = True`).
    detach: bool = False


class Engine(Protocol):
    """One way to run a batch. Entered before the input is scanned (warm-up: connections, prices, a
    job's image), left when the run ends or fails validation."""

    name: str
    # True: the work runs elsewhere (a Hugging Face Job); with --detach, run(work) launches it and returns
    # (work.detach is set) and a background process follows it. False: --detach starts a background process
    # that runs the whole batch here.
    remote: bool

    async def __aenter__(self) -> Engine: ...

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None: ...

    async def run(self, work: Work) -> None:
        """Answer every pending request exactly once, until done or stopped. An exception is a bug: the
        lifecycle ends the run resumable with exit 1."""
        ...

    def live(self) -> dict[str, int]:
        """Live figures for the progress bar: the concurrency limit per provider (or workers...)."""
        ...
