#!/usr/bin/env python3
"""Start-up cost by package: `python -X importtime` of an hfbatch command, self time summed per top-level package.

    .venv/bin/python bench/importtime.py                 # hfbatch --help, median of 5
    .venv/bin/python bench/importtime.py submit1         # a 1-line submit against the mock

-X importtime inflates absolute times (it is itself overhead); read the shares. The module list
also tells which imports a command could avoid (e.g. pydantic, pulled in by typer's parameter
coercion, or aiohttp for a command that sends nothing).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import OUT, Mock, child_env, gen_input, referee_dir, venv_python  # noqa: E402

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def measure(argv_env: Callable[[int], tuple[list[str], dict[str, str]]], k: int = 5) -> dict[str, float]:
    """Median over k runs of the import self time (ms) per top-level package, and the total."""
    per_pkg: dict[str, list[float]] = defaultdict(list)
    for i in range(k):
        args, env = argv_env(i)
        p = subprocess.run([venv_python(), "-X", "importtime", "-m", "hfbatch", *args], env=env,
                           capture_output=True, text=True)
        acc: dict[str, float] = defaultdict(float)
        for m in LINE.finditer(p.stderr):
            acc[m[4].split(".")[0]] += int(m[1]) / 1000
        acc["(total)"] = sum(acc.values())
        for key, v in acc.items():
            per_pkg[key].append(v)
    return {key: statistics.median(v + [0.0] * (k - len(v))) for key, v in per_pkg.items()}


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else "help"
    with tempfile.TemporaryDirectory(dir=OUT) as d:
        if what == "help":
            res = measure(lambda i: (["--help"], child_env(HFBATCH_HOME=d)))
        else:
            referee = referee_dir()
            inp = gen_input(referee, 1)
            with Mock(referee, 0) as mock:
                def submit(i: int) -> tuple[list[str], dict[str, str]]:
                    home = Path(d) / f"h{i}"
                    home.mkdir()
                    return (["submit", str(inp), "-o", str(home / "o.jsonl"), "-e", str(home / "e.jsonl"),
                             "--base-url", mock.base + "/v1", "-q"],
                            child_env(HF_TOKEN="hf_bench", HFBATCH_HOME=str(home)))
                res = measure(submit)
    total = res.pop("(total)")
    print(f"hfbatch {what}: import self time {total:.0f} ms (median of 5, under -X importtime)")
    for key, v in sorted(res.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {v:7.1f} ms  {100 * v / total:5.1f}%  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
