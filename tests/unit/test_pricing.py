"""pricing: price catalog (router, cache, file), per-request cost, ledger, budget gate. No network."""

from __future__ import annotations

import asyncio
import os
import random
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest

from hfbatch.cost.pricing import (
    Catalog,
    Price,
    ProviderInfo,
    iso,
    load_catalog,
    models_url,
    request_cost,
)
from hfbatch.cost.spend import Budget, CostLedger
from hfbatch.errors import UsageError
from hfbatch.summary import usage_tokens

CHAT, EMBED = "test-org/tiny-chat", "test-org/tiny-embed"
URL = "http://127.0.0.1:9/v1/models"


def fake_models(**extra: Any) -> dict[str, Any]:
    """The fake provider's /v1/models answer (fake-a 0.2/0.6, fake-b 0.1/0.3); `extra` merges per provider."""
    provs = [{"provider": p, "status": "live", "context_length": 8192, "pricing": {"input": i, "output": o},
              **extra.get(p, {})} for p, i, o in (("fake-a", 0.2, 0.6), ("fake-b", 0.1, 0.3))]
    return {"object": "list", "data": [
        {"id": CHAT, "object": "model", "providers": provs},
        {"id": EMBED, "object": "model", "providers": [{"provider": "hf-inference", "status": "live"}]}]}


def fake_catalog(**extra: Any) -> Catalog:
    return Catalog.from_models_json(fake_models(**extra), "router", 1_700_000_000)


# --------------------------------------------------------------------------- arithmetic and parsing


def test_request_cost_is_tokens_times_price_per_million() -> None:
    assert request_cost(Price(0.2, 0.6), 1000, 500) == 0.0005  # 0.0002 + 0.0003
    assert request_cost(Price(0.1, 0.3), 1_000_000, 1_000_000) == 0.4
    assert request_cost(Price(0.2, 0.6), 0, 0) == 0.0
    assert request_cost(None, 1000, 500) is None


def test_usage_tokens_reads_chat_responses_and_embeddings() -> None:
    assert usage_tokens({"usage": {"prompt_tokens": 12, "completion_tokens": 5}}) == (12, 5)
    assert usage_tokens({"usage": {"input_tokens": 7, "output_tokens": 3}}) == (7, 3)
    assert usage_tokens({"usage": {"prompt_tokens": 4, "total_tokens": 4}}) == (4, 0)
    assert usage_tokens({"no": "usage"}) == (0, 0) and usage_tokens([1]) == (0, 0)


def test_models_url() -> None:
    assert models_url("http://h:8000/v1/") == "http://h:8000/v1/models"
    assert models_url(None).endswith("/v1/models")


def test_catalog_parses_the_models_shape_in_order() -> None:
    obj = fake_models(**{"fake-b": {"throughput": 40.5, "first_token_latency_ms": 611}})
    obj["data"][0]["providers"] += [{"provider": "nopriced", "status": "error"}, {"no": "provider"}, "junk",
                                    {"provider": "halfpriced", "pricing": {"input": 1}}]
    obj["data"].append({"object": "model"})  # no id: skipped
    cat = Catalog.from_models_json(obj, "router", 5)
    assert [p.provider for p in cat.providers(CHAT)] == ["fake-a", "fake-b", "nopriced", "halfpriced"]
    assert cat.providers(CHAT)[1] == ProviderInfo("fake-b", Price(0.1, 0.3), 40.5, 611.0, "live")
    assert cat.providers(CHAT)[2] == ProviderInfo("nopriced", None, None, None, "error")
    assert cat.price(CHAT, "halfpriced") is None
    assert cat.providers(CHAT + ":fake-b") == cat.providers(CHAT + ":cheapest") == cat.providers(CHAT)
    assert cat.providers("other/model") == []
    assert (cat.source, cat.fetched_at, cat.notes) == ("router", 5, [])


def test_catalog_of_a_wrong_shape_is_empty_with_a_note() -> None:
    cat = Catalog.from_models_json({"error": "nope"}, "router", 1)
    assert cat.models == {} and cat.notes and "unknown" in cat.notes[0]


def test_to_json_round_trips() -> None:
    cat = fake_catalog(**{"fake-a": {"throughput": 3.0}})
    again = Catalog.from_models_json(orjson.loads(orjson.dumps(cat.to_json())), "cache", 1)
    assert again.models == cat.models


def test_price_lookup_and_suffixes() -> None:
    cat = fake_catalog()
    assert cat.price(CHAT, "fake-a") == Price(0.2, 0.6)
    assert cat.price(CHAT + ":fake-b", None) == Price(0.1, 0.3)  # pinned
    assert cat.price(CHAT + ":cheapest", None) == Price(0.1, 0.3)  # implied
    assert cat.price(CHAT, "unknown-prov") is None and cat.price(EMBED, "hf-inference") is None
    assert cat.split(CHAT + ":fake-a") == (CHAT, "fake-a") and cat.policy(CHAT + ":fake-a") == "pinned"
    assert [cat.policy(CHAT + s) for s in ("", ":fastest", ":cheapest", ":preferred")] == [
        "fastest", "fastest", "cheapest", "preferred"]
    listed = Catalog({"llama3:8b": [ProviderInfo("local", Price(0, 0), None, None, None)]}, "file")
    assert listed.split("llama3:8b") == ("llama3:8b", None) and listed.price("llama3:8b", None) == Price(0, 0)


# --------------------------------------------------------------------------- implied provider


def test_implied_provider_without_throughput() -> None:
    cat = fake_catalog()
    for model in (CHAT, CHAT + ":fastest"):
        prov, note = cat.implied_provider(model)
        assert prov == "fake-a" and note and "first listed" in note and model in note
    assert cat.implied_provider(CHAT + ":cheapest")[0] == "fake-b"
    prov, note = cat.implied_provider(CHAT + ":preferred")
    assert prov == "fake-a" and note and ":preferred" in note
    assert cat.implied_provider(CHAT + ":fake-b") == ("fake-b", None)
    prov, note = cat.implied_provider("nobody/model")
    assert prov is None and note and "not in the price list" in note


def test_implied_provider_fastest_uses_throughput_and_skips_errored() -> None:
    cat = fake_catalog(**{"fake-a": {"throughput": 10.0}, "fake-b": {"throughput": 30.0}})
    assert cat.implied_provider(CHAT)[0] == "fake-b" and cat.fastest(CHAT) == "fake-b"
    assert "highest throughput" in (cat.implied_provider(CHAT + ":fastest")[1] or "")
    cat = fake_catalog(**{"fake-a": {"throughput": 10.0}, "fake-b": {"throughput": 30.0, "status": "error"}})
    assert cat.implied_provider(CHAT)[0] == "fake-a"
    cat = fake_catalog(**{"fake-b": {"status": "error"}})
    assert cat.implied_provider(CHAT + ":cheapest")[0] == "fake-a"  # the live one


def test_cheapest_ignores_unpriced_and_breaks_ties_by_input_then_order() -> None:
    p = {"a": None, "b": Price(0.5, 0.3), "c": Price(0.2, 0.3), "d": Price(0.1, 0.9)}
    cat = Catalog({"m": [ProviderInfo(k, v, None, None, "live") for k, v in p.items()]}, "file")
    assert cat.implied_provider("m:cheapest")[0] == "c"
    cat = Catalog({"m": [ProviderInfo("a", None, None, None, None)]}, "file")
    prov, note = cat.implied_provider("m:cheapest")
    assert prov == "a" and note and "no provider lists a price" in note


# --------------------------------------------------------------------------- --prices FILE


def test_from_file_accepts_both_shapes(tmp_path: Path) -> None:
    f = tmp_path / "models.json"
    f.write_bytes(orjson.dumps(fake_models()))
    cat = Catalog.from_file(str(f))
    assert cat.source == "file" and cat.price(CHAT, "fake-b") == Price(0.1, 0.3) and str(f) in cat.notes[0]
    f.write_bytes(orjson.dumps({"my/model": {"vllm": {"input": 0.05, "output": 0.25, "throughput": 9}}}))
    cat = Catalog.from_file(str(f))
    assert cat.providers("my/model") == [ProviderInfo("vllm", Price(0.05, 0.25), 9.0, None, None)]


@pytest.mark.parametrize("content, words", [
    (b"{not json", "not a JSON"),
    (b"[1, 2]", "lists no models"),
    (b"{}", "lists no models"),
    (b'"a string"', "expected a /v1/models answer"),
    (b'{"data": 3}', "expected a /v1/models answer"),
    (b'{"m": {"p": {"input": 1}}}', "needs numbers"),
    (b'{"m": {"p": {"input": -1, "output": 2}}}', "needs numbers"),
    (b'{"m": {"p": {"input": true, "output": 2}}}', "needs numbers"),
    (b'{"m": 3}', "must map provider names"),
])
def test_from_file_rejects_bad_files_in_one_line(tmp_path: Path, content: bytes, words: str) -> None:
    f = tmp_path / "p.json"
    f.write_bytes(content)
    with pytest.raises(UsageError) as e:
        Catalog.from_file(str(f))
    assert words in str(e.value) and "\n" not in str(e.value) and str(f) in str(e.value)


def test_from_file_missing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        Catalog.from_file(str(tmp_path / "absent.json"))


# --------------------------------------------------------------------------- load_catalog


def returning(obj: Any, calls: list[str]) -> Any:
    async def get_json(url: str) -> Any:
        calls.append(url)
        return obj
    return get_json


def raising(exc: BaseException) -> Any:
    async def get_json(url: str) -> Any:
        raise exc
    return get_json


def test_load_catalog_fetches_and_caches_0600(tmp_path: Path) -> None:
    cache = tmp_path / "home" / "prices.json"
    calls: list[str] = []
    cat = asyncio.run(load_catalog(returning(fake_models(), calls), URL, cache, None))
    assert calls == [URL] and cat.source == "router" and cat.notes == []
    assert isinstance(cat.fetched_at, int) and cat.price(CHAT, "fake-a") == Price(0.2, 0.6)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    saved = orjson.loads(cache.read_bytes())
    assert saved["url"] == URL and saved["fetched_at"] == cat.fetched_at


def test_load_catalog_offline_uses_the_cache_and_says_so(tmp_path: Path) -> None:
    cache = tmp_path / "prices.json"
    first = asyncio.run(load_catalog(returning(fake_models(), []), URL, cache, None))
    for failure in (raising(OSError("Connection refused")), raising(TimeoutError()), returning({"x": 1}, [])):
        cat = asyncio.run(load_catalog(failure, URL, cache, None))
        assert cat.source == "cache" and cat.fetched_at == first.fetched_at
        assert cat.models == first.models
        assert cat.notes[0].startswith(f"offline: prices from the cache fetched at {iso(first.fetched_at)}")
    assert "Connection refused" in asyncio.run(load_catalog(raising(OSError("Connection refused")), URL, cache,
                                                            None)).notes[0]


def test_load_catalog_without_cache_never_raises(tmp_path: Path) -> None:
    cat = asyncio.run(load_catalog(raising(OSError("down")), URL, tmp_path / "prices.json", None))
    assert cat.source == "none" and cat.models == {} and "nothing is cached" in cat.notes[0]
    # a cache written for another server is not used
    asyncio.run(load_catalog(returning(fake_models(), []), "http://other/v1/models", tmp_path / "p.json", None))
    cat = asyncio.run(load_catalog(raising(OSError("down")), URL, tmp_path / "p.json", None))
    assert cat.source == "none"


def test_load_catalog_prices_file_wins(tmp_path: Path) -> None:
    f = tmp_path / "prices.json"
    f.write_bytes(b'{"m": {"p": {"input": 1, "output": 2}}}')
    calls: list[str] = []
    cat = asyncio.run(load_catalog(returning(fake_models(), calls), URL, tmp_path / "cache.json", str(f)))
    assert calls == [] and cat.source == "file" and cat.price("m", "p") == Price(1, 2)
    assert not (tmp_path / "cache.json").exists()


# --------------------------------------------------------------------------- ledger


def test_ledger_resolves_header_then_suffix_then_policy() -> None:
    led = CostLedger(fake_catalog())
    assert led.add(CHAT, "fake-a", 1000, 500) == 0.0005
    assert led.add(CHAT + ":fake-b", None, 1000, 500) == pytest.approx(0.00025)
    assert led.add(CHAT + ":cheapest", None, 1000, 500) == pytest.approx(0.00025)  # implied fake-b
    assert led.add(CHAT, None, 1000, 500) == 0.0005  # implied fake-a (first listed)
    led.add(CHAT, None, 1000, 500)
    s = led.summary()
    assert s["by_model"] == {CHAT: {
        "fake-a": {"requests": 3, "input_tokens": 3000, "output_tokens": 1500, "cost_usd": 0.0015},
        "fake-b": {"requests": 2, "input_tokens": 2000, "output_tokens": 1000, "cost_usd": 0.0005}}}
    assert s["estimated_cost_usd"] == 0.002 and led.spent == pytest.approx(0.002)
    assert (s["currency"], s["is_estimate"], s["unpriced_requests"]) == ("USD", True, 0)
    assert (s["price_source"], s["prices_fetched_at"]) == ("router", 1_700_000_000)
    implied = [n for n in s["notes"] if "provider not reported" in n]
    assert len(implied) == 2 and any("assumed fake-a" in n for n in implied)  # once per model spelling
    assert s["savings"] == {"vs_most_expensive_usd": 0.0005, "above_cheapest_usd": 0.00075}


def test_ledger_unknown_price_is_null_never_invented() -> None:
    led = CostLedger(fake_catalog())
    assert led.add(EMBED, "hf-inference", 10, 0) is None
    s = led.summary()
    assert s["estimated_cost_usd"] is None and s["unpriced_requests"] == 1
    assert s["by_model"][EMBED]["hf-inference"]["cost_usd"] is None
    assert any("compute time" in n for n in s["notes"])
    assert led.add(CHAT, "fake-b", 1000, 0) == pytest.approx(0.0001)
    assert led.add("nobody/model", None, 5, 5) is None
    s = led.summary()
    assert s["estimated_cost_usd"] == 0.0001 and s["unpriced_requests"] == 2
    assert s["by_model"]["nobody/model"]["unknown"]["cost_usd"] is None
    assert any(n.startswith("2 request(s) have no known price") for n in s["notes"])


def test_empty_ledger_costs_zero() -> None:
    assert CostLedger(Catalog({}, "none")).summary()["estimated_cost_usd"] == 0.0


def test_worst_case() -> None:
    led = CostLedger(fake_catalog())
    assert led.worst_case(CHAT, 1000, 500) == 0.0005  # max over providers: fake-a
    assert led.worst_case(CHAT + ":cheapest", 1000, 500) == 0.0005  # not pinned: still the max
    assert led.worst_case(CHAT + ":fake-b", 1000, 500) == pytest.approx(0.00025)
    assert led.worst_case(EMBED, 10, 0) is None and led.worst_case("nobody/m", 1, 1) is None


def test_ledger_load_resumes_spend() -> None:
    led = CostLedger(fake_catalog())
    led.add(CHAT, "fake-a", 1000, 500)
    led.add(EMBED, "hf-inference", 3, 0)
    again = CostLedger(fake_catalog())
    again.load(orjson.loads(orjson.dumps(led.summary())))
    assert again.spent == 0.0005 and again.summary()["by_model"] == led.summary()["by_model"]
    again.add(CHAT, "fake-a", 1000, 500)
    assert again.spent == 0.001 and again.summary()["unpriced_requests"] == 1
    assert sum("no known price" in n for n in again.summary()["notes"]) == 1


# --------------------------------------------------------------------------- budget


def test_budget_reserves_and_refuses() -> None:
    led = CostLedger(fake_catalog())
    b = Budget(1.0, led)
    assert b.try_reserve(0.5) and b.try_reserve(0.25) and b.try_reserve(0.25)
    assert not b.try_reserve(0.125) and b.reserved == 1.0  # refused: nothing reserved
    led.spent += 0.25  # a request reserved at 0.5 cost 0.25
    b.release(0.5)
    assert b.reserved == 0.5  # 0.25 left: 0.5 does not fit now (but will once the rest settles), 0.25 does
    assert not b.try_reserve(0.5) and b.can_ever_fit(0.5) and b.try_reserve(0.25)
    b.release(0.25)
    b.release(0.25)
    b.release(0.25)  # more releases than reservations are ignored
    assert b.reserved == 0.0 and not b.can_ever_fit(0.875)


def test_budget_refuses_unbounded_requests_and_the_run_says_why() -> None:
    b = Budget(10.0, CostLedger(fake_catalog()))
    assert not b.try_reserve(None) and not b.try_reserve(None) and not b.can_ever_fit(None)
    assert b.reserved == 0.0
    # What the user reads: the run stops (the HTTP engine's Accounting.reserve) with the reason, for a model
    # with no price.
    from hfbatch.engines.http import Accounting
    from hfbatch.limits import StopControl
    from hfbatch.models import Request

    stop = StopControl()
    hooks = Accounting(b.ledger, stop, server="router", budget=b)
    req = Request(1, "c", "/v1/chat/completions", {"model": "org/unpriced", "messages": []}, "org/unpriced")
    route = type("R", (), {"body": None, "model": None})()
    assert asyncio.run(hooks.reserve(req, route)) is None
    assert stop.reason == "budget" and stop.message is not None and "cannot be bounded" in stop.message


def test_budget_never_lets_spent_plus_reserved_exceed_the_limit() -> None:
    rng = random.Random(1234)
    cat = fake_catalog()
    for _ in range(50):
        led = CostLedger(cat)
        limit = rng.uniform(0.0001, 0.01)
        b = Budget(limit, led)
        inflight: list[tuple[float, int, int]] = []
        for _ in range(400):
            if inflight and rng.random() < 0.45:
                reserved, inp, out = inflight.pop(rng.randrange(len(inflight)))
                answered = rng.random() < 0.8
                if answered:  # actual usage never exceeds what was reserved for
                    led.add(CHAT, rng.choice(["fake-a", "fake-b", None]), rng.randint(0, inp),
                            rng.randint(0, out))
                b.release(reserved)
            else:
                inp, out = rng.randint(0, 5000), rng.randint(0, 2000)
                wc = led.worst_case(CHAT, inp, out)
                if b.try_reserve(wc):
                    assert wc is not None
                    inflight.append((wc, inp, out))
            assert led.spent + b.reserved <= limit * (1 + 1e-9)
        assert led.spent <= limit * (1 + 1e-9)


def test_load_catalog_lets_a_bug_through(tmp_path: Path) -> None:
    """Only a failed fetch (the Transport's OSError) falls back to the cache: a bug is not an "offline" note."""
    cache = tmp_path / "prices.json"
    asyncio.run(load_catalog(returning(fake_models(), []), URL, cache, None))
    with pytest.raises(AttributeError):
        asyncio.run(load_catalog(raising(AttributeError("'NoneType' object has no attribute 'get'")), URL, cache,
                                 None))

