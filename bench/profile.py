#!/usr/bin/env python3
"""Where client CPU goes in scenario (b): py-spy profiles of hfbatch (and of the lean aiohttp baseline).

    .venv/bin/python bench/profile.py                 # 20,000 requests, 0 ms, concurrency 64
    .venv/bin/python bench/profile.py --n 5000 --rate 500 --clients hfbatch

For each client: one unprofiled measured run (CPU per request from os.wait4), then one run under
`py-spy record --format raw` (collapsed stacks, bench/out/profile-<client>.txt) which is summarized
here: phases (start-up imports, CLI, input hashing, validation pass, the event loop, ...), self
time by package/module inside the event loop, the hottest source lines, and inclusive time of
hfbatch's per-request functions. Shares are converted to microseconds per request with the
unprofiled run's CPU. hfbatch is also recorded as a flame graph (bench/out/profile.svg) and as a
speedscope profile (bench/out/profile.speedscope.json, open it at https://www.speedscope.app).
Writes bench/out/profile-summary.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import OUT, REPO, Mock, count_lines, gen_input, machine, referee_dir, run_measured, source_fingerprint  # noqa: E402
from run import client_cmd  # noqa: E402

FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Inclusive time of these functions (matched on "function (file" so that line numbers do not matter).
HFBATCH_FUNCS = [
    ("BatchRun._materialize", "hfbatch/batches/run.py", "hash the input (sha256, batch identity)"),
    ("scan_input", "hfbatch/plan.py", "validation pass over the whole file"),
    ("BatchRun._pending", "hfbatch/batches/run.py", "reader generator (read + validate, skip answered)"),
    ("validate_line", "hfbatch/validate.py", "validate_line (orjson.loads of the line + checks)"),
    ("iter_lines", "hfbatch/reader.py", "iter_lines (readline, strip)"),
    ("Executor.run", "hfbatch/executor.py", "dispatch loop (queue puts)"),
    ("Executor._task", "hfbatch/executor.py", "Executor._task (everything per request)"),
    ("Executor._one", "hfbatch/executor.py", "Executor._one"),
    ("Router.route", "hfbatch/routing.py", "Router.route (orjson.dumps of the body, URL)"),
    ("Executor.send", "hfbatch/executor.py", "Executor.send (limits, attempts, retries)"),
    ("HttpTransport.post", "hfbatch/http/transport.py", "HttpTransport.post (the client's request + orjson.loads)"),
    ("Executor.answer_of", "hfbatch/executor.py", "Executor.answer_of (the answer, usage, cost)"),
    ("Answers.write", "hfbatch/writer.py", "Answers.write (line, counts)"),
    ("success_line", "hfbatch/writer.py", "success_line (orjson.dumps of the output line)"),
    ("new_line_id", "hfbatch/writer.py", "new_line_id (os.urandom per line)"),
    ("Stats.add_usage", "hfbatch/summary.py", "Stats.add_usage"),
    ("LatencyHistogram.add", "hfbatch/summary.py", "LatencyHistogram.add"),
    ("JsonlSink.write", "hfbatch/writer.py", "JsonlSink.write"),
    ("JsonlSink.flush", "hfbatch/writer.py", "JsonlSink.flush (join + os.write + fsync)"),
    ("BatchRun._tick", "hfbatch/batches/run.py", "_tick (100 ms flush/progress/cancel check)"),
    ("BatchRun._save", "hfbatch/batches/run.py", "_save (live batch.json every 2 s)"),
    ("batch_object", "hfbatch/summary.py", "batch_object"),
    ("write_json", "hfbatch/storage.py", "write_json (batch.json/meta.json + fsync)"),
    ("BaseEventLoop.run_in_executor", "asyncio/base_events.py",
     "aiohttp trust_env: run_in_executor(_get_netrc_auth) per request (event-loop side)"),
    ("to_thread", "asyncio/threads.py",
     "aiohttp trust_env: to_thread(get_env_proxy_for_url) per request (event-loop side)"),
]


Stack = tuple[str, list[tuple[str, str, str]], int]  # thread name, frames (root first), samples


def parse_raw(path: Path) -> list[Stack]:
    """py-spy raw output with --threads: 'thread (TID): NAME;frame;frame;... count', frames 'func (file:line)'."""
    stacks = []
    for line in path.read_text().splitlines():
        body, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        parts = body.split(";")
        thread = "?"
        if parts and parts[0].startswith("thread ("):
            thread = parts.pop(0).partition(": ")[2] or "MainThread (unnamed yet)"
        frames = []
        for fr in parts if any(p.strip() for p in parts) else []:
            m = FRAME_RE.match(fr.strip())
            frames.append((m["func"], m["file"], m["line"] or "") if m else (fr, "?", ""))
        stacks.append((thread, frames, int(count)))
    return stacks


def category(file: str) -> str:
    for prefix, name in (("asyncio/", "asyncio (event loop, futures, tasks)"),
                         ("aiohttp/", "aiohttp"), ("multidict/", "aiohttp deps (multidict/yarl/...)"),
                         ("yarl/", "aiohttp deps (multidict/yarl/...)"),
                         ("propcache/", "aiohttp deps (multidict/yarl/...)"),
                         ("aiosignal/", "aiohttp deps (multidict/yarl/...)"),
                         ("frozenlist/", "aiohttp deps (multidict/yarl/...)"),
                         ("selectors.py", "selectors/socket"), ("socket.py", "selectors/socket"),
                         ("typer/", "typer/click"), ("click/", "typer/click"), ("pydantic", "pydantic"),
                         ("<frozen importlib", "import machinery")):
        if file.startswith(prefix):
            return name
    if file.startswith("hfbatch/"):
        return file  # per module
    if "naive_aiohttp.py" in file:
        return "naive_aiohttp.py (the script)"
    return "other: " + file.split("/")[0]


def phase(thread: str, frames: list[tuple[str, str, str]]) -> str:
    """Which part of the run a sample belongs to. With uvloop the loop is C code: coroutine steps
    then appear as stacks of their own (rooted at the coroutine, not at <module>), and time spent
    in uvloop itself shows as Runner.run being the leaf frame."""
    funcs = [(f.rpartition(".")[2] if "<" not in f else f, file) for f, file, _ in frames]
    files = [file for _, file in funcs]
    if not thread.startswith("MainThread"):
        pool = f"worker threads ({thread.rstrip('0123456789')}*)"
        own = next((f"{f} ({file})" for f, file, _ in frames if file.startswith("hfbatch/")), None)
        if own:  # hfbatch work handed to a thread (e.g. the input scan)
            return f"{pool}: {own}"
        what = {f for f, _ in funcs} & {"_get_netrc_auth", "get_env_proxy_for_url", "getaddrinfo"}
        return f"{pool}: " + (", ".join(sorted(what)) or "idle/pool machinery")
    if not frames:
        return "no Python frame (native: interpreter start/exit, GC, C code)"
    names = {f for f, _ in funcs}
    if "_find_and_load" in names:
        return "imports (start-up and lazy)"
    if "_materialize" in names:
        return "input hash (BatchRun._materialize)"
    if "scan_input" in names:
        return "validation pass (plan.scan_input)"
    rooted = frames[0][0] in ("<module>", "_run_module_as_main")
    in_loop = (not rooted or names & {"_run_once", "run_forever", "run_until_complete"}
               or any(f == "Runner.run" for f, _, _ in frames))
    if in_loop:
        if "_tick" in names:
            return "event loop: _tick (flush, progress, batch.json)"
        if frames[-1][0] == "Runner.run":
            return "event loop: uvloop's own C code (epoll, sockets, callbacks)"
        return "event loop: request pipeline (Python)"
    if any(fl.startswith(("typer/", "click/")) for fl in files) and "_run_and_print" not in names:
        return "CLI parsing (typer/click), printing"
    return "other (before/after the loop)"


def summarize(stacks: list[Stack], us_per_req: float | None,
              total_cpu_s: float | None) -> dict[str, Any]:
    total = sum(c for _, _, c in stacks) or 1
    phases: Counter[str] = Counter()
    loop_cat: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for thread, frames, c in stacks:
        ph = phase(thread, frames)
        phases[ph] += c
        if frames:
            func, file, line = frames[-1]
            lines[f"{func} ({file}:{line})"] += c
            if ph.startswith("event loop"):
                loop_cat["uvloop (C)" if func == "Runner.run" else category(file)] += c
        seen = set()
        for func, file, _ in frames:
            key = f"{func} ({file})"
            if key not in seen:
                seen.add(key)
                incl[key] += c

    def share(n: int) -> dict[str, Any]:
        d: dict[str, Any] = {"samples": n, "pct": round(100 * n / total, 1)}
        if us_per_req is not None:
            d["us_per_req"] = round(us_per_req * n / total, 1)
        return d

    funcs = {}
    for func, file, label in HFBATCH_FUNCS:
        key = f"{func} ({file})"
        if incl.get(key):
            funcs[label] = share(incl[key])
    return {
        "samples": total, "cpu_us_per_req": us_per_req, "cpu_s": total_cpu_s,
        "phases": {k: share(v) for k, v in phases.most_common()},
        "event_loop_self_by_category": {k: share(v) for k, v in loop_cat.most_common()},
        "top_lines_self": {k: share(v) for k, v in lines.most_common(30)},
        "hfbatch_inclusive": funcs,
    }


def render(name: str, s: dict[str, Any]) -> str:
    out = [f"== {name}: {s['samples']} samples; unprofiled CPU {s['cpu_us_per_req']:.0f} us/req "
           f"({s['cpu_s']:.2f} s)" if s["cpu_us_per_req"] else f"== {name}: {s['samples']} samples"]

    def table(title: str, d: dict[str, Any], width: int = 70) -> None:
        out.append(f"-- {title}")
        for k, v in d.items():
            us = f"{v['us_per_req']:7.1f} us/req" if "us_per_req" in v else ""
            out.append(f"   {v['pct']:5.1f}%  {us}  {k[:width + 40]}")

    table("phases (inclusive)", s["phases"])
    table("event loop: self time by package/module (leaf frame)", s["event_loop_self_by_category"])
    if s["hfbatch_inclusive"]:
        table("hfbatch functions (inclusive; nested rows overlap)", s["hfbatch_inclusive"])
    table("hottest lines (self; C calls such as orjson/os.write count on their Python line)",
          dict(list(s["top_lines_self"].items())[:25]))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--conc", type=int, default=64)
    ap.add_argument("--latency", type=int, default=0, help="mock latency, ms")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--clients", default="hfbatch,naive_aiohttp")
    ap.add_argument("--no-graphs", action="store_true", help="skip the flame graph and speedscope runs")
    ap.add_argument("--from-raw", action="store_true",
                    help="only re-summarize the last raw profiles (bench/out/profile-*.txt, profile-summary.json)")
    args = ap.parse_args()
    if args.from_raw:
        prev = json.loads((OUT / "profile-summary.json").read_text())
        parts = [prev.get("_header", "")]
        for client, old in prev.items():
            if client.startswith("_"):
                continue
            s = summarize(parse_raw(OUT / f"profile-{client}.txt"), old["cpu_us_per_req"], old["cpu_s"])
            s["unprofiled"] = old.get("unprofiled")
            prev[client] = s
            parts.append(render(client, s))
        (OUT / "profile-summary.txt").write_text("\n\n".join(parts) + "\n")
        (OUT / "profile-summary.json").write_text(json.dumps(prev, indent=1, default=str))
        print("\n\n".join(parts))
        return 0
    pyspy = shutil.which("py-spy", path=str(REPO / ".venv" / "bin")) or shutil.which("py-spy")
    if not pyspy:
        sys.exit("py-spy not found: .venv/bin/pip install py-spy")
    referee = referee_dir()
    inp = gen_input(referee, args.n)
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    summaries: dict[str, Any] = {}
    text = [f"profile of scenario (b)-like runs: {args.n:,} requests, {args.latency} ms, concurrency {args.conc}, "
            f"py-spy {args.rate} Hz; hfbatch source {source_fingerprint()}; machine {machine()}"]
    tmp_root = OUT / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with Mock(referee, args.latency) as mock:
        for client in clients:
            def cmd_env(tag: str, c: str = client) -> tuple[list[str], dict[str, str], Path]:
                d = Path(tempfile.mkdtemp(dir=tmp_root, prefix=f"prof-{c}-{tag}-"))
                (d / "home").mkdir()
                cmd, env = client_cmd(c, referee, inp, d / "out.jsonl", d / "err.jsonl", mock.base, args.conc,
                                      d / "home")
                return cmd, env, d

            mock.reset()
            cmd, env, d = cmd_env("plain")
            plain = run_measured(cmd, env, timeout=600, mock_pid=mock.proc.pid if mock.proc else None)
            ok = count_lines(d / "out.jsonl") == args.n and mock.stats()["dup_ok"] == 0
            shutil.rmtree(d, ignore_errors=True)
            us = 1e6 * plain["cpu_s"] / args.n
            print(f"{client}: unprofiled wall {plain['wall_s']:.2f} s, CPU {plain['cpu_s']:.2f} s = {us:.0f} us/req, "
                  f"others {100 * plain['foreign_share']:.0f}% cpu, correct {ok}", flush=True)
            formats = [("raw", OUT / f"profile-{client}.txt")]
            if client == "hfbatch" and not args.no_graphs:
                formats += [("flamegraph", OUT / "profile.svg"), ("speedscope", OUT / "profile.speedscope.json")]
            for fmt, path in formats:
                mock.reset()
                cmd, env, d = cmd_env(fmt)
                threads = ["--threads"] if fmt == "raw" else []
                subprocess.run([pyspy, "record", "--nonblocking", "--rate", str(args.rate), "--format", fmt,
                                *threads, "-o", str(path), "--", *cmd], env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                shutil.rmtree(d, ignore_errors=True)
                print(f"  py-spy {fmt}: {path}", flush=True)
            s = summarize(parse_raw(OUT / f"profile-{client}.txt"), us, plain["cpu_s"])
            s["unprofiled"] = plain
            summaries[client] = s
            text.append(render(client, s))
    report = "\n\n".join(text)
    print(report)
    (OUT / "profile-summary.txt").write_text(report + "\n")
    summaries["_header"] = text[0]
    (OUT / "profile-summary.json").write_text(json.dumps(summaries, indent=1, default=str))
    print(f"\nsummary: {OUT / 'profile-summary.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
