#!/usr/bin/env python3
"""The dataset round trip at scale: `hfbatch prepare` and `hfbatch merge` on a Parquet file of N rows (default
1,000,000), each measured as a child process (wall, CPU, peak RSS from os.wait4), at N and at N/10 to show that
memory does not grow with the dataset.

    .venv/bin/python bench/data_roundtrip.py [--rows 1000000] [--submit]

Between the two, the answers: by default written here as a batch would write them (an output file in shuffled
order, 1% of the requests in the error file, 0.5% with no line at all), so the figures are prepare's and merge's
alone; with --submit, `hfbatch submit` runs the batch against the local fake provider (slow: minutes for 1M).
Checked: the batch file has one line per row, the result has every row in the dataset's order, each answer on
its row, the failed and missing rows with `error` set. Results: a table on stdout, bench/out/data_roundtrip.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import OUT, child_env, hfbatch_exe, machine, run_measured  # noqa: E402

MODEL = "test-org/tiny-chat"
WORDS = ("batch", "dataset", "model", "provider", "token", "answer", "review", "summary", "price", "quality",
         "latency", "merge", "prepare", "parquet", "stream", "memory", "request", "response", "queue", "hub")


def make_dataset(path: Path, rows: int, group: int = 65_536) -> None:
    """id, title, body (about 150 characters), a score; written a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(1)
    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("body", pa.string()), ("score", pa.int64())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            ids = [f"doc-{i:08d}" for i in range(start, start + n)]
            titles = [" ".join(rng.choices(WORDS, k=4)) for _ in range(n)]
            bodies = [" ".join(rng.choices(WORDS, k=22)) for _ in range(n)]
            w.write_table(pa.table({"id": ids, "title": titles, "body": bodies,
                                    "score": list(range(start, start + n))}, schema=schema))


def write_answers(batch: Path, out: Path, err: Path, fail: float = 0.01, missing: float = 0.005) -> tuple[int, int]:
    """Answer lines for the batch file's requests, in shuffled order (as a batch finishes them)."""
    ids = [json.loads(line)["custom_id"] for line in batch.open("rb")]
    rng = random.Random(2)
    rng.shuffle(ids)
    n_fail = n_missing = 0
    with out.open("w") as fo, err.open("w") as fe:
        for i, cid in enumerate(ids):
            r = rng.random()
            if r < missing:
                n_missing += 1
                continue
            if r < missing + fail:
                n_fail += 1
                fe.write(json.dumps({"id": f"batch_req_{i:024x}", "custom_id": cid, "response": {
                    "status_code": 400, "request_id": f"req-{i}", "body": {"error": {
                        "message": "rejected", "type": "invalid_request_error", "param": None, "code": None}}},
                    "error": None}) + "\n")
                continue
            body = {"id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1, "model": MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer to {cid}: "
                                                         + " ".join(WORDS[j % 20] for j in range(i % 7, i % 7 + 12))},
                                 "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 40, "completion_tokens": 14, "total_tokens": 54}}
            fo.write(json.dumps({"id": f"batch_req_{i:024x}", "custom_id": cid, "response": {
                "status_code": 200, "request_id": f"req-{i}", "body": body}, "error": None}) + "\n")
    return n_fail, n_missing


def check_result(result: Path, rows: int, n_fail: int, n_missing: int, submitted: bool) -> None:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(result)
    assert pf.metadata.num_rows == rows, (pf.metadata.num_rows, rows)
    expect, errors = 0, 0
    for b in pf.iter_batches(batch_size=65_536, columns=["id", "score", "response", "error"]):
        ids, scores, resp, err = (b.column(i).to_pylist() for i in range(4))
        for i, s, r, e in zip(ids, scores, resp, err, strict=True):
            assert s == expect and i == f"doc-{expect:08d}", (i, s, expect)  # the dataset's order
            if e is None:  # the fake provider echoes the prompt; the bench's answers name their row
                assert r is not None and r.startswith("echo: Summarize:" if submitted else f"answer to {i}:"), (i, r)
            else:
                errors += 1
            expect += 1
    assert errors == n_fail + n_missing, (errors, n_fail, n_missing)


def helper(*args: Any) -> Any:
    """Run one of this file's helpers in its own process: this process stays small, so that a measured child's
    peak RSS is its own (Linux counts the parent's memory at fork into the child's ru_maxrss)."""
    import subprocess

    p = subprocess.run([sys.executable, __file__, "--helper", json.dumps([str(a) for a in args])], check=True,
                       capture_output=True, text=True)
    return json.loads(p.stdout or "null")


def one(rows: int, folder: Path, submit: bool) -> dict[str, Any]:
    exe, env = hfbatch_exe(), child_env(HFBATCH_HOME=str(folder / "home"), HF_TOKEN="hf_bench")
    data, batch = folder / "data.parquet", folder / "batch.jsonl"
    t0 = time.perf_counter()
    helper("make", data, rows)
    made = time.perf_counter() - t0
    prep = run_measured([*exe, "prepare", str(data), "-m", MODEL, "--template", "Summarize: {title}\\n{body}",
                         "--max-tokens", "64", "--id-column", "id", "-o", str(batch)], env, 3600,
                        stderr=folder / "prepare.err")
    assert prep["rc"] == 0, (folder / "prepare.err").read_text()
    with batch.open("rb") as f:
        assert sum(1 for _ in f) == rows
    out, err = folder / "batch.output.jsonl", folder / "batch.errors.jsonl"
    sub = None
    if submit:
        sub = run_measured([*exe, "submit", str(batch), "-q", "-c", "256"],
                           child_env(HFBATCH_HOME=str(folder / "home"), HF_TOKEN="hf_bench",
                                     HFBATCH_ROUTER_URL=os.environ["HFBATCH_BENCH_ROUTER"]), 7200,
                           stderr=folder / "submit.err")
        assert sub["rc"] in (0, 3), (folder / "submit.err").read_text()
        n_fail = sum(1 for _ in err.open("rb")) if err.exists() else 0
        n_missing = 0
    else:
        n_fail, n_missing = helper("answers", batch, out, err)
    merge = run_measured([*exe, "merge", str(data), str(out), "-o", str(folder / "result.parquet"),
                          "--id-column", "id"], env, 3600, stderr=folder / "merge.err")
    assert merge["rc"] == 0, (folder / "merge.err").read_text()
    helper("check", folder / "result.parquet", rows, n_fail, n_missing, int(submit))
    sizes = {p.name: p.stat().st_size for p in (data, batch, out, err, folder / "result.parquet") if p.exists()}
    return {"rows": rows, "generate_s": made, "prepare": prep, "submit": sub, "merge": merge, "bytes": sizes,
            "failed": n_fail, "missing": n_missing}


def run_helper(args: list[str]) -> None:
    name, rest = args[0], args[1:]
    if name == "make":
        make_dataset(Path(rest[0]), int(rest[1]))
    elif name == "answers":
        print(json.dumps(write_answers(Path(rest[0]), Path(rest[1]), Path(rest[2]))))
    elif name == "check":
        check_result(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), bool(int(rest[4])))


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--helper":
        run_helper(json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--submit", action="store_true", help="run hfbatch submit against the local fake provider")
    ap.add_argument("--keep", action="store_true", help="keep the files (printed)")
    args = ap.parse_args()
    if args.submit:
        import subprocess

        from harness import _free_port  # type: ignore[attr-defined]

        port = _free_port()
        fake = subprocess.Popen([*hfbatch_exe(), "fake-provider", "--port", str(port)], stderr=subprocess.DEVNULL)
        os.environ["HFBATCH_BENCH_ROUTER"] = f"http://127.0.0.1:{port}"
        time.sleep(1.5)
    results = []
    try:
        for rows in (max(1, args.rows // 10), args.rows):
            folder = Path(tempfile.mkdtemp(prefix=f"hfbatch-data-{rows}-"))
            try:
                results.append(one(rows, folder, args.submit))
            finally:
                if args.keep:
                    print(f"kept {folder}", file=sys.stderr)
                else:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.submit:
            fake.terminate()
            fake.wait(10)
    OUT.mkdir(exist_ok=True)
    (OUT / "data_roundtrip.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    print(f"{'rows':>10}  {'step':8} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>12} {'others CPU %':>13}")
    for r in results:
        for step in ("prepare", "submit", "merge"):
            m = r[step]
            if m is None:
                continue
            print(f"{r['rows']:>10,}  {step:8} {m['wall_s']:>8.2f} {m['cpu_s']:>8.2f} {m['maxrss_kb'] / 1024:>12.1f} "
                  f"{100 * m['foreign_share']:>12.0f}%")
    sizes = results[-1]["bytes"]
    print("files (last run): " + ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
