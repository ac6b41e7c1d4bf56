#!/usr/bin/env python3
"""Adaptive concurrency against hidden limits, end to end: the real CLI against the referee's mock provider
(node, on loopback), which answers 429 at arrival above a hidden limit. Each case reports the share of the
ideal (the time the limit allows) or, for 429s that do not track our load, the time against --no-adapt in
the same run; and the extra requests (429s and retries) as a share of the lines.

    .venv/bin/python bench/hidden_cap.py [--runs 3] [case ...]

Cases (the issue's): a cap of 40 in flight (your server, and the router's slow start); a cap that moves
(40, 80 after 4 s, 20 after 8 s); 300 requests per second; 15 % load-blind 429s; the README's fault mix.
bench/adaptive.py runs the same cases in memory on the virtual clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Mock, child_env, gen_input, hfbatch_exe, machine, referee_dir, run_measured  # noqa: E402


@dataclass
class Case:
    name: str
    n: int
    concurrency: int
    latency_ms: int
    mock_env: dict[str, str]
    ideal: float | None  # seconds the limit allows; None: compared with --no-adapt
    own_server: bool = True  # --base-url (adaptive starts at -c) rather than the router (starts at 64)
    args: list[str] = field(default_factory=list)


FAULTS = {"FAIL_429": "0.15", "FAIL_500": "0.03", "HANG": "0.01", "RESET": "0.02", "GARBAGE": "0.02"}
CASES = [
    Case("cap40", 4000, 200, 100, {"MAX_INFLIGHT": "40"}, 10.0),
    Case("cap40-router", 4000, 200, 100, {"MAX_INFLIGHT": "40"}, 10.0, own_server=False),
    Case("moving", 6000, 200, 100, {"CAP_SCHEDULE": "0:40,4:80,8:20"}, 14.0),
    Case("rps300", 4000, 200, 100, {"MAX_RPS": "300"}, 4000 / 300),
    Case("blind429", 4000, 128, 20, {"FAIL_429": "0.15"}, None),
    Case("faultmix", 4000, 128, 20, FAULTS, None, args=["--timeout", "5"]),
]


def run_once(case: Case, mock: Mock, inp: Path, adapt: bool) -> dict[str, Any]:
    mock.reset()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        target = ["--base-url", mock.base + "/v1"] if case.own_server else []
        cmd = [*hfbatch_exe(), "submit", str(inp), "-q", "-c", str(case.concurrency), "-o", str(out / "o.jsonl"),
               "-e", str(out / "e.jsonl"), *target, *case.args, *([] if adapt else ["--no-adapt"])]
        env = child_env(HF_TOKEN="hf_bench", HFBATCH_HOME=str(out / "home"), HFBATCH_ROUTER_URL=mock.base)
        r = run_measured(cmd, env, timeout=600, stdout=out / "batch.json")
        batch = json.loads((out / "batch.json").read_bytes() or b"{}")
    st = mock.stats()
    hb = batch.get("hfbatch", {})
    return {"elapsed": hb.get("elapsed_seconds", r["wall_s"]), "requests": st["requests"], "s429": st["s429"],
            "dup_ok": st["dup_ok"], "ok": st["ok"], "concurrency": hb.get("concurrency"), "rc": r["rc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", help="cases to run (default: all)")
    ap.add_argument("--runs", type=int, default=1, help="runs per case; medians reported")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw runs here")
    a = ap.parse_args()
    chosen = [c for c in CASES if not a.cases or c.name in a.cases]
    referee = referee_dir()
    print(f"machine: {machine()}", flush=True)
    raw: dict[str, Any] = {}
    for case in chosen:
        inp = gen_input(referee, case.n)
        with Mock(referee, case.latency_ms, env=case.mock_env) as mock:
            runs, fixed = [], []
            for _ in range(a.runs):
                runs.append(run_once(case, mock, inp, adapt=True))
                if case.ideal is None:
                    fixed.append(run_once(case, mock, inp, adapt=False))
        elapsed = statistics.median(r["elapsed"] for r in runs)
        extra = statistics.median(r["requests"] / case.n - 1 for r in runs)
        row: dict[str, Any] = {"case": case.name, "elapsed_s": round(elapsed, 2), "extra": round(extra, 3),
                               "dup_ok": max(r["dup_ok"] for r in runs), "concurrency": runs[-1]["concurrency"]}
        if case.ideal is not None:
            row["share_of_ideal"] = round(case.ideal / elapsed, 3)
        else:
            base = statistics.median(r["elapsed"] for r in fixed)
            row["no_adapt_s"] = round(base, 2)
            row["vs_no_adapt"] = round(elapsed / base, 2)
        raw[case.name] = {"adapt": runs, "no_adapt": fixed}
        print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
