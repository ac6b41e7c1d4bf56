#!/usr/bin/env python3
"""Issue 4's acceptance figure, end to end: a provider that answers 429 above 40 requests in flight
(fake provider, 200 ms latency), 1,000 requests at -c 200. Prints requests sent (<= 1.3x) and the
throughput as a fraction of what the cap allows (40 / 0.2 s = 200 req/s; target >= 0.7).

    .venv/bin/python bench/hidden_cap.py [--base-url]

With --base-url the fake is addressed as "your server": adaptive concurrency then starts at -c
(not 64), so the first wave overshoots the cap once before AIMD brings the limit down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hfbatch.testing.fake_provider import FakeConfig, ThreadedFakeProvider

REFEREE = Path(os.environ.get("HFBATCH_REFEREE", Path(__file__).resolve().parents[2] / "shared" / "referee"))


def main() -> None:
    n, cap, latency = 1000, 40, 0.2
    with tempfile.TemporaryDirectory() as tmp, ThreadedFakeProvider(
        FakeConfig(latency=latency, max_inflight=cap, retry_after="1")
    ) as fake:
        inp = Path(tmp) / "in.jsonl"
        subprocess.run([sys.executable, str(REFEREE / "gen_input.py"), str(n), str(inp)], check=True)
        env = dict(os.environ, HF_TOKEN="hf_bench", HFBATCH_HOME=str(Path(tmp) / "home"),
                   HFBATCH_ROUTER_URL=fake.url)
        own = ["--base-url", fake.url + "/v1"] if "--base-url" in sys.argv[1:] else []
        r = subprocess.run([sys.executable, "-m", "hfbatch", "submit", str(inp), "-c", "200", "-q", *own],
                           env=env, capture_output=True, text=True)
        batch = json.loads(r.stdout)
        st = fake.stats()
        elapsed = batch["hfbatch"]["elapsed_seconds"]
        print(f"exit {r.returncode}: {st['requests']} requests for {n} lines "
              f"({st['requests'] / n:.3f}x, target <= 1.3x), {st['s429']} answered 429; "
              f"{n / elapsed:.1f} req/s = {n / elapsed / (cap / latency):.2f} of the {cap / latency:.0f} req/s "
              f"the cap allows (target >= 0.7); final limit {batch['hfbatch']['concurrency']}")


if __name__ == "__main__":
    main()
