#!/usr/bin/env python3
"""The Ray engine's two central pieces, measured alone (BENCHMARKS.md, "100 million requests"):

  lease   the limits actor's throughput: N worker tasks each syncing with one LimitsBook actor in a loop, as a
          shard worker's Lease does (one call in flight per worker) -> syncs per second, all workers together.
  merge   the driver's merge: shard files of chat answers (~600 bytes a line) -> the batch's output file, each
          custom_id once (engines/ray_merge.Merger, no Ray) -> lines and MB per second.

Usage: .venv/bin/python bench/ray_parts.py [--workers 1,2,4] [--syncs 2000] [--lines 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import orjson


def lease(workers: list[int], syncs: int) -> None:
    import ray

    from hfbatch.engines.ray_limits import LimitsBook, Report

    ray.init(address="local", num_cpus=max(workers) + 1, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        book = ray.remote(num_cpus=0, max_restarts=0)(LimitsBook).remote(512, 6000.0, None, None, 0.0)

        @ray.remote(num_cpus=0.5)
        def worker(shard: str, n: int) -> float:
            async def main() -> float:
                epoch = await book.join.remote(shard)
                held = 0
                t0 = time.perf_counter()
                for i in range(n):
                    reply = await book.sync.remote(Report(shard, epoch, held=held, want=64 + i % 7))
                    held = reply.slots
                return time.perf_counter() - t0

            return asyncio.run(main())

        ray.get([worker.remote("warm", 50)])
        for w in workers:
            t0 = time.perf_counter()
            per = ray.get([worker.remote(f"s{i}", syncs) for i in range(w)])
            wall = time.perf_counter() - t0
            print(f"lease: {w} worker(s) x {syncs} syncs: {w * syncs / wall:8.0f} syncs/s together, "
                  f"{1e3 * sum(per) / (w * syncs):.2f} ms per sync seen by a worker")
    finally:
        ray.shutdown()


def merge(lines: int) -> None:
    from hfbatch.engines.base import Work
    from hfbatch.engines.ray_merge import Merger
    from hfbatch.limits import StopControl
    from hfbatch.summary import Stats
    from hfbatch.writer import Answers, JsonlSink, success_line

    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "org/model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 300}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 80, "total_tokens": 92}}
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        for s in range(4):
            folder = Path(tmp, f"s{s}")
            folder.mkdir()
            with open(folder / "output.jsonl", "wb") as f:
                for i in range(s, lines, 4):
                    f.write(success_line(f"r{i:09d}", 200, f"req-{i}", orjson.Fragment(orjson.dumps(body))) + b"\n")
            shards.append(folder)
        size = sum((p / "output.jsonl").stat().st_size for p in shards)

        async def main() -> float:
            stats = Stats()
            out, err = JsonlSink.open(os.path.join(tmp, "out.jsonl")), JsonlSink.open(os.path.join(tmp, "err.jsonl"))
            work = Work(iter(()), Answers(out, err, stats), stats, StopControl())
            merger = Merger(work)
            t0 = time.perf_counter()
            for p in shards:
                merger.take(p.name, p)
            out.close()
            err.close()
            assert stats.completed == lines, stats.completed
            return time.perf_counter() - t0

        wall = asyncio.run(main())
        print(f"merge: {lines:,} lines ({size / 1e6:.0f} MB) from 4 shards: {lines / wall:8.0f} lines/s, "
              f"{size / 1e6 / wall:.0f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--syncs", type=int, default=2000)
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--only", default="lease,merge")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if "merge" in only:
        merge(args.lines)
    if "lease" in only:
        lease([int(w) for w in args.workers.split(",")], args.syncs)


if __name__ == "__main__":
    main()
