"""End to end (issue 4): throughput under a hidden cap, RPM pacing, dedupe, the response cache, routing,
fallback, per-provider limits and --max-tokens, against the local fake router."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
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

from hfbatch.testing.fake_provider import ThreadedFakeProvider

CHAT_URL = "/v1/chat/completions"


def record_bodies(fake: ThreadedFakeProvider, fail: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Spy on the fake: every inference body it receives is appended to the returned list (in arrival
    order). `fail` {provider suffix: status} answers every request pinned to that provider with the status
    (a provider that is down), whatever its body. Test-side only: the fake calls self._infer per request."""
    prov = fake.provider
    original = prov._infer
    seen: list[dict[str, Any]] = []

    async def spy(request: Any, builder: Any, hf: bool) -> Any:
        raw = await request.read()  # aiohttp keeps the body: the real handler reads it again
        body = json.loads(raw) if raw else None
        seen.append(body)
        model = body.get("model", "") if isinstance(body, dict) else ""
        for suffix, status in (fail or {}).items():
            if model.endswith(":" + suffix):
                st = prov.stats
                st["requests"] += 1
                st["providers"][suffix] = st["providers"].get(suffix, 0) + 1
                return prov._status(status, {"x-inference-provider": suffix})
        return await original(request, builder, hf)

    prov._infer = spy  # type: ignore[method-assign]
    return seen


def echo_of(obj: dict[str, Any]) -> str:
    return obj["response"]["body"]["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------- hidden cap


def test_hidden_cap_adapts_and_keeps_throughput(tmp_path: Path, make_fake, run_cli) -> None:
    """A provider that silently allows 40 in flight (429 above): -c 200 must shrink to it, not hammer it.

    Acceptance: every request ends once, at most 30% extra HTTP requests, throughput >= 70% of what the
    cap allows (40 / latency requests per second).

    Margin (documented): on 2 cores shared with other test workers, the client process and the in-process
    fake cannot move the requests the cap allows even when the client is told the cap: at 0.05 s latency
    (800/s allowed) a `-c 40 --no-adapt` client reached 320-530/s here, and the ratio to it swung from 0.66
    to 0.98 with the load. So the latency is 0.1 s (400/s allowed), where the machine matters less, and
    "what the cap allows" is the lower of 40 / latency and what a client that knows the cap (-c 40
    --no-adapt, same file, same fake) achieves here, measured right after. Elapsed time is the summary's
    elapsed_seconds, nothing subtracted, for both runs.
    """
    latency, cap, n = 0.1, 40, 1000
    fake = make_fake(latency=latency, max_inflight=cap, retry_after="0")
    lines = [chat_line(f"cap-{i:04d}", f"[[id:cap-{i:04d}]] q {i}") for i in range(n)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "-c", "200"], timeout=60)
    assert p.returncode == 0, p.stderr
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert_each_once(ids(lines), out)
    assert read_jsonl(tmp_path / "in.errors.jsonl") == []
    st = fake.stats()
    assert st["dup_ok"] == 0 and st["distinct_ok"] == n
    assert st["requests"] <= 1.3 * n, f"{st['requests']} HTTP requests for {n} lines ({st['s429']} were 429)"
    hb = batch_from(p.stdout)["hfbatch"]
    achieved = n / hb["elapsed_seconds"]
    # The limit shrank below -c 200 (slow start alone would have grown it to 200), to at most the cap plus
    # the overshoot that finds it.
    assert hb["concurrency"] and all(1 <= v < 200 for v in hb["concurrency"].values()), hb["concurrency"]
    assert max(hb["concurrency"].values()) <= 1.5 * cap, hb["concurrency"]

    fake.reset_stats()
    b = run_cli(["in.jsonl", "-q", "-c", str(cap), "--no-adapt", "-o", "base.out.jsonl", "-e", "base.err.jsonl"],
                timeout=60)
    assert b.returncode == 0, b.stderr
    assert fake.stats()["s429"] == 0
    baseline = n / batch_from(b.stdout)["hfbatch"]["elapsed_seconds"]
    allowed = min(cap / latency, baseline)
    assert achieved >= 0.7 * allowed, (
        f"{achieved:.0f} req/s is below 70% of {allowed:.0f} req/s (cap {cap / latency:.0f}/s, a client that "
        f"knows the cap: {baseline:.0f}/s); {st['s429']} 429s, final limits {hb['concurrency']}")


def test_hidden_cap_on_your_own_server_costs_one_overshoot(tmp_path: Path, make_fake, run_cli) -> None:
    # With --base-url adaptive concurrency starts at -c (200), so the first wave overshoots a cap of 40
    # once; throttles lower the limit before their slots are handed on and clamp it to what the server
    # kept, so the whole batch still costs at most 1.3x the requests.
    n, cap = 1000, 40
    fake = make_fake(latency=0.05, max_inflight=cap, retry_after="0")
    lines = [chat_line(f"own-{i:04d}", f"[[id:own-{i:04d}]] q {i}") for i in range(n)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "-c", "200", "--base-url", fake.url + "/v1"], timeout=60)
    assert p.returncode == 0, p.stderr
    assert_each_once(ids(lines), read_jsonl(tmp_path / "in.output.jsonl"))
    st = fake.stats()
    assert st["dup_ok"] == 0 and st["distinct_ok"] == n
    assert st["requests"] <= 1.3 * n, f"{st['requests']} HTTP requests for {n} lines ({st['s429']} were 429)"
    assert max(batch_from(p.stdout)["hfbatch"]["concurrency"].values()) <= 1.5 * cap


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


def test_rpm_paces_requests_evenly(tmp_path: Path, make_fake, run_cli) -> None:
    fake = make_fake(latency=0.01)
    bodies = record_bodies(fake)
    lines = [chat_line(f"rpm-{i:02d}", f"[[id:rpm-{i:02d}]] r {i}") for i in range(40)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "-c", "40", "--rpm", "600"], timeout=30)
    assert p.returncode == 0, p.stderr
    assert_each_once(ids(lines), read_jsonl(tmp_path / "in.output.jsonl"))
    hb = batch_from(p.stdout)["hfbatch"]
    # 600/min = 10/s: 40 requests take about 4 s (39 gaps of 0.1 s), not one burst.
    assert 3.2 <= hb["elapsed_seconds"] <= 6.0, hb["elapsed_seconds"]
    assert len(bodies) == 40 and fake.stats()["requests"] == 40
    assert fake.stats()["max_inflight"] <= 4  # spread out: never many at once with 10 ms answers


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
    bodies = record_bodies(fake)
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
    bodies = record_bodies(fake, fail={"fake-b": 503})
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


def test_a_throttled_provider_does_not_slow_the_others(tmp_path: Path, make_fake, run_cli) -> None:
    # Every fake-a request is answered 429 three times first (Retry-After 0.3 s); fake-b never throttles.
    fake = make_fake(latency=0.05, retry_after="0.3")
    lines: list[dict[str, Any]] = []
    for i in range(120):
        if i % 3 == 0:
            lines.append(chat_line(f"a-{i:03d}", f"[[fault:429,429,429,ok]] [[id:a-{i}]] a {i}",
                                   model=CHAT_MODEL + ":fake-a"))
        else:
            lines.append(chat_line(f"b-{i:03d}", f"[[id:b-{i}]] b {i}", model=CHAT_MODEL + ":fake-b"))
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "-c", "32"], env_extra={"HFBATCH_RETRY_BASE": "0.01"}, timeout=60)
    assert p.returncode == 0, p.stderr
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert_each_once(ids(lines), out)
    hb = batch_from(p.stdout)["hfbatch"]
    conc = hb["concurrency"]
    assert conc["fake-b"] == 32, conc  # never throttled: stays at its maximum (-c)
    assert conc["fake-a"] < 32 * 0.7, conc  # shrank
    # The output file is in completion order: every fake-b line is done before the first fake-a line
    # (which needs three Retry-After waits of 0.3 s).
    order = [o["custom_id"][0] for o in out]
    assert order.index("a") >= 80, "".join(order)
    st = fake.stats()
    assert st["providers"]["fake-a"] == 40 * 4 and st["providers"]["fake-b"] == 80
    assert st["dup_ok"] == 0


def _first_wave_peak(fake: ThreadedFakeProvider, proc: Any, latency: float) -> int:
    """The most requests in flight before the first answer could have come back."""
    deadline = time.monotonic() + 30
    while fake.stats()["requests"] == 0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    first = time.monotonic()
    peak = 0
    while time.monotonic() < first + latency * 0.8:
        peak = max(peak, fake.stats()["inflight"])
        time.sleep(0.01)
    return peak


def test_slow_start_on_the_router_full_concurrency_on_your_own_server(tmp_path: Path, make_fake,
                                                                      popen_cli) -> None:
    # Router: shared providers with unknown limits, AIMD starts at 64. --base-url: the user's server,
    # -c is their number for it, so the first wave is all of -c (a 429/503 would still shrink it).
    latency = 1.5
    fake = make_fake(latency=latency)
    lines = [chat_line(f"w{i:03d}", f"[[id:w{i}]] n {i}") for i in range(100)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    router = popen_cli(["in.jsonl", "-q", "-c", "100"])
    assert _first_wave_peak(fake, router, latency) == 64
    assert router.wait(timeout=60) == 0
    fake.reset_stats()
    own = popen_cli(["in.jsonl", "-q", "-c", "100", "--base-url", fake.url + "/v1", "-o", "own.jsonl",
                     "-e", "own.errors.jsonl"])
    assert _first_wave_peak(fake, own, latency) == 100
    assert own.wait(timeout=60) == 0
    assert len(read_jsonl(tmp_path / "own.jsonl")) == 100
