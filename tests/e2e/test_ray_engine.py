"""The Ray engine end to end: the real CLI as a subprocess, joining one local Ray started once for these tests
(2 CPUs and one declared GPU, no real one: the GPU mode runs hfbatch's stand-in `vllm`), against the real local fake
provider. What no test here can show: a real multi-node cluster (shared storage, a lost node); README says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import (
    TOKEN,
    Cli,
    assert_each_once,
    chat_file,
    chat_line,
    check_batch,
    check_completed,
    check_output_line,
    cli_env,
    count_lines,
    last_json,
    poll,
    read_jsonl,
    write_jsonl,
)

from hfbatch.testing.vllm import install

# `ray_address`: one local Ray for the whole run, started in the background by tests/ray_cluster.py.


def ray_args(address: str, *more: str) -> list[str]:
    return ["--engine", "ray", "--ray-address", address, *more]


def bodies(path: Path) -> dict[str, bytes]:
    """custom_id -> the raw bytes of its line's response body, as written."""
    out = {}
    for raw in path.read_bytes().splitlines():
        cid = json.loads(raw)["custom_id"]
        out[cid] = raw.split(b'"body":', 1)[1].removesuffix(b'},"error":null}')
    return out


def started(cli: Cli, shard: str) -> Path | None:
    """The shard's folder once an attempt of it runs (attempt.json: its epoch, its worker's pid)."""
    found = sorted(cli.home.glob(f"batches/*/engine/shards/{shard}/attempt.json"))
    return found[0].parent if found else None


def test_same_files_as_http_under_429s_with_c_held_across_four_workers(tmp_path: Path, make_fake: Any, cli: Cli,
                                                                       ray_address: str) -> None:
    lines = [chat_line(f"r{i:03d}", f"[[id:r{i:03d}]] message {i}") for i in range(120)]
    lines += [chat_line("copy-a", "same question"), chat_line("copy-b", "same question")]  # sent once (dedupe)
    lines.append(chat_line("bad-model", "x", model="NonExistent/model"))  # a 400: the error file
    write_jsonl(tmp_path / "in.jsonl", lines)
    fake = make_fake(latency=0.02, fail_429=0.15, stable=True)
    http = cli.run("submit", "in.jsonl", "-o", "h.out.jsonl", "-e", "h.err.jsonl", "-c", "8", "-q")
    assert http.returncode == 3, http.stderr  # finished, one request failed
    fake.reset_stats()
    ray = cli.run("submit", "in.jsonl", "-o", "r.out.jsonl", "-e", "r.err.jsonl", "-c", "8", "-q",
                  *ray_args(ray_address, "--shards", "4"), timeout=90)
    assert ray.returncode == 3, ray.stderr
    st = fake.stats()
    assert st["s429"] > 0 and st["dup_ok"] == 0 and st["distinct_ok"] == 120
    assert st["max_inflight"] <= 8, st  # -c is the cluster's, not each worker's
    h_out, r_out = bodies(tmp_path / "h.out.jsonl"), bodies(tmp_path / "r.out.jsonl")
    assert sorted(r_out) == sorted(h_out) and len(r_out) == 122
    assert all(r_out[c] == h_out[c] for c in h_out)  # the provider's bytes, passed through by both engines
    for line in read_jsonl(tmp_path / "r.out.jsonl"):
        check_output_line(line, "/v1/chat/completions")
    err = read_jsonl(tmp_path / "r.err.jsonl")
    assert [e["custom_id"] for e in err] == ["bad-model"] and err[0]["response"]["status_code"] == 400
    assert err[0]["response"]["body"] == read_jsonl(tmp_path / "h.err.jsonl")[0]["response"]["body"]
    b = check_batch(last_json(ray.stdout))
    check_completed(b)
    hb = b["hfbatch"]
    assert hb["engine"] == "ray" and b["request_counts"] == {"total": 123, "completed": 122, "failed": 1}
    assert len(hb["shards"]) == 4 and {s["status"] for s in hb["shards"]} == {"done"}
    assert sum(s["completed"] + s["failed"] for s in hb["shards"]) == 123
    assert hb["workers"] >= 2 and hb["retries"] > 0 and hb["savings"]["deduped_requests"] == 1
    # the workers' latencies, merged (the fake answers in 20 ms; the http run measured the same requests)
    h_latency = check_batch(last_json(http.stdout))["hfbatch"]["latency_ms"]
    assert hb["latency_ms"]["p50"] is not None and 20 <= hb["latency_ms"]["p50"] <= 10 * h_latency["p50"], hb
    assert b["usage"]["output_tokens"] > 0 and hb["http_requests"] == st["paths"]["/v1/chat/completions"]
    listed = cli.listing()
    assert any(x["id"] == b["id"] and x["status"] == "completed" for x in listed)


def test_a_killed_worker_resends_at_most_its_in_flight_a_killed_driver_resumes_and_cancel_stops_every_worker(
        tmp_path: Path, make_fake: Any, cli: Cli, ray_address: str) -> None:
    ids = chat_file(tmp_path / "in.jsonl", 400)
    fake = make_fake(latency=0.1)
    args = ["submit", "in.jsonl", "-c", "8", "-q", *ray_args(ray_address, "--shards", "2")]
    p = cli.start(*args)
    s1 = poll(lambda: started(cli, "s0001"), "shard s0001 to start", 30, proc=p)
    poll(lambda: count_lines(s1 / "output.jsonl") >= 20, "s0001 to answer 20 requests", 30, proc=p)
    first = json.loads((s1 / "attempt.json").read_bytes())
    os.kill(first["pid"], signal.SIGKILL)  # the worker dies mid-shard: Ray runs the task again
    poll(lambda: json.loads((s1 / "attempt.json").read_bytes())["epoch"] == 2, "Ray to re-run s0001", 30, proc=p)
    resent_by_worker = fake.stats()["dup_ok"]
    poll(lambda: count_lines(tmp_path / "in.output.jsonl") >= 120, "120 merged lines", 30, proc=p)
    cli.kill9(p)  # the driver dies: Ray ends its tasks and its limits actor with it
    merged = count_lines(tmp_path / "in.output.jsonl")

    again = cli.start(*args)  # the same command: it merges what the shards wrote, shards only the rest
    poll(lambda: count_lines(tmp_path / "in.output.jsonl") >= merged + 40, "the rerun's lines", 30, proc=again)
    batch_id = cli.only_batch_id()
    live = cli.batch("status", batch_id)
    assert live["status"] == "in_progress" and live["hfbatch"]["engine"] == "ray"
    assert cli.batch("cancel", batch_id)["status"] in ("cancelling", "cancelled")
    code, out, _ = cli.finish(again, timeout=30)
    assert code == 6  # cancelled: every worker stopped, the rest closed as batch_cancelled
    b = check_batch(last_json(out))
    assert b["status"] == "cancelled"
    lines, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    assert_each_once(ids, lines, err)
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"} and len(lines) < 400
    st = fake.stats()
    assert resent_by_worker <= 8, st  # at most what the killed worker held of -c
    assert st["dup_ok"] <= 16, st  # ... plus at most -c in flight when the driver died; none after
    assert st["distinct_ok"] == len(lines)
    shards = {s["shard"]: s for s in b["hfbatch"]["shards"]}
    assert shards["s0001"]["status"] == "merged" and shards["s0001"]["attempts"] >= 2
    assert {s["status"] for s in shards.values() if s["shard"] > "s0002"} <= {"done", "stopped"}


def test_gpu_mode_runs_the_vllm_part_runner_per_shard(tmp_path: Path, cli: Cli, ray_address: str) -> None:
    vllm = install(tmp_path / "bin")
    lines = [chat_line(f"a{i}", f"question {i}", model="org-a/chat-one") for i in range(6)]
    lines += [chat_line(f"b{i}", f"question {i}", model="org-b/chat-two") for i in range(4)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    record = tmp_path / "vllm-runs.jsonl"
    env = cli_env(tmp_path, None, {"HFBATCH_VLLM": str(vllm), "FAKE_VLLM_RECORD": str(record),
                                   "HFBATCH_RAY_ENV": "FAKE_VLLM_RECORD"})
    p = subprocess.run([sys.executable, "-m", "hfbatch", "submit", "in.jsonl", "-q",
                        *ray_args(ray_address, "--shards", "2", "--gpus-per-worker", "0.5")],
                       cwd=tmp_path, env=env, capture_output=True, timeout=90)
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "Traceback" not in err and TOKEN not in err
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert_each_once([ln["custom_id"] for ln in lines], out)
    for line in out:
        check_output_line(line, "/v1/chat/completions")
        assert line["response"]["request_id"].startswith("vllm-batch-")
    runs = read_jsonl(record)
    assert sorted(r["model"] for r in runs) == ["org-a/chat-one", "org-a/chat-one", "org-b/chat-two",
                                                "org-b/chat-two"]  # one part per model in each shard
    b = check_batch(json.loads(p.stdout))
    assert b["hfbatch"]["engine"] == "ray" and len(b["hfbatch"]["shards"]) == 2 and len(b["hfbatch"]["jobs"]) == 4


def test_without_ray_exit_2_with_the_install_command(tmp_path: Path, make_fake: Any) -> None:
    chat_file(tmp_path / "in.jsonl", 2)
    code = ("import sys; sys.modules['ray'] = None; from hfbatch.__main__ import run; "
            "sys.argv = ['hfbatch', 'submit', 'in.jsonl', '--engine', 'ray']; run()")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path, make_fake()),
                       capture_output=True, timeout=30)
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err
    assert "pip install 'hfbatch[ray]'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "in.output.jsonl").exists()
