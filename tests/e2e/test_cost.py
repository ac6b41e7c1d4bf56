"""End to end (issue 5): cost = usage x the serving provider's price, `estimate` and `--dry-run` send nothing,
--budget stops early and resumes, prices from the cache when /v1/models is down, --prices FILE."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
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

from hfbatch.testing.fake_provider import FakeConfig, FakeProvider, ThreadedFakeProvider, _chat

PRICES = {"fake-a": (0.2, 0.6), "fake-b": (0.1, 0.3)}  # USD per 1M tokens, as the fake's /v1/models lists
CHAT_URL = "/v1/chat/completions"
# Reported USD figures are rounded to 10 decimals (pricing.round_usd): compare to that precision, and
# relatively to 1e-9 beyond it.
USD_ABS = 5.1e-11


def usd(expected: float) -> Any:
    return pytest.approx(expected, rel=1e-9, abs=USD_ABS)


def provider_of(model: str) -> str:
    """Who serves a line: its pinned suffix, else fake-b (the fake's answer for auto-routed models)."""
    base, _, suffix = model.rpartition(":")
    return suffix if base and suffix not in ("fastest", "cheapest", "preferred") else "fake-b"


def line_cost(obj: dict[str, Any], model: str, prices: dict[str, tuple[float, float]] = PRICES) -> float:
    u = obj["response"]["body"]["usage"]
    pin, pout = prices[provider_of(model)]
    return (u["prompt_tokens"] * pin + u["completion_tokens"] * pout) / 1_000_000


def mixed_lines(n: int, tag: str = "m", pad: int = 400) -> list[dict[str, Any]]:
    """Lines alternating: pinned to fake-a, auto-routed (fake-b), pinned to fake-b; prompts long enough that
    costs are well above the reporting precision."""
    models = [CHAT_MODEL + ":fake-a", CHAT_MODEL, CHAT_MODEL + ":fake-b"]
    return [chat_line(f"{tag}-{i:03d}", f"[[id:{tag}-{i:03d}]] question {i} " + "x" * (pad + 7 * i),
                      model=models[i % 3], max_tokens=8) for i in range(n)]


# --------------------------------------------------------------------------- cost of a run


def test_summary_cost_is_usage_times_the_serving_providers_price(tmp_path: Path, make_fake, run_cli) -> None:
    make_fake(latency=0.01)
    lines = mixed_lines(30)
    model_of = {line["custom_id"]: line["body"]["model"] for line in lines}
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q"])
    assert p.returncode == 0, p.stderr
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert_each_once(ids(lines), out)

    expected: dict[str, dict[str, Any]] = {}
    for obj in out:
        check_output_line(obj, CHAT_URL)
        prov = provider_of(model_of[obj["custom_id"]])
        u = obj["response"]["body"]["usage"]
        row = expected.setdefault(prov, {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
        row["requests"] += 1
        row["input_tokens"] += u["prompt_tokens"]
        row["output_tokens"] += u["completion_tokens"]
        row["cost_usd"] += line_cost(obj, model_of[obj["custom_id"]])
    total = sum(r["cost_usd"] for r in expected.values())

    batch = batch_from(p.stdout)
    hb = batch["hfbatch"]
    assert hb["estimated_cost_usd"] == usd(total)
    cost = hb["cost"]
    assert cost["estimated_cost_usd"] == usd(total)
    assert cost["currency"] == "USD" and cost["is_estimate"] is True
    assert cost["price_source"] == "router" and isinstance(cost["prices_fetched_at"], int)
    assert cost["unpriced_requests"] == 0
    assert set(cost["by_model"]) == {CHAT_MODEL}
    by = cost["by_model"][CHAT_MODEL]
    assert set(by) == {"fake-a", "fake-b"}
    for prov, row in expected.items():
        got = by[prov]
        assert (got["requests"], got["input_tokens"], got["output_tokens"]) == (
            row["requests"], row["input_tokens"], row["output_tokens"]), (prov, got, row)
        assert got["cost_usd"] == usd(row["cost_usd"]), (prov, got, row)
    assert sum(r["cost_usd"] for r in by.values()) == usd(total)
    assert batch["usage"]["input_tokens"] == sum(r["input_tokens"] for r in expected.values())
    assert batch["usage"]["output_tokens"] == sum(r["output_tokens"] for r in expected.values())
    assert hb["providers"] == {"fake-a": 10, "fake-b": 20}
    # Savings against the dearest / above the cheapest provider, for the same tokens.
    dearest = sum((r["input_tokens"] * 0.2 + r["output_tokens"] * 0.6) / 1e6 for r in expected.values())
    cheapest = sum((r["input_tokens"] * 0.1 + r["output_tokens"] * 0.3) / 1e6 for r in expected.values())
    assert cost["savings"]["vs_most_expensive_usd"] == usd(dearest - total)
    assert cost["savings"]["above_cheapest_usd"] == usd(total - cheapest)


# --------------------------------------------------------------------------- estimate and --dry-run


def check_estimate(est: dict[str, Any], lines: list[dict[str, Any]], path: str) -> None:
    assert est["object"] == "hfbatch.estimate" and est["is_estimate"] is True
    assert est["input_file"] == path
    assert est["requests"] == len(lines) and est["invalid_lines"] == 0 and est["first_errors"] == []
    assert est["endpoints"] == {CHAT_URL: len(lines)}
    assert est["price_source"] == "router" and isinstance(est["prices_fetched_at"], int)
    models = est["models"]
    assert set(models) == {CHAT_MODEL, CHAT_MODEL + ":fake-a", CHAT_MODEL + ":fake-b"}
    auto = models[CHAT_MODEL]
    assert auto["policy"] == "fastest" and auto["requests"] == sum(
        1 for ln in lines if ln["body"]["model"] == CHAT_MODEL)
    # Both providers priced, cheapest first, with their cost for this model's tokens.
    assert [r["provider"] for r in auto["providers"]] == ["fake-b", "fake-a"]
    for row in auto["providers"]:
        pin, pout = PRICES[row["provider"]]
        assert (row["input_price"], row["output_price"]) == (pin, pout)
        assert row["cost_usd"] == usd((auto["input_tokens"] * pin + auto["max_output_tokens"] * pout) / 1e6)
        assert set(row) == {"provider", "input_price", "output_price", "cost_usd", "fastest", "status"}
    costs = [r["cost_usd"] for r in auto["providers"]]
    assert costs == sorted(costs) and costs[0] < costs[1]
    assert auto["max_output_tokens"] == 8 * auto["requests"]  # bounded by each body's max_tokens
    # A pinned model lists only its provider.
    assert [r["provider"] for r in models[CHAT_MODEL + ":fake-a"]["providers"]] == ["fake-a"]
    assert models[CHAT_MODEL + ":fake-a"]["policy"] == "pinned"
    assert models[CHAT_MODEL + ":fake-a"]["expected_provider"] == "fake-a"
    t = est["total"]
    assert set(t) == {"cheapest_usd", "most_expensive_usd", "expected_usd", "savings_usd", "priced_requests",
                      "unpriced_requests"}
    assert t["priced_requests"] == len(lines) and t["unpriced_requests"] == 0
    assert t["cheapest_usd"] < t["most_expensive_usd"]
    assert t["savings_usd"] == usd(t["most_expensive_usd"] - t["cheapest_usd"])
    assert t["cheapest_usd"] <= t["expected_usd"] <= t["most_expensive_usd"]


def test_estimate_sends_no_inference_request(tmp_path: Path, make_fake, run_cli) -> None:
    fake = make_fake()
    lines = mixed_lines(12, pad=40)
    write_jsonl(tmp_path / "in.jsonl", lines)
    # No token needed: the price list is public.
    p = run_cli(["in.jsonl", "--json"], command="estimate", env_extra={"HF_TOKEN": None})
    assert p.returncode == 0, p.stderr
    est = json.loads(p.stdout)
    check_estimate(est, lines, "in.jsonl")
    st = fake.stats()
    assert st["requests"] == 0 and st["paths"] == {"/v1/models": 1}, st


def test_submit_dry_run_sends_nothing_and_writes_no_file(tmp_path: Path, make_fake, run_cli) -> None:
    fake = make_fake()
    lines = mixed_lines(9, pad=40)
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "--dry-run"])
    assert p.returncode == 0, p.stderr
    check_estimate(json.loads(p.stdout), lines, "in.jsonl")
    assert fake.stats()["requests"] == 0
    # No output, error or summary file (_home is the test's HFBATCH_HOME / HF_HOME).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_home", "in.jsonl"]
    batches = tmp_path / "_home" / "hfbatch" / "batches"
    assert not batches.exists() or not any(batches.iterdir()), "a dry run registered a batch"


# --------------------------------------------------------------------------- --budget


def test_budget_stops_early_and_a_larger_budget_finishes_the_rest(tmp_path: Path, make_fake, run_cli) -> None:
    fake = make_fake(latency=0.02)
    lines = mixed_lines(30, tag="bud")
    model_of = {line["custom_id"]: line["body"]["model"] for line in lines}
    write_jsonl(tmp_path / "in.jsonl", lines)

    # The full cost: the fake's own usage rule for each body (no run needed; checked against the answers below).
    full = sum(line_cost({"response": {"body": _chat(ln["body"], CHAT_MODEL, 0)[1]}}, ln["body"]["model"])
               for ln in lines)
    budget = round(0.3 * full, 12)
    args = ["in.jsonl", "-q", "-c", "4"]
    p = run_cli([*args, "--budget", repr(budget)])
    assert p.returncode == 5, (p.returncode, p.stderr)
    assert re.search(r"budget reached: estimated spend \$\d+\.\d+ of \$", p.stderr), p.stderr
    assert "Rerun the same command with a larger --budget" in p.stderr, p.stderr
    batch = batch_from(p.stdout)
    hb = batch["hfbatch"]
    assert hb["state"] == "interrupted" and hb["stop_reason"] == "budget"
    spent = hb["estimated_cost_usd"]
    assert 0 < spent <= budget, (spent, budget)
    out1 = read_jsonl(tmp_path / "in.output.jsonl")
    err1 = read_jsonl(tmp_path / "in.errors.jsonl")
    assert err1 == [] and 0 < len(out1) < len(lines)
    assert spent == usd(sum(line_cost(o, model_of[o["custom_id"]]) for o in out1))
    st = fake.stats()
    assert st["requests"] == st["ok"] == len(out1), st  # nothing sent beyond what was answered
    assert hb["unsent"] == len(lines) - len(out1)
    assert batch["request_counts"]["completed"] == len(out1)

    # The same command with a budget that fits everything: only the rest is sent.
    p = run_cli([*args, "--budget", repr(10 * full)])
    assert p.returncode == 0, p.stderr
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert_each_once(ids(lines), out)
    st = fake.stats()
    assert st["dup_ok"] == 0 and st["requests"] == len(lines), st
    assert sum(line_cost(o, model_of[o["custom_id"]]) for o in out) == usd(full)
    hb = batch_from(p.stdout)["hfbatch"]
    assert hb["state"] == "finished"
    assert hb["estimated_cost_usd"] == usd(full)  # the spend of both runs, not just the second
    assert hb["estimated_cost_usd"] <= 10 * full


# --------------------------------------------------------------------------- offline prices and --prices


class CatalogSwitchFake(FakeProvider):
    """The fake router, whose /v1/models can be taken down while inference keeps working."""

    models_down = False

    async def _models(self, request: web.Request) -> web.Response:
        if self.models_down:
            self.stats["paths"]["/v1/models"] = self.stats["paths"].get("/v1/models", 0) + 1
            return web.Response(status=503, text="catalog unavailable")
        return await super()._models(request)


def test_prices_come_from_the_cache_when_the_catalog_is_down(tmp_path: Path, _fakes, run_cli) -> None:
    switch = CatalogSwitchFake(FakeConfig(latency=0.01))
    fake = ThreadedFakeProvider(provider=switch)
    _fakes.append(fake.start())
    lines = mixed_lines(6, pad=40)
    model_of = {line["custom_id"]: line["body"]["model"] for line in lines}
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q"])
    assert p.returncode == 0, p.stderr
    first = batch_from(p.stdout)["hfbatch"]["cost"]
    assert first["price_source"] == "router"
    cached = tmp_path / "_home" / "hfbatch" / "prices.json"
    assert cached.exists()

    switch.models_down = True
    p = run_cli(["in.jsonl", "-q", "-o", "o2.jsonl", "-e", "e2.jsonl"])
    assert p.returncode == 0, p.stderr
    cost = batch_from(p.stdout)["hfbatch"]["cost"]
    assert cost["price_source"] == "cache"
    assert cost["prices_fetched_at"] == first["prices_fetched_at"]
    assert any(n.startswith("offline: prices from the cache fetched at") for n in cost["notes"]), cost["notes"]
    out = read_jsonl(tmp_path / "o2.jsonl")
    assert cost["estimated_cost_usd"] == usd(sum(line_cost(o, model_of[o["custom_id"]]) for o in out))



def test_prices_file_and_unknown_prices(tmp_path: Path, make_fake, run_cli) -> None:
    fake = make_fake(latency=0.01)
    lines = mixed_lines(9, pad=40)
    model_of = {line["custom_id"]: line["body"]["model"] for line in lines}
    write_jsonl(tmp_path / "in.jsonl", lines)
    # Our own price for fake-a; none for fake-b.
    mine = {"fake-a": (1.5, 2.5)}
    (tmp_path / "prices.json").write_text(json.dumps(
        {CHAT_MODEL: {"fake-a": {"input": 1.5, "output": 2.5}}}))
    p = run_cli(["in.jsonl", "-q", "--prices", "prices.json"])
    assert p.returncode == 0, p.stderr
    assert "/v1/models" not in fake.stats()["paths"]  # the file replaces the price list
    out = read_jsonl(tmp_path / "in.output.jsonl")
    cost = batch_from(p.stdout)["hfbatch"]["cost"]
    assert cost["price_source"] == "file" and cost["prices_fetched_at"] is None
    on_a = [o for o in out if provider_of(model_of[o["custom_id"]]) == "fake-a"]
    assert cost["estimated_cost_usd"] == usd(sum(line_cost(o, model_of[o["custom_id"]], mine) for o in on_a))
    by = cost["by_model"][CHAT_MODEL]
    assert by["fake-b"]["cost_usd"] is None and by["fake-b"]["requests"] == 6
    assert by["fake-a"]["cost_usd"] == cost["estimated_cost_usd"]
    assert cost["unpriced_requests"] == 6
    notes = " | ".join(cost["notes"])
    assert "prices from prices.json" in notes
    assert "fake-b: no price" in notes and "6 request(s) have no known price" in notes

