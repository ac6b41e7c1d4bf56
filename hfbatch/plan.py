"""Plan stage: the input file -> counts, strict-mode errors, duplicate-request groups (one streaming pass)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .fingerprints import ExactIds, FingerprintIds, RepeatFinder, canonical_request, request_fingerprint
from .models import LineError
from .reader import iter_lines
from .summary import MAX_REPORTED_ERRORS
from .validate import EngineRule, validate_line


@dataclass
class InputPlan:
    total: int = 0  # non-blank lines
    errors: list[LineError] = field(default_factory=list)
    errors_dropped: int = 0
    duplicates: dict[int, int] = field(default_factory=dict)  # request fingerprint -> occurrences (>= 2)
    repeated_ids: set[int] = field(default_factory=set)  # custom_id fingerprints seen more than once

    def unique_ids(self) -> ExactIds:
        """The exact custom_id check for another pass over the same file, in this process."""
        return ExactIds(self.repeated_ids)


def scan_input(path: str, *, strict: bool, dedupe: bool, pass_through: bool, endpoint: str | None,
               ids: bool = False, rule: EngineRule | None = None) -> InputPlan:
    """One streaming pass over the input. Strict: collect every invalid line (OpenAI validates the
    whole file before running anything). Dedupe: find requests (endpoint + body) that occur more
    than once. `ids` (implied by strict): find the custom_ids used more than once, for the run's own
    check (--skip-invalid).

    Memory does not grow with the file: fingerprints go through an external sort (fingerprints.RepeatFinder). Only
    when some custom_id fingerprint repeats (a duplicate, or a 1-in-10^8 collision) does strict mode
    read the file a second time to name the duplicate lines exactly."""
    plan = InputPlan()
    seen = FingerprintIds() if (strict or ids) else None
    keys = RepeatFinder() if dedupe else None
    parse = strict or dedupe or ids
    errors = _Errors(plan) if strict else None
    with open(path, "rb") as f:
        for line_no, raw in iter_lines(f):
            plan.total += 1
            if not parse:
                continue
            r = validate_line(line_no, raw, seen, pass_through=pass_through, endpoint=endpoint, rule=rule)
            if isinstance(r, LineError):
                if errors is not None:
                    errors.add(r)
                continue
            if keys is not None:
                keys.add(request_fingerprint(canonical_request(r.url, r.body)))
    if seen is not None:
        plan.repeated_ids = seen.repeats()
    if keys is not None:
        plan.duplicates = keys.repeats()
    if errors is not None and plan.repeated_ids:
        # Name the duplicates exactly: a second pass that checks ids in file order (an invalid line
        # still claims its id, and a line's duplicate id is its error, as in OpenAI).
        plan.errors, plan.errors_dropped = [], 0
        errors = _Errors(plan)
        exact = plan.unique_ids()
        with open(path, "rb") as f:
            for line_no, raw in iter_lines(f):
                r = validate_line(line_no, raw, exact, pass_through=pass_through, endpoint=endpoint, rule=rule)
                if isinstance(r, LineError):
                    errors.add(r)
    if plan.total == 0:
        plan.errors.append(LineError(0, None, "empty_file", "The input file is empty. Please ensure "
                                     "that the batch contains at least one request."))
    return plan


class _Errors:
    """Strict mode's error list: the first MAX_REPORTED_ERRORS, then a count."""

    def __init__(self, plan: InputPlan) -> None:
        self.plan = plan

    def add(self, e: LineError) -> None:
        if len(self.plan.errors) < MAX_REPORTED_ERRORS:
            self.plan.errors.append(e)
        else:
            self.plan.errors_dropped += 1
