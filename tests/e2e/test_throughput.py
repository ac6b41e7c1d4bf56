"""End to end: the throughput features through the real CLI against the local fake router (dedupe, the
response cache, routing, fallback, per-provider limits, --max-tokens, --rpm). Their policies and timing
(AIMD under a hidden cap, slow start, pacing, one throttled provider among others) are unit-tested on the
virtual clock in tests/unit/test_executor.py."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import (
    CHAT_MODEL,
    assert_each_once,
    batch_from,
    chat_line,
    check_output_line,
    ids,
    read_jsonl,
    write_jsonl,
)

CHAT_URL = "/v1/chat/completions"


def echo_of(obj: dict[str, Any]) -> str:
    return obj["response"]["body"]["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------- hidden cap


def test_an_auto_routed_model_shares_its_providers_limit(tmp_path: Path, make_fake, run_cli) -> None:
    """Requests of a model without suffix are limited by the provider that serves it (learned from
    x-inference-provider): one AIMD limit per provider, reported under the provider's name."""
    make_fake(latency=0.05, max_inflight=10, retry_after="0")
    lines = [chat_line(f"au-{i:03d}", f"[[id:au-{i:03d}]] q {i}") for i in range(200)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "-c", "30"], env_extra={"HFBATCH_RETRY_BASE": "0.05"})
    assert p.returncode == 0, p.stderr
    assert_each_once(ids(lines), read_jsonl(tmp_path / "in.output.jsonl"))
    hb = batch_from(p.stdout)["hfbatch"]
    assert hb["providers"] == {"fake-b": 200}
    assert set(hb["concurrency"]) == {"fake-b"}, (
        f"one provider, several limits: {hb['concurrency']} (requests read before the provider was "
        "known keep a limit of their own)")


def test_two_auto_routed_models_on_one_provider_report_one_limit(tmp_path: Path, make_fake, run_cli) -> None:
    # The second model learns a provider the first one already made known: its placeholder held only
    # the requests read before that and is not reported as a provider of its own (as `make demo` showed).
    make_fake(latency=0.05)
    lines = [chat_line(f"m{i % 2}-{i:03d}", f"[[id:m-{i:03d}]] q {i}",
                       model=CHAT_MODEL if i % 2 else "meta-llama/Llama-3.1-8B-Instruct") for i in range(60)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "-c", "8"])
    assert p.returncode == 0, p.stderr
    hb = batch_from(p.stdout)["hfbatch"]
    assert hb["providers"] == {"fake-b": 60}
    assert hb["concurrency"] == {"fake-b": 8}, hb["concurrency"]


# --------------------------------------------------------------------------- RPM


def test_rpm_reaches_the_executor(tmp_path: Path, make_fake, run_cli) -> None:
    """--rpm is wired end to end: 12 requests at 1,200/min cannot take less than 11 gaps of 0.05 s. (How
    evenly they are spread is unit-tested on the virtual clock: test_executor.test_rpm_spreads_requests_evenly.)"""
    fake = make_fake()
    lines = [chat_line(f"rpm-{i:02d}", f"[[id:rpm-{i:02d}]] r {i}") for i in range(12)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "-c", "12", "--rpm", "1200"], timeout=30)
    assert p.returncode == 0, p.stderr
    assert_each_once(ids(lines), read_jsonl(tmp_path / "in.output.jsonl"))
    assert batch_from(p.stdout)["hfbatch"]["elapsed_seconds"] >= 0.55
    assert fake.stats()["requests"] == 12


# --------------------------------------------------------------------------- dedupe


def test_dedupe_sends_each_distinct_request_once(tmp_path: Path, make_fake, run_cli) -> None:
    fake = make_fake(latency=0.05)
    lines = [chat_line(f"d-{i:03d}", f"prompt number {i % 20}") for i in range(100)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "-c", "16"])
    assert p.returncode == 0, p.stderr
    st = fake.stats()
    assert st["requests"] == 20, st
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert_each_once(ids(lines), out)
    prompt_of = {line["custom_id"]: line["body"]["messages"][0]["content"] for line in lines}
    for obj in out:
        check_output_line(obj, CHAT_URL)
        assert echo_of(obj) == "echo: " + prompt_of[obj["custom_id"]], obj
    assert len({obj["id"] for obj in out}) == 100, "each line needs its own batch_req id"
    batch = batch_from(p.stdout)
    hb = batch["hfbatch"]
    assert hb["savings"]["deduped_requests"] == 80
    assert hb["http_requests"] == 20
    # usage counts what was sent (one answer per distinct body); the copies count as saved.
    first: dict[str, dict[str, int]] = {}
    for obj in out:
        first.setdefault(echo_of(obj), obj["response"]["body"]["usage"])
    sent_in = sum(u["prompt_tokens"] for u in first.values())
    sent_out = sum(u["completion_tokens"] for u in first.values())
    assert batch["usage"]["input_tokens"] == sent_in and batch["usage"]["output_tokens"] == sent_out
    assert hb["savings"]["saved_input_tokens"] == 4 * sent_in
    assert hb["savings"]["saved_output_tokens"] == 4 * sent_out
    assert batch["request_counts"] == {"total": 100, "completed": 100, "failed": 0}

    # --no-dedupe: every line is sent (a new batch: other output paths).
    fake.reset_stats()
    p = run_cli(["in.jsonl", "-q", "-c", "16", "--no-dedupe", "-o", "nd.out.jsonl", "-e", "nd.err.jsonl"])
    assert p.returncode == 0, p.stderr
    assert fake.stats()["requests"] == 100
    out = read_jsonl(tmp_path / "nd.out.jsonl")
    assert_each_once(ids(lines), out)
    for obj in out:
        assert echo_of(obj) == "echo: " + prompt_of[obj["custom_id"]]
    hb = batch_from(p.stdout)["hfbatch"]
    assert hb["savings"]["deduped_requests"] == 0 and hb["http_requests"] == 100


# --------------------------------------------------------------------------- cache


def test_cache_answers_a_second_run_without_sending(tmp_path: Path, make_fake, run_cli) -> None:
    fake = make_fake(latency=0.01)
    lines = [chat_line(f"c-{i:02d}", f"cached question {i}") for i in range(12)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "--cache"])
    assert p.returncode == 0, p.stderr
    assert fake.stats()["requests"] == 12
    first = {o["custom_id"]: o for o in read_jsonl(tmp_path / "in.output.jsonl")}
    hb = batch_from(p.stdout)["hfbatch"]
    assert hb["savings"]["cache_hits"] == 0

    db = tmp_path / "_home" / "hfbatch" / "cache.sqlite3"
    assert db.exists() and stat.S_IMODE(os.stat(db).st_mode) == 0o600

    fake.reset_stats()
    p = run_cli(["in.jsonl", "-q", "--cache", "-o", "again.out.jsonl", "-e", "again.err.jsonl"])
    assert p.returncode == 0, p.stderr
    assert fake.stats()["requests"] == 0, "a cached request was sent again"
    again = read_jsonl(tmp_path / "again.out.jsonl")
    assert_each_once(ids(lines), again)
    for obj in again:
        check_output_line(obj, CHAT_URL)
        assert obj["response"]["body"] == first[obj["custom_id"]]["response"]["body"]
    batch = batch_from(p.stdout)
    hb = batch["hfbatch"]
    assert hb["savings"]["cache_hits"] == 12 and hb["http_requests"] == 0
    assert batch["request_counts"] == {"total": 12, "completed": 12, "failed": 0}

    s = run_cli(["stats"], command="cache")
    assert s.returncode == 0, s.stderr
    stats = json.loads(s.stdout)
    assert stats["entries"] == 12 and stats["hits"] >= 12 and stats["by_model"] == {CHAT_MODEL: 12}
    c = run_cli(["clear"], command="cache")
    assert c.returncode == 0, c.stderr
    assert json.loads(c.stdout) == {"deleted": 12}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM responses").fetchone() == (0,)
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600


# --------------------------------------------------------------------------- routing and fallback


def test_route_cheapest_and_max_tokens_rewrite_the_bodies_sent(tmp_path: Path, make_fake, run_cli) -> None:
    """--route cheapest appends :cheapest to models without a suffix (and leaves suffixed ones alone);
    --max-tokens 5 caps every body's output tokens (and sets the cap where there is none)."""
    fake = make_fake(latency=0.01)
    bodies = fake.provider.record()
    lines = ([chat_line(f"plain-{i}", f"plain {i}") for i in range(4)]
             + [chat_line(f"big-{i}", f"big cap {i}", max_tokens=100) for i in range(2)]
             + [chat_line(f"pin-{i}", f"pinned {i}", model=CHAT_MODEL + ":fake-a") for i in range(2)]
             + [chat_line(f"mct-{i}", f"mct {i}", model=CHAT_MODEL + ":fake-a", max_completion_tokens=50)
                for i in range(2)]
             + [chat_line(f"fast-{i}", f"fast {i}", model=CHAT_MODEL + ":fastest") for i in range(2)]
             + [chat_line(f"small-{i}", f"small {i}", max_tokens=3) for i in range(2)])
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "--route", "cheapest", "--max-tokens", "5"])
    assert p.returncode == 0, p.stderr
    sent = Counter(b["model"] for b in bodies)
    assert sent == Counter({CHAT_MODEL + ":cheapest": 8, CHAT_MODEL + ":fake-a": 4,
                            CHAT_MODEL + ":fastest": 2}), sent
    assert fake.stats()["providers"] == {"fake-b": 10, "fake-a": 4}
    assert len(bodies) == len(lines)
    for b in bodies:
        caps = [b[k] for k in ("max_tokens", "max_completion_tokens") if k in b]
        assert caps and all(c <= 5 for c in caps), b
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert_each_once(ids(lines), out)
    for obj in out:
        check_output_line(obj, CHAT_URL)
        used = obj["response"]["body"]["usage"]["completion_tokens"]
        assert used <= (3 if obj["custom_id"].startswith("small") else 5), obj
    hb = batch_from(p.stdout)["hfbatch"]
    assert hb["providers"] == {"fake-b": 10, "fake-a": 4}
    assert hb["savings"]["max_tokens_capped"] == 12  # the 2 bodies already under the cap are unchanged


def test_fallback_moves_failing_lines_to_the_next_provider(tmp_path: Path, make_fake, run_cli) -> None:
    fake = make_fake(latency=0.01)
    # fake-b is down (503 for every request pinned to it); fake-a works.
    fake.provider.down["fake-b"] = 503
    bodies = fake.provider.record()
    down = [chat_line(f"fb-{i}", f"[[id:fb-{i}]] down {i}", model=CHAT_MODEL + ":fake-b") for i in range(5)]
    fine = [chat_line(f"ok-{i}", f"[[id:ok-{i}]] fine {i}", model=CHAT_MODEL + ":fake-a") for i in range(3)]
    # A fault script in the message travels with the fallback body, and the fake keys scripts by the raw
    # body: the fallback body (another model) starts its own script and fails the same way.
    scripted = [chat_line(f"sc-{i}", f"[[fault:503,503,503,503,503,503]] s {i}") for i in range(2)]
    lines = down + fine + scripted
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "--fallback", "fake-a", "--max-attempts", "2"],
                env_extra={"HFBATCH_RETRY_BASE": "0.01"})
    assert p.returncode == 3, p.stderr
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    assert_each_once(ids(lines), out, err)
    assert sorted(ids(out)) == sorted(ids(down + fine))
    assert sorted(ids(err)) == sorted(ids(scripted))
    assert all(e["response"]["status_code"] == 503 for e in err)
    sent = Counter(b["model"] for b in bodies)
    # down lines: 2 attempts on fake-b, then 1 on fake-a; scripted lines: 2 on auto, 2 on fake-a
    assert sent == Counter({CHAT_MODEL + ":fake-b": 10, CHAT_MODEL + ":fake-a": 8 + 4, CHAT_MODEL: 4}), sent
    hb = batch_from(p.stdout)["hfbatch"]
    assert hb["fallbacks"] == 5 + 2
    assert hb["providers"] == {"fake-a": 8}  # providers that answered 2xx
    assert fake.stats()["dup_ok"] == 0


# --------------------------------------------------------------------------- per-provider limits
