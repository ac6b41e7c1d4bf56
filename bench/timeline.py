#!/usr/bin/env python3
"""Where scenario (a)'s wall time goes: one hfbatch run against the referee's mock, with the moments
of the input scan, the first POST, the first full wave, and the last answer, from process start.

    .venv/bin/python bench/timeline.py [--n 20000] [--conc 512] [--latency 200] [--runs 3]

It runs `python bench/timeline.py --child ...` (the CLI in-process, http1.Pool.request and
plan.scan_input wrapped to record times), so the figures include interpreter start and imports the
way the benchmark's wall time does. The ideal is N x latency / concurrency; any client also pays the
last partial wave (ceil(N / c) waves of `latency`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(args: list[str]) -> None:
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks.setdefault(name, time.perf_counter() - T0)

    import hfbatch.batches.run as run
    import hfbatch.http.lean as http1

    scan = run.scan_input

    def timed_scan(*a: Any, **k: Any) -> Any:
        mark("scan_start")
        try:
            return scan(*a, **k)
        finally:
            mark("scan_end")

    run.scan_input = timed_scan  # type: ignore[assignment]
    request = http1.Pool.request
    counts = {"posts": 0, "answers": 0}
    conc = int(args[args.index("-c") + 1])
    total = int(os.environ["TIMELINE_N"])

    async def timed_request(self: Any, method: str, url: str, body: bytes = b"") -> Any:
        if method == "POST":
            counts["posts"] += 1
            if counts["posts"] == 1:
                mark("first_post")
            if counts["posts"] == conc:
                mark("wave_full")
        r = await request(self, method, url, body)
        if method == "POST":
            counts["answers"] += 1
            if counts["answers"] == total:
                mark("last_answer")
        return r

    http1.Pool.request = timed_request  # type: ignore[method-assign]
    sys.argv = ["hfbatch", *args]
    from hfbatch.__main__ import run as cli

    try:
        cli()
    except SystemExit:
        pass
    mark("exit")
    print("TIMELINE " + json.dumps(marks), file=sys.stderr)


def main() -> None:
    from harness import Mock, child_env, gen_input, referee_dir, venv_python

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--conc", type=int, default=512)
    ap.add_argument("--latency", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    o = ap.parse_args()
    ref = referee_dir()
    inp = gen_input(ref, o.n)
    ideal = o.n * o.latency / 1000 / o.conc
    waves = math.ceil(o.n / o.conc) * o.latency / 1000
    rows = []
    with Mock(ref, o.latency) as mock:
        for _ in range(o.runs + 1):  # the first run only warms the byte-code cache and the mock
            mock.reset()
            with tempfile.TemporaryDirectory() as tmp:
                env = child_env(HF_TOKEN="hf_bench", HFBATCH_HOME=str(Path(tmp) / "home"), TIMELINE_N=str(o.n))
                cmd = [venv_python(), __file__, "--child", "submit", str(inp), "-o", f"{tmp}/o", "-e", f"{tmp}/e",
                       "--base-url", mock.base + "/v1", "-c", str(o.conc), "-q"]
                t0 = time.perf_counter()
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                line = next(x for x in p.stderr.splitlines() if x.startswith("TIMELINE "))
                rows.append({"wall": wall, **json.loads(line[9:])})
    rows = rows[1:]
    print(f"n={o.n} c={o.conc} latency={o.latency} ms: ideal {ideal:.2f} s, whole waves {waves:.2f} s")
    print(f"{'wall':>6} {'scan':>11} {'1st POST':>8} {'wave full':>9} {'last ans':>8} {'exit':>6} {'eff':>5}")
    for r in rows:
        print(f"{r['wall']:6.2f} {r.get('scan_start', 0):5.2f}-{r.get('scan_end', 0):4.2f} {r['first_post']:8.2f} "
              f"{r.get('wave_full', 0):9.2f} {r['last_answer']:8.2f} {r['exit']:6.2f} {ideal / r['wall']:5.2f}")
    steady = [(r["last_answer"] - r["first_post"]) for r in rows]
    mid = sorted(steady)[len(steady) // 2]
    print(f"first POST -> last answer, median: {mid:.2f} s (whole waves alone: {waves:.2f} s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
