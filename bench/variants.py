#!/usr/bin/env python3
"""A/B of single client-side choices, to put a number on each change the profile suggests.

    .venv/bin/python bench/variants.py                       # 20,000 requests, 0 ms, c=64, 3 runs
    .venv/bin/python bench/variants.py --variants lean,trust_env --runs 5

A lean aiohttp + orjson client (the same shape as the referee's naive_aiohttp.py, writing
OpenAI-format output lines) is run with one of hfbatch's choices switched on at a time, and with
all of them ("hfbatch_like"); hfbatch itself runs in the same rounds. The difference between
hfbatch_like and hfbatch is what hfbatch's own machinery costs (validation, gates, stats, ledger,
ticker...). CPU per request is user+sys of the child (os.wait4), medians over --runs; runs are
interleaved so that a busy neighbour hurts every variant alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "lean": "worker pool, stdlib asyncio loop, trust_env=False, no ClientTimeout, counter line ids "
            "(= naive_aiohttp.py writing OpenAI-format lines)",
    "trust_env": "lean + ClientSession(trust_env=True) (hfbatch before 01:24): aiohttp 3.14 then does "
                 "run_in_executor(netrc) + to_thread(env proxy) per request",
    "uvloop": "lean + uvloop event loop (hfbatch now, when uvloop is installed)",
    "timeout": "lean + ClientTimeout(total=300) (hfbatch's --timeout): a timer handle per request",
    "skip_ua": "lean + skip_auto_headers=('user-agent',) on the session and proxy=None per request "
               "(hfbatch's Transport)",
    "urandom_ids": "lean + 'batch_req_' + os.urandom(12).hex() per output line (hfbatch's line ids)",
    "tasks": "lean + a task per request behind a read-ahead Semaphore and a concurrency gate "
             "(hfbatch's Executor.run) instead of a worker pool",
    "validate": "lean + hfbatch-style validation of every line, twice (a pre-pass with sha256 of the "
                "file, then again when each request is read)",
    "hfbatch_like": "all of the above together except trust_env (hfbatch no longer uses it)",
    "raw_http": "lean, but HTTP/1.1 keep-alive by hand on asyncio streams (one connection per worker, "
                "Content-Length bodies only): what is left without aiohttp's ClientSession machinery",
}
HFBATCH_LIKE = {"uvloop", "timeout", "skip_ua", "urandom_ids", "tasks", "validate"}


# ---------------------------------------------------------------------------------------- the child


def child(variant: str, inp: str, out: str, base_url: str, conc: int) -> None:
    import hashlib

    import aiohttp
    import orjson

    opts = {variant} if variant != "hfbatch_like" else HFBATCH_LIKE

    def validate(raw: bytes) -> dict | None:  # the checks hfbatch.validate.validate_line makes
        obj = orjson.loads(raw)
        if not isinstance(obj, dict):
            return None
        cid, url, body = obj.get("custom_id"), obj.get("url"), obj.get("body")
        if not isinstance(cid, str) or not cid or obj.get("method") != "POST" or not isinstance(url, str):
            return None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or body.get("stream") is True:
            return None
        return obj

    if "validate" in opts:
        h = hashlib.sha256()
        with open(inp, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        seen: set[str] = set()
        with open(inp, "rb") as f:
            for raw in f:
                o = validate(raw.rstrip(b"\r\n"))
                if o is not None:
                    seen.add(o["custom_id"])
        seen.clear()

    async def raw_main() -> None:
        """No aiohttp: one keep-alive connection per worker, requests written by hand."""
        from urllib.parse import urlsplit

        u = urlsplit(base_url)
        prefix = u.path.rstrip("/")
        head = (f"Host: {u.netloc}\r\nAuthorization: Bearer hf_bench\r\nContent-Type: application/json\r\n"
                "User-Agent: bench\r\n").encode()
        buf: list[bytes] = []
        counter = 0
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=conc * 2)

        async def worker() -> None:
            nonlocal counter
            reader, writer = await asyncio.open_connection(u.hostname, u.port)
            while (line := await q.get()) is not None:
                r = orjson.loads(line)
                data = orjson.dumps(r["body"])
                path = (prefix + r["url"].removeprefix("/v1")).encode()
                writer.write(b"POST " + path + b" HTTP/1.1\r\n" + head + b"Content-Length: "
                             + str(len(data)).encode() + b"\r\n\r\n" + data)
                hdr = await reader.readuntil(b"\r\n\r\n")
                status_line, _, rest = hdr.partition(b"\r\n")
                headers = {}
                for h in rest.split(b"\r\n"):
                    k, _, v = h.partition(b":")
                    if k:
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers[b"content-length"]))
                orjson.loads(body)
                counter += 1
                rid = headers.get(b"x-request-id", b"").decode()
                buf.append(orjson.dumps({"id": f"batch_req_{counter}", "custom_id": r["custom_id"], "response": {
                    "status_code": int(status_line.split()[1]), "request_id": rid,
                    "body": orjson.Fragment(body)}, "error": None}))
                if len(buf) >= 2048:
                    os.write(fd, b"\n".join(buf) + b"\n")
                    buf.clear()
            writer.close()

        ws = [asyncio.create_task(worker()) for _ in range(conc)]
        with open(inp, "rb") as f:
            for line in f:
                await q.put(line.rstrip(b"\n"))
        for _ in ws:
            await q.put(None)
        await asyncio.gather(*ws)
        if buf:
            os.write(fd, b"\n".join(buf) + b"\n")
        os.close(fd)

    async def main() -> None:
        buf: list[bytes] = []
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        counter = 0

        def flush() -> None:
            if buf:
                os.write(fd, b"\n".join(buf) + b"\n")
                buf.clear()

        timeout = aiohttp.ClientTimeout(total=300) if "timeout" in opts else aiohttp.ClientTimeout(total=None)
        conn = aiohttp.TCPConnector(limit=conc, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300)
        headers = {"authorization": "Bearer hf_bench", "content-type": "application/json", "user-agent": "bench"}
        skip = ("user-agent",) if "skip_ua" in opts else None
        extra = {"proxy": None} if "skip_ua" in opts else {}
        async with aiohttp.ClientSession(connector=conn, headers=headers, timeout=timeout,
                                         trust_env="trust_env" in opts, skip_auto_headers=skip) as s:
            async def one(line: bytes) -> None:
                nonlocal counter
                r = validate(line) if "validate" in opts else orjson.loads(line)
                assert r is not None
                url = base_url + r["url"].removeprefix("/v1")
                async with s.post(url, data=orjson.dumps(r["body"]), **extra) as resp:
                    body = await resp.read()
                    status, rid = resp.status, resp.headers.get("x-request-id")
                orjson.loads(body)
                counter += 1
                line_id = "batch_req_" + (os.urandom(12).hex() if "urandom_ids" in opts else str(counter))
                buf.append(orjson.dumps({"id": line_id, "custom_id": r["custom_id"], "response": {
                    "status_code": status, "request_id": rid, "body": orjson.Fragment(body)}, "error": None}))
                if len(buf) >= 2048:
                    flush()

            async def ticker() -> None:
                while True:
                    await asyncio.sleep(0.1)
                    flush()

            tick = asyncio.create_task(ticker())
            with open(inp, "rb") as f:
                if "tasks" in opts:
                    window = asyncio.Semaphore(max(64, 4 * conc))
                    gate = asyncio.Semaphore(conc)
                    tasks: set[asyncio.Task[None]] = set()

                    async def gated(line: bytes) -> None:
                        async with gate:
                            await one(line)

                    for line in f:
                        await window.acquire()
                        t = asyncio.create_task(gated(line.rstrip(b"\n")))
                        tasks.add(t)
                        t.add_done_callback(lambda t: (tasks.discard(t), window.release()))
                    while tasks:
                        await asyncio.wait(tuple(tasks))
                else:
                    q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=conc * 2)

                    async def worker() -> None:
                        while (line := await q.get()) is not None:
                            await one(line)

                    ws = [asyncio.create_task(worker()) for _ in range(conc)]
                    for line in f:
                        await q.put(line.rstrip(b"\n"))
                    for _ in ws:
                        await q.put(None)
                    await asyncio.gather(*ws)
            tick.cancel()
        flush()
        os.close(fd)

    if "raw_http" in opts:
        asyncio.run(raw_main())
    elif "uvloop" in opts:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        asyncio.run(main())


# --------------------------------------------------------------------------------------- the driver


def driver() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import OUT, Mock, child_env, count_lines, gen_input, referee_dir, run_measured, venv_python
    from run import client_cmd

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--conc", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--latency", type=int, default=0, help="mock latency, ms (200 with --conc 512: scenario (a))")
    ap.add_argument("--variants", default=",".join([*VARIANTS, "hfbatch"]),
                    help="comma-separated; also 'hfbatch' and 'hfbatch_no_uvloop' (HFBATCH_UVLOOP=0)")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    referee = referee_dir()
    inp = gen_input(referee, args.n)
    tmp_root = OUT / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    res: dict[str, list[dict]] = {v: [] for v in names}
    with Mock(referee, args.latency) as mock:
        for i in range(1, args.runs + 1):
            for v in names:
                mock.reset()
                with tempfile.TemporaryDirectory(dir=tmp_root) as d:
                    out = Path(d) / "out.jsonl"
                    if v in ("hfbatch", "hfbatch_no_uvloop"):
                        (Path(d) / "home").mkdir()
                        cmd, env = client_cmd("hfbatch", referee, inp, out, Path(d) / "err.jsonl", mock.base,
                                              args.conc, Path(d) / "home")
                        if v == "hfbatch_no_uvloop":
                            env["HFBATCH_UVLOOP"] = "0"  # hfbatch's switch back to the stdlib loop
                    else:
                        cmd = [venv_python(), __file__, "--child", v, str(inp), str(out), mock.base + "/v1",
                               str(args.conc)]
                        env = child_env()
                    r = run_measured(cmd, env, timeout=600, mock_pid=mock.proc.pid if mock.proc else None)
                    st = mock.stats()
                    r["ok"] = r["rc"] == 0 and count_lines(out) == args.n and st["dup_ok"] == 0 \
                        and st["distinct_ok"] == args.n
                res[v].append(r)
                print(f"  run {i}: {v:<13} cpu {1e6 * r['cpu_s'] / args.n:6.0f} us/req  wall {r['wall_s']:6.2f} s  "
                      f"others {100 * r['foreign_share']:3.0f}% cpu  {'ok' if r['ok'] else 'FAIL'}", flush=True)
    base = statistics.median(r["cpu_s"] for r in res["lean"]) * 1e6 / args.n if res.get("lean") else None
    ideal = args.n * args.latency / 1000 / args.conc
    print(f"\n{args.n:,} requests, {args.latency} ms, concurrency {args.conc}, medians of {args.runs}"
          + (f" (ideal wall {ideal:.2f} s)" if ideal else "") + ":")
    print("| variant | CPU us/req | vs lean | wall s | efficiency | what |\n|---|---|---|---|---|---|")
    for v in names:
        cpu = statistics.median(r["cpu_s"] for r in res[v]) * 1e6 / args.n
        wall = statistics.median(r["wall_s"] for r in res[v])
        delta = f"{cpu - base:+.0f}" if base is not None else ""
        ok = "" if all(r["ok"] for r in res[v]) else " (FAILED runs)"
        eff = f"{ideal / wall:.2f}" if ideal else ""
        what = VARIANTS.get(v, "hfbatch submit itself" + (", HFBATCH_UVLOOP=0" if v.endswith("no_uvloop") else ""))
        print(f"| {v} | {cpu:.0f}{ok} | {delta} | {wall:.2f} | {eff} | {what} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        sys.exit(driver())
