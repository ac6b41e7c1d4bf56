"""estimate: token estimates per request, local tokenizer lookup, whole-file cost estimate, table. No network."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path
from typing import Any

import orjson
import pytest

from hfbatch.cost.estimate import (
    DEFAULT_MAX_OUTPUT,
    estimate_file,
    estimate_tokens,
    find_local_tokenizer,
)
from hfbatch.cost.pricing import Catalog
from hfbatch.errors import UsageError

CHAT, EMBED = "test-org/tiny-chat", "test-org/tiny-embed"
FAKE_MODELS = {"object": "list", "data": [
    {"id": CHAT, "object": "model", "providers": [
        {"provider": p, "status": "live", "context_length": 8192, "pricing": {"input": i, "output": o}}
        for p, i, o in (("fake-a", 0.2, 0.6), ("fake-b", 0.1, 0.3))]},
    {"id": EMBED, "object": "model", "providers": [{"provider": "hf-inference", "status": "live"}]}]}
OVERHEAD_ONE_MESSAGE = 3 + 4


def chat(text: str, **body: Any) -> dict[str, Any]:
    return {"model": CHAT, "messages": [{"role": "user", "content": text}], **body}


def line(cid: str, url: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}).encode()


# --------------------------------------------------------------------------- estimate_tokens


def test_chat_chars_over_four_plus_template_and_output_bounds() -> None:
    url = "/v1/chat/completions"
    assert estimate_tokens(chat("abcdefgh"), url) == (2 + OVERHEAD_ONE_MESSAGE, DEFAULT_MAX_OUTPUT)
    assert estimate_tokens(chat("abcdefghi", max_tokens=100), url) == (3 + OVERHEAD_ONE_MESSAGE, 100)
    assert estimate_tokens(chat("", max_tokens=10, max_completion_tokens=40), url)[1] == 40  # the largest
    assert estimate_tokens(chat("x", max_tokens=10, n=3), url)[1] == 30
    assert estimate_tokens(chat("x", max_tokens=True), url)[1] == DEFAULT_MAX_OUTPUT  # not a number
    two = {"model": CHAT, "messages": [{"role": "system", "content": "abcd"},
                                       {"role": "user", "content": [{"type": "text", "text": "efgh"},
                                                                    {"type": "image_url", "image_url": {"url": "u"}}]}]}
    assert estimate_tokens(two, url)[0] == 2 + 3 + 2 * 4  # 8 chars; the image is not counted


def test_chat_counts_tools_and_tool_call_arguments() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = chat("abcd", tools=tools)
    assert estimate_tokens(body, "/v1/chat/completions")[0] == (4 + len(json.dumps(tools, separators=(",", ":")))
                                                                + 3) // 4 + 7
    call = {"model": CHAT, "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "abcdefgh"}}]}]}
    assert estimate_tokens(call, "/v1/chat/completions")[0] == 2 + 7


def test_other_endpoints() -> None:
    assert estimate_tokens({"model": EMBED, "input": "abcdefgh"}, "/v1/embeddings") == (2, 0)
    assert estimate_tokens({"model": EMBED, "input": ["abcd", "abcd"]}, "/v1/embeddings") == (2, 0)
    assert estimate_tokens({"model": EMBED, "input": [1, 2, 3]}, "/v1/embeddings") == (3, 0)  # token ids
    assert estimate_tokens({"model": EMBED, "input": [[1, 2], [3]]}, "/v1/embeddings") == (3, 0)
    assert estimate_tokens({"model": CHAT, "prompt": "abcd"}, "/v1/completions") == (1, 16)
    body = {"model": CHAT, "instructions": "abcd", "input": "abcdefgh", "max_output_tokens": 64}
    assert estimate_tokens(body, "/v1/responses") == (3 + 7, 64)
    assert estimate_tokens({"model": CHAT, "input": "abcd"}, "/v1/responses")[1] == DEFAULT_MAX_OUTPUT
    assert estimate_tokens({"model": "m", "text_1": "abcd", "text_2": "abcd"}, "/score") == (2, 0)
    assert estimate_tokens({"model": "m", "query": "abcd", "documents": ["abcd"]}, "/v1/rerank") == (2, 0)


def test_tokenizer_and_conservative_counts() -> None:
    words = chat("one two three", max_tokens=5)
    assert estimate_tokens(words, "/v1/chat/completions", lambda s: len(s.split())) == (3 + 7, 5)
    assert estimate_tokens(chat("héllo"), "/v1/chat/completions", conservative=True)[0] == 6 + 7  # UTF-8 bytes


def test_deep_nesting_is_bounded() -> None:
    v: Any = "abcd"
    for _ in range(5000):
        v = {"content": v}
    assert estimate_tokens({"model": CHAT, "messages": [v]}, "/v1/chat/completions")[0] == 7


# --------------------------------------------------------------------------- local tokenizer


def test_no_tokenizers_package_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert find_local_tokenizer(CHAT) is None


def fake_tokenizers_module() -> types.ModuleType:
    mod = types.ModuleType("tokenizers")
    mod.__spec__ = importlib.machinery.ModuleSpec("tokenizers", None)

    class Tokenizer:
        @classmethod
        def from_file(cls, path: str) -> Tokenizer:
            assert Path(path).name == "tokenizer.json"
            return cls()

        def encode(self, text: str, add_special_tokens: bool = True) -> Any:
            return types.SimpleNamespace(ids=text.split())

    mod.Tokenizer = Tokenizer  # type: ignore[attr-defined]
    return mod


def test_tokenizer_from_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", fake_tokenizers_module())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--test-org--tiny-chat"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    assert find_local_tokenizer(CHAT, cache_dir=str(tmp_path)) is None  # not cached
    (repo / "snapshots" / "abc123" / "tokenizer.json").write_text("{}")
    count = find_local_tokenizer(CHAT + ":fake-a", cache_dir=str(tmp_path))
    assert count is not None and count("a b c") == 3
    assert find_local_tokenizer("other/model", cache_dir=str(tmp_path)) is None


# --------------------------------------------------------------------------- estimate_file


@pytest.fixture
def batch_file(tmp_path: Path) -> Path:
    lines = [
        line("c1", "/v1/chat/completions", chat("abcdefgh", max_tokens=100)),  # 2 + 7 in, 100 out
        line("c2", "/v1/chat/completions", chat("abcd")),  # 1 + 7 in, 512 out (default)
        line("c3", "/v1/chat/completions", {**chat("abcdefghijkl", max_completion_tokens=50),
                                            "model": CHAT + ":fake-b"}),  # pinned: 3 + 7 in, 50 out
        line("e1", "/v1/embeddings", {"model": EMBED, "input": "abcdefgh"}),  # 2 in
        line("e2", "/v1/embeddings", {"model": EMBED, "input": ["abcd", "abcd"]}),  # 2 in
        b"not json",
        line("c1", "/v1/chat/completions", chat("duplicate")),
    ]
    f = tmp_path / "in.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    return f


def test_estimate_file(batch_file: Path) -> None:
    cat = Catalog.from_models_json(FAKE_MODELS, "router", 1_700_000_000)
    est = estimate_file(str(batch_file), cat, local_tokenizers=False)
    orjson.dumps(est)  # JSON-able
    assert est["object"] == "hfbatch.estimate" and est["is_estimate"] is True
    assert (est["requests"], est["invalid_lines"]) == (5, 2)
    assert [e["code"] for e in est["first_errors"]] == ["invalid_json_line", "duplicate_custom_id"]
    assert est["endpoints"] == {"/v1/chat/completions": 3, "/v1/embeddings": 2}
    assert list(est["models"]) == [CHAT, CHAT + ":fake-b", EMBED]

    m = est["models"][CHAT]
    assert (m["requests"], m["input_tokens"], m["max_output_tokens"], m["tokenizer"]) == (2, 17, 612, "chars/4")
    assert (m["policy"], m["expected_provider"]) == ("fastest", "fake-a")
    assert [p["provider"] for p in m["providers"]] == ["fake-b", "fake-a"]  # cheapest first
    b, a = m["providers"]
    assert (b["input_price"], b["output_price"], b["fastest"]) == (0.1, 0.3, False)
    assert (a["input_price"], a["output_price"], a["fastest"]) == (0.2, 0.6, True)  # first listed, no throughput
    assert b["cost_usd"] == pytest.approx((17 * 0.1 + 612 * 0.3) / 1e6)
    assert a["cost_usd"] == pytest.approx((17 * 0.2 + 612 * 0.6) / 1e6) == m["expected_usd"]

    pinned = est["models"][CHAT + ":fake-b"]
    assert pinned["policy"] == "pinned" and [p["provider"] for p in pinned["providers"]] == ["fake-b"]
    assert pinned["providers"][0]["cost_usd"] == pytest.approx((10 * 0.1 + 50 * 0.3) / 1e6)

    e = est["models"][EMBED]
    assert (e["requests"], e["input_tokens"], e["max_output_tokens"]) == (2, 4, 0)
    assert e["providers"] == [{"provider": "hf-inference", "input_price": None, "output_price": None,
                               "cost_usd": None, "fastest": True, "status": "live"}]

    t = est["total"]
    assert (t["priced_requests"], t["unpriced_requests"]) == (3, 2)
    assert t["cheapest_usd"] == pytest.approx(201.3e-6) and t["most_expensive_usd"] == pytest.approx(386.6e-6)
    assert t["savings_usd"] == pytest.approx(185.3e-6) and t["expected_usd"] == pytest.approx(386.6e-6)
    assert (est["price_source"], est["prices_fetched_at"]) == ("router", 1_700_000_000)
    notes = " | ".join(est["notes"])
    assert "characters / 4" in notes and "1 request(s) set no max tokens" in notes
    assert "2 request(s) have no known price" in notes


def test_estimate_file_endpoint_and_cheapest_policy(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_bytes(line("a", "/v1/chat/completions", {**chat("abcd", max_tokens=1), "model": CHAT + ":cheapest"})
                  + b"\n" + line("b", "/v1/embeddings", {"model": EMBED, "input": "x"}) + b"\n")
    cat = Catalog.from_models_json(FAKE_MODELS, "router", 1)
    est = estimate_file(str(f), cat, endpoint="/v1/chat/completions")
    assert (est["requests"], est["invalid_lines"]) == (1, 1) and est["first_errors"][0]["code"] == "url_mismatch"
    m = est["models"][CHAT + ":cheapest"]
    assert m["policy"] == "cheapest" and m["expected_provider"] == "fake-b"
    assert m["expected_usd"] == m["providers"][0]["cost_usd"] == est["total"]["cheapest_usd"]


def test_estimate_file_without_prices(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_bytes(line("a", "/v1/chat/completions", chat("abcd")) + b"\n")
    est = estimate_file(str(f), Catalog({}, "none", None, ["no prices"]))
    assert est["models"][CHAT]["providers"] == [] and est["total"]["cheapest_usd"] is None
    assert est["notes"][0] == "no prices"


def test_estimate_file_missing_input(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        estimate_file(str(tmp_path / "absent.jsonl"), Catalog({}, "none"))


def test_render_table(batch_file: Path) -> None:
    from hfbatch.cli.tables import estimate_view, plain

    est = estimate_file(str(batch_file), Catalog.from_models_json(FAKE_MODELS, "router", 1), local_tokenizers=False)
    text = plain(estimate_view(dict(est), 200))
    assert "expected, fastest" in text and "unknown" in text and "estimate" in text
    assert text.index("fake-b") < text.index("fake-a")  # cheapest first
