#!/usr/bin/env python3
"""`make bench`: hfbatch against the referee's baselines and the ideal, on the referee's mock provider.

Scenarios (full sizes; --quick uses 2,000 / 2,000 / 10,000+50,000):
  (a) 20,000 requests, 200 ms latency, concurrency 512: wall time and efficiency
      = (N x latency / concurrency) / wall, start-up included.                   target >= 0.9
  (b) 20,000 requests, zero latency, concurrency 64: client CPU (user+sys of the child, from
      os.wait4) per request, writing included.                      target <= 1.1x naive_aiohttp
  (c) 100,000 and 1,000,000 requests, zero latency, concurrency 64: peak RSS (ru_maxrss of the
      child).                                          target < 150 MB and not growing with N
  (d) start-up: `hfbatch --help`, `hfbatch estimate` on a small file, and a 1-line submit
      end to end (all clients).                                    target: --help < 0.25 s
  (r) the (a) file on this machine with `--engine ray` (a local Ray started by the run, its default
      shards) against the http engine: wall times and their ratio (only with the `ray` extra).

Every client runs as a child process; each run gets a reset mock (/__reset), fresh output files and
a fresh HFBATCH_HOME (nothing is resumed), and is checked: output lines == N, every marker answered
once (mock distinct_ok == N) and never twice (dup_ok == 0), exit code 0.

Results: a table on stdout (medians over --runs), raw runs in bench/out/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    OUT,
    REPO,
    Mock,
    child_env,
    count_lines,
    gen_input,
    hfbatch_exe,
    machine,
    referee_dir,
    run_measured,
    source_fingerprint,
    venv_python,
    wait_quiet,
)

CLIENTS = ("hfbatch", "naive_hf", "naive_aiohttp")
FULL = {"a": 20_000, "b": 20_000, "c": (100_000, 1_000_000)}
QUICK = {"a": 2_000, "b": 2_000, "c": (10_000, 50_000)}
A_LATENCY_MS, A_CONC = 200, 512
B_CONC = 64
C_CONC = 64
SMALL_N = 100  # the small file for `hfbatch estimate`
TOKEN = "hf_bench"


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- runs


def client_cmd(client: str, referee: Path, inp: Path, out: Path, err: Path, base: str, conc: int,
               home: Path) -> tuple[list[str], dict[str, str]]:
    if client in ("hfbatch", "hfbatch_ray"):
        cmd = [*hfbatch_exe(), "submit", str(inp), "-o", str(out), "-e", str(err),
               "--base-url", base + "/v1", "-c", str(conc), "-q"]
        if client == "hfbatch_ray":
            cmd += ["--engine", "ray"]
        return cmd, child_env(HF_TOKEN=TOKEN, HFBATCH_HOME=str(home))
    script = referee / f"{client}.py"
    return [venv_python(), str(script), str(inp), str(out), base + "/v1", str(conc)], child_env()


QUIET_WAIT = 0.0  # set from --quiet-wait


def one_run(client: str, referee: Path, mock: Mock, inp: Path, n: int, conc: int, keep: bool) -> dict[str, Any]:
    """One measured run of `client` on `inp` (n requests), checked against the mock's counters."""
    mock.reset()
    before = wait_quiet(QUIET_WAIT) if QUIET_WAIT > 0 else None
    tmp = OUT / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{client}-{n}-"))
    out, err, home = rundir / "output.jsonl", rundir / "errors.jsonl", rundir / "home"
    home.mkdir()
    cmd, env = client_cmd(client, referee, inp, out, err, mock.base, conc, home)
    rec = run_measured(cmd, env, timeout=120 + n * 0.01, stdout=rundir / "stdout", stderr=rundir / "stderr",
                       mock_pid=mock.proc.pid if mock.proc else None)
    rec["foreign_share_before"] = before
    if client.startswith("hfbatch"):
        rec["hfbatch_source"] = source_fingerprint()["sha256"]  # the tree may change between runs
    st = mock.stats()
    rec.update(n=n, concurrency=conc, latency_ms=mock.latency_ms, client=client,
               out_lines=count_lines(out), err_lines=count_lines(err),
               mock={k: st.get(k) for k in ("requests", "ok", "distinct_ok", "dup_ok", "max_inflight",
                                            "s400", "s429", "s500", "auth_missing")})
    problems = []
    if rec["rc"] != 0:
        problems.append(f"exit {rec['rc']}")
    if rec["timed_out"]:
        problems.append("timed out")
    if rec["out_lines"] != n:
        problems.append(f"{rec['out_lines']} output lines")
    if st.get("dup_ok"):
        problems.append(f"dup_ok {st['dup_ok']}")
    if st.get("distinct_ok") != n:
        problems.append(f"distinct_ok {st.get('distinct_ok')}")
    rec["ok"] = not problems
    rec["problems"] = problems
    if problems:
        rec["stderr_tail"] = (rundir / "stderr").read_bytes()[-800:].decode("utf-8", "replace")
    if not keep:
        shutil.rmtree(rundir, ignore_errors=True)
    else:
        rec["dir"] = str(rundir)
    return rec


def show_run(tag: str, i: int, k: int, r: dict[str, Any]) -> None:
    check = "ok" if r["ok"] else "FAIL: " + ", ".join(r["problems"])
    if r.get("hfbatch_source"):
        check += f"  (src {r['hfbatch_source'][:8]})"
    log(f"  [{tag}] {r['client']:<14} run {i}/{k}: wall {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s "
        f"({1e6 * r['cpu_s'] / max(r['n'], 1):6.0f} us/req)  rss {r['maxrss_kb'] / 1024:7.1f} MB  "
        f"lines {r['out_lines']}/{r['n']}  ok {r['mock']['distinct_ok']} dup_ok {r['mock']['dup_ok']}  "
        f"max_inflight {r['mock']['max_inflight']}  others {100 * r['foreign_share']:3.0f}% cpu  -> {check}")
    if not r["ok"] and r.get("stderr_tail"):
        log("      stderr: " + r["stderr_tail"].strip().replace("\n", "\n      "))


def load_scenario(tag: str, referee: Path, n: int, latency_ms: int, conc: int, clients: list[str],
                  runs_for: Callable[[str], int], keep: bool) -> dict[str, list[dict[str, Any]]]:
    """Run each client runs_for(client) times, interleaved (run 1 of every client, then run 2, ...)."""
    inp = gen_input(referee, n)
    res: dict[str, list[dict[str, Any]]] = {c: [] for c in clients}
    log(f"({tag}) {n:,} requests, {latency_ms} ms latency, concurrency {conc}")
    with Mock(referee, latency_ms) as mock:
        k = max(runs_for(c) for c in clients)
        for i in range(1, k + 1):
            for c in clients:
                if i <= runs_for(c):
                    r = one_run(c, referee, mock, inp, n, conc, keep)
                    res[c].append(r)
                    show_run(tag, i, runs_for(c), r)
    return res


def warm_up(referee: Path, clients: list[str]) -> None:
    """One unmeasured 1-line run per client: byte-code caches and the page cache are warm before timing."""
    inp = gen_input(referee, 1)
    with Mock(referee, 0) as mock:
        for c in clients:
            r = one_run(c, referee, mock, inp, 1, 1, keep=False)
            if not r["ok"]:
                log(f"warm-up: {c} failed: {', '.join(r['problems'])}\n{r.get('stderr_tail', '')}")
    run_measured([*hfbatch_exe(), "--help"], child_env(), 60)


def startup_runs(cmd: list[str], env: dict[str, str], k: int) -> list[dict[str, Any]]:
    return [run_measured(cmd, env, timeout=60) for _ in range(k)]


# ------------------------------------------------------------------------------------------- figures


def med(runs: list[dict[str, Any]], f: Callable[[dict[str, Any]], float]) -> float | None:
    return statistics.median(f(r) for r in runs) if runs else None


def all_ok(runs: list[dict[str, Any]]) -> bool:
    return all(r.get("ok", r.get("rc") == 0) for r in runs)


def fmt(v: float | None, spec: str, runs: list[dict[str, Any]] | None = None) -> str:
    if v is None:
        return "-"
    s = format(v, spec)
    if runs is not None and len({r["hfbatch_source"] for r in runs if r.get("hfbatch_source")}) > 1:
        s += "~"  # hfbatch's source changed between these runs
    return s + ("!" if runs is not None and not all_ok(runs) else "")


def build_rows(res: dict[str, Any], sizes: dict[str, Any], clients: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(scen: str, figure: str, vals: dict[str, str], ideal: str = "", target: str = "",
            met: bool | None = None, raw: dict[str, Any] | None = None) -> None:
        rows.append({"scenario": scen, "figure": figure, "values": vals, "ideal": ideal, "target": target,
                     "met": met, "raw": raw or {}})

    def others(scen: str, runs: dict[str, list[dict[str, Any]]]) -> None:
        """How busy other processes kept the (shared) machine during these runs."""
        share = {c: med(runs[c], lambda r: 100 * r["foreign_share"]) for c in runs}
        row(scen, "others' CPU %", {c: fmt(share[c], ".0f") for c in runs}, "0", raw={"foreign_pct": share})

    if "a" in res:
        a, n = res["a"], sizes["a"]
        ideal = n * A_LATENCY_MS / 1000 / A_CONC
        wall = {c: med(a[c], lambda r: r["wall_s"]) for c in a}
        eff = {c: (ideal / w if w else None) for c, w in wall.items()}
        scen = f"(a) {n:,} req, {A_LATENCY_MS} ms, c={A_CONC}"
        row(scen, "wall s", {c: fmt(wall[c], ".2f", a[c]) for c in a}, f"{ideal:.2f}", raw={"wall_s": wall})
        e = eff.get("hfbatch")
        row(scen, "efficiency", {c: fmt(eff[c], ".2f", a[c]) for c in a}, "1.00", ">= 0.9",
            None if e is None else e >= 0.9, raw={"efficiency": eff, "ideal_wall_s": ideal})
        cpu = {c: med(a[c], lambda r: 1e6 * r["cpu_s"] / r["n"]) for c in a}
        row(scen, "CPU us/req", {c: fmt(cpu[c], ".0f", a[c]) for c in a}, raw={"cpu_us_per_req": cpu})
        others(scen, a)
    if "b" in res:
        b, n = res["b"], sizes["b"]
        scen = f"(b) {n:,} req, 0 ms, c={B_CONC}"
        cpu = {c: med(b[c], lambda r: 1e6 * r["cpu_s"] / r["n"]) for c in b}
        yard = cpu.get("naive_aiohttp")
        limit = 1.1 * yard if yard else 220.0  # no baseline run: the referee's ~200 us x 1.1
        h = cpu.get("hfbatch")
        row(scen, "CPU us/req", {c: fmt(cpu[c], ".0f", b[c]) for c in b}, "",
            f"<= {limit:.0f} (1.1x aiohttp{'' if yard else ', assumed 200'})",
            None if h is None else h <= limit, raw={"cpu_us_per_req": cpu, "limit_us": limit})
        if yard and h:
            row(scen, "CPU vs aiohttp", {c: fmt(cpu[c] / yard, ".2f") + "x" for c in b if cpu[c]}, "",
                "<= 1.10x", h / yard <= 1.1)
        wall = {c: med(b[c], lambda r: r["wall_s"]) for c in b}
        row(scen, "wall s", {c: fmt(wall[c], ".2f", b[c]) for c in b}, raw={"wall_s": wall})
        others(scen, b)
    if "c" in res:
        c_res, floor = res["c"], res.get("c_floor_mb")
        ns = sorted(c_res, key=int)
        rss: dict[str, dict[str, float | None]] = {}
        for n_key in ns:
            runs = c_res[n_key]
            scen = f"(c) {int(n_key):,} req, 0 ms, c={C_CONC}"
            rss[n_key] = {c: med(runs[c], lambda r: r["maxrss_kb"] / 1024) for c in runs}
            h = rss[n_key].get("hfbatch")
            row(scen, "peak RSS MB", {c: fmt(rss[n_key].get(c), ".1f", runs.get(c)) for c in runs},
                fmt(floor, ".1f") + " (floor)" if floor else "", "< 150", None if h is None else h < 150,
                raw={"rss_mb": rss[n_key]})
            wall = {c: med(runs[c], lambda r: r["wall_s"]) for c in runs}
            row(scen, "wall s", {c: fmt(wall[c], ".1f", runs.get(c)) for c in runs}, raw={"wall_s": wall})
            others(scen, runs)
        if len(ns) >= 2:
            lo, hi = ns[0], ns[-1]
            growth: dict[str, str] = {}
            met = None
            for c in clients:
                x, y = rss[lo].get(c), rss[hi].get(c)
                if x and y:
                    growth[c] = f"{y - x:+.1f} MB ({(y / x - 1) * 100:+.0f}%)"
                    if c == "hfbatch":
                        met = y <= x * 1.10
            row(f"(c) {int(lo):,} -> {int(hi):,}", "RSS growth", growth, "+0", "<= +10%", met)
    if "r" in res:
        r, n = res["r"], sizes["a"]
        scen = f"(r) {n:,} req, {A_LATENCY_MS} ms, c={A_CONC}: --engine ray"
        wall = {c: med(r[c], lambda x: x["wall_s"]) for c in r}
        h, ray = wall.get("hfbatch"), wall.get("hfbatch_ray")
        row(scen, "wall s (http | ray)", {"hfbatch": f"{fmt(h, '.2f', r['hfbatch'])} | "
                                                     f"{fmt(ray, '.2f', r['hfbatch_ray'])}"},
            f"{n * A_LATENCY_MS / 1000 / A_CONC:.2f}", raw={"wall_s": wall})
        row(scen, "ray / http wall", {"hfbatch": fmt(ray / h if h and ray else None, ".2f") + "x"},
            raw={"ratio": ray / h if h and ray else None,
                 "cpu_s": {c: med(r[c], lambda x: x["cpu_s"]) for c in r},
                 "rss_mb": {c: med(r[c], lambda x: x["maxrss_kb"] / 1024) for c in r}})
    if "d" in res:
        d = res["d"]
        help_wall = med(d["help"], lambda r: r["wall_s"])
        row("(d) hfbatch --help", "wall s", {"hfbatch": fmt(help_wall, ".3f", d["help"])},
            fmt(med(d["python_floor"], lambda r: r["wall_s"]), ".3f") + " (python -c pass)", "< 0.25",
            None if help_wall is None else help_wall < 0.25)
        est = d.get("estimate")
        if est is None:
            row("(d) hfbatch estimate (small)", "wall s", {"hfbatch": "n/a (not implemented)"})
        else:
            row("(d) hfbatch estimate (small)", "wall s", {"hfbatch": fmt(med(est, lambda r: r["wall_s"]), ".3f", est)})
        one = d["submit1"]
        row("(d) 1-line run end to end", "wall s",
            {c: fmt(med(one[c], lambda r: r["wall_s"]), ".3f", one[c]) for c in one})
    return rows


def print_table(rows: list[dict[str, Any]], clients: list[str], mach: dict[str, Any]) -> None:
    log()
    log(f"hfbatch source: {mach.get('src')}")
    log(f"machine: {mach['nproc']} CPUs ({mach['cpu_model']}), {mach['mem_gb']} GB, Linux {mach['kernel']}, "
        f"Python {mach['python']}, node {mach['node']}; load average at start {mach.get('loadavg_start')}")
    head = ["scenario", "figure", *clients, "ideal", "target", "met"]
    body = [[r["scenario"], r["figure"], *(r["values"].get(c, "") for c in clients), r["ideal"], r["target"],
             {True: "yes", False: "NO", None: ""}[r["met"]]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    log(line)
    log("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        log("| " + " | ".join(str(x).ljust(w) for x, w in zip(b, widths, strict=True)) + " |")
    log("(medians; '!' = at least one run failed its correctness check; '~' = hfbatch/*.py changed between "
        "these runs; ideal for (c) = RSS of a python that only imports asyncio+aiohttp+orjson)")


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 2,000 / 2,000 / 10,000+50,000 (1 run "
                    "unless --runs is given)")
    ap.add_argument("--runs", type=int, default=None, help="runs per figure, medians reported (default 3)")
    ap.add_argument("--only", default="a,b,c,d,r", help="comma-separated scenarios among a,b,c,d,r (r: only with "
                    "the `ray` extra installed)")
    ap.add_argument("--skip-baselines", action="store_true", help="run hfbatch only")
    ap.add_argument("--c-baseline-runs", type=int, default=1,
                    help="runs of each baseline in (c) (default 1: RSS barely varies, and they are slow)")
    ap.add_argument("--hf-max-n", type=int, default=100_000,
                    help="largest N naive_hf.py is run at in (c) (default 100,000: at 1,000,000 it takes "
                    "~30 min and holds every request and answer in memory)")
    ap.add_argument("--json", type=Path, default=OUT / "results.json", help="machine-readable results")
    ap.add_argument("--keep", action="store_true", help="keep each run's output files under bench/out/tmp")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each load run, wait up to this many seconds for other processes to use "
                    "< 15%% of the CPUs (default 20; 0 = never wait). Each run reports the CPU share "
                    "others took meanwhile ('others N%% cpu')")
    args = ap.parse_args()
    global QUIET_WAIT
    QUIET_WAIT = args.quiet_wait
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not only <= {"a", "b", "c", "d", "r"}:
        ap.error("--only takes a,b,c,d,r")
    if "r" in only and not ray_installed():
        log("(r) skipped: the `ray` extra is not installed (pip install -e '.[ray]')")
        only.discard("r")
    sizes = QUICK if args.quick else FULL
    clients = ["hfbatch"] if args.skip_baselines else list(CLIENTS)
    referee = referee_dir()
    OUT.mkdir(parents=True, exist_ok=True)
    mach = machine()
    mach["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    src_start = source_fingerprint()
    log(f"hfbatch bench: {'quick' if args.quick else 'full'}, {runs} run(s), scenarios {','.join(sorted(only))}, "
        f"clients {', '.join(clients)}; referee {referee}")
    t_start = time.time()
    res: dict[str, Any] = {}
    warm_up(referee, clients)

    if "a" in only:
        res["a"] = load_scenario("a", referee, sizes["a"], A_LATENCY_MS, A_CONC, clients, lambda c: runs, args.keep)
    if "b" in only:
        res["b"] = load_scenario("b", referee, sizes["b"], 0, B_CONC, clients, lambda c: runs, args.keep)
    if "c" in only:
        res["c"] = {}
        for n in sizes["c"]:
            cl = [c for c in clients if c != "naive_hf" or n <= args.hf_max_n]
            res["c"][str(n)] = load_scenario(
                "c", referee, n, 0, C_CONC, cl,
                lambda c: runs if c == "hfbatch" else args.c_baseline_runs, args.keep)
        floor = [run_measured([venv_python(), "-c", "import asyncio, aiohttp, orjson"], child_env(), 60)
                 for _ in range(3)]
        res["c_floor_mb"] = med(floor, lambda r: r["maxrss_kb"] / 1024)
    if "r" in only:
        res["r"] = load_scenario("r", referee, sizes["a"], A_LATENCY_MS, A_CONC, ["hfbatch", "hfbatch_ray"],
                                 lambda c: runs, args.keep)
    if "d" in only:
        log("(d) start-up")
        k = max(runs, 5)
        d: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(dir=OUT) as home:
            env = child_env(HF_TOKEN=TOKEN, HFBATCH_HOME=home)
            d["python_floor"] = startup_runs([venv_python(), "-c", "pass"], child_env(), k)
            d["help"] = startup_runs([*hfbatch_exe(), "--help"], env, k)
            log("  hfbatch --help: " + ", ".join(f"{r['wall_s']:.3f}" for r in d["help"]) + " s")
            probe = run_measured([*hfbatch_exe(), "estimate", "--help"], env, 60)
            d["estimate"] = None
            if probe["rc"] == 0:
                small = gen_input(referee, SMALL_N)
                with Mock(referee, 0) as mock:
                    eenv = child_env(HF_TOKEN=TOKEN, HFBATCH_HOME=home, HFBATCH_ROUTER_URL=mock.base)
                    d["estimate"] = startup_runs([*hfbatch_exe(), "estimate", str(small)], eenv, k)
                log("  hfbatch estimate: " + ", ".join(f"{r['wall_s']:.3f} (rc {r['rc']})" for r in d["estimate"]))
            else:
                log("  hfbatch estimate: n/a (not implemented)")
        d["submit1"] = load_scenario("d", referee, 1, 0, 1, clients, lambda c: k, args.keep)
        res["d"] = d

    rows = build_rows(res, sizes, clients)
    mach["src"] = source_fingerprint()
    print_table(rows, clients, mach)
    failures = [r for sc in _all_runs(res) for r in sc if not r.get("ok", True)]
    log(f"correctness: {'all runs ok' if not failures else f'{len(failures)} run(s) FAILED'} "
        f"(output lines == N, mock distinct_ok == N, dup_ok == 0, exit 0); took {time.time() - t_start:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    src_end = source_fingerprint()
    if src_end != src_start:
        log(f"WARNING: hfbatch/*.py changed during the run ({src_start['sha256']} -> {src_end['sha256']}): "
            "the figures mix two versions")
    doc = {"machine": mach, "hfbatch_source": {"start": src_start, "end": src_end}, "argv": sys.argv[1:],
           "mode": "quick" if args.quick else "full", "runs": runs,
           "sizes": sizes, "concurrency": {"a": A_CONC, "b": B_CONC, "c": C_CONC},
           "latency_ms": {"a": A_LATENCY_MS, "b": 0, "c": 0}, "started_at": t_start,
           "elapsed_s": time.time() - t_start, "repo": str(REPO), "referee": str(referee),
           "table": rows, "results": res}
    args.json.write_text(json.dumps(doc, indent=1, default=str))
    log(f"results: {args.json}")
    return 1 if failures else 0


def ray_installed() -> bool:
    """Is `ray` importable by the venv's python (the child runs)?"""
    import subprocess

    return subprocess.run([venv_python(), "-c", "import importlib.util as u; raise SystemExit(u.find_spec('ray') "
                           "is None)"], capture_output=True).returncode == 0


def _all_runs(res: dict[str, Any]) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    for key in ("a", "b", "r"):
        out.extend(res.get(key, {}).values())
    for per_n in res.get("c", {}).values():
        out.extend(per_n.values())
    if "d" in res:
        out.extend(res["d"]["submit1"].values())
    return out


if __name__ == "__main__":
    sys.exit(main())
