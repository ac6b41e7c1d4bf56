"""Tests for the local fake Inference Providers router."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from hfbatch.testing.fake_provider import FakeConfig, ThreadedFakeProvider

CHAT = "test-org/tiny-chat"


def call(url: str, body: Any = None, *, headers: dict[str, str] | None = None, method: str | None = None,
         raw: bytes | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def chat_body(text: str, model: str = CHAT, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture()
def fake() -> Iterator[ThreadedFakeProvider]:
    with ThreadedFakeProvider() as fp:
        yield fp


def test_chat_completion_validates(fake: ThreadedFakeProvider) -> None:
    from openai.types.chat import ChatCompletion

    body = chat_body("hello there", model=CHAT + ":fake-a", max_tokens=3)
    status, headers, raw = call(fake.url + "/v1/chat/completions", body)
    assert status == 200
    assert headers["x-inference-provider"] == "fake-a"
    assert headers["x-request-id"].startswith("req_")
    cc = ChatCompletion.model_validate(json.loads(raw))
    assert cc.model == CHAT
    assert cc.choices[0].message.content == "echo: hello there"
    assert cc.usage is not None and cc.usage.completion_tokens == 3
    assert cc.usage.prompt_tokens == 10 + len(json.dumps(body["messages"], separators=(",", ":"))) // 4
    for suffix in ("", ":fastest", ":cheapest"):
        _, headers, _ = call(fake.url + "/v1/chat/completions", chat_body("x", model=CHAT + suffix))
        assert headers["x-inference-provider"] == "fake-b"
    st = fake.stats()
    assert st["ok"] == 4 and st["requests"] == 4
    assert st["providers"] == {"fake-a": 1, "fake-b": 3}
    assert st["models"] == {CHAT: 4}
    assert st["paths"] == {"/v1/chat/completions": 4}


def test_chat_errors(fake: ThreadedFakeProvider) -> None:
    url = fake.url + "/v1/chat/completions"
    status, _, raw = call(url, chat_body("x", model="NonExistent/model"))
    assert status == 400 and json.loads(raw)["error"]["code"] == "model_not_supported"
    status, _, raw = call(url, {"messages": []})
    assert status == 400 and json.loads(raw)["error"]["param"] == "model"
    status, _, _ = call(url, chat_body("x", stream=True))
    assert status == 400
    assert fake.stats()["s400"] == 3


def test_responses_embeddings_completions_validate(fake: ThreadedFakeProvider) -> None:
    from openai.types import Completion, CreateEmbeddingResponse
    from openai.types.responses import Response

    status, _, raw = call(fake.url + "/v1/responses", {"model": CHAT, "input": "hi"})
    assert status == 200
    assert Response.model_validate(json.loads(raw)).output_text == "echo: hi"
    for inp, n in (("one", 1), (["a", "b", "c"], 3), ([1, 2, 3], 1), ([[1, 2], [3]], 2)):
        status, _, raw = call(fake.url + "/v1/embeddings", {"model": "test-org/tiny-embed", "input": inp})
        emb = CreateEmbeddingResponse.model_validate(json.loads(raw))
        assert [d.index for d in emb.data] == list(range(n))
        assert all(len(d.embedding) == 8 for d in emb.data)
        assert emb.usage.total_tokens == 5 * n and emb.model == "test-org/tiny-embed"
    _, _, a = call(fake.url + "/v1/embeddings", {"model": "m", "input": "same"})
    _, _, b = call(fake.url + "/v1/embeddings", {"model": "m", "input": "same"})
    assert json.loads(a)["data"] == json.loads(b)["data"]
    status, _, raw = call(fake.url + "/v1/completions", {"model": CHAT, "prompt": "yo"})
    assert Completion.model_validate(json.loads(raw)).choices[0].text == "echo: yo"


def test_feature_extraction_and_models(fake: ThreadedFakeProvider) -> None:
    url = fake.url + "/hf-inference/models/test-org/tiny-embed/pipeline/feature-extraction"
    status, headers, raw = call(url, {"inputs": "a"})
    assert status == 200 and headers["x-inference-provider"] == "hf-inference"
    vecs = json.loads(raw)
    assert len(vecs) == 1 and len(vecs[0]) == 8
    assert len(json.loads(call(url, {"inputs": ["a", "b"]})[2])) == 2
    status, _, raw = call(fake.url + "/v1/models")
    catalog = json.loads(raw)
    assert catalog["object"] == "list"
    by_id = {m["id"]: m for m in catalog["data"]}
    chat = by_id[CHAT]
    assert {"id", "object", "created", "owned_by", "providers"} <= chat.keys() and chat["object"] == "model"
    prices = {p["provider"]: (p["pricing"]["input"], p["pricing"]["output"]) for p in chat["providers"]}
    assert prices == {"fake-a": (0.2, 0.6), "fake-b": (0.1, 0.3)}
    assert all(p["status"] == "live" and p["context_length"] == 8192 for p in chat["providers"])
    assert [p["provider"] for p in by_id["test-org/tiny-embed"]["providers"]] == ["hf-inference"]


def test_scripted_fault_then_ok(fake: ThreadedFakeProvider) -> None:
    fake.provider.config.retry_after = "2"
    url, body = fake.url + "/v1/chat/completions", chat_body("x [[fault:429,500,ok]] [[id:a]]")
    status, headers, raw = call(url, body)
    assert status == 429 and headers["retry-after"] == "2"
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    status, _, raw = call(url, body)
    assert status == 500 and json.loads(raw)["error"]["type"] == "server_error"
    assert call(url, body)[0] == 200
    assert call(url, body)[0] == 200
    st = fake.stats()
    assert (st["s429"], st["s500"], st["ok"], st["dup_ok"], st["distinct_ok"]) == (1, 1, 2, 1, 1)
    fake.reset_stats()
    assert call(url, body)[0] == 429  # reset forgets the attempt counters


def test_dup_ok_counting(fake: ThreadedFakeProvider) -> None:
    url = fake.url + "/v1/chat/completions"
    for marker in ("a", "b", "a", "c", "a"):
        assert call(url, chat_body(f"q [[id:{marker}]]"))[0] == 200
    st = fake.stats()
    assert st["dup_ok"] == 2 and st["distinct_ok"] == 3
    status, _, _ = call(fake.url + "/__reset", {})
    assert status == 200 and fake.stats()["dup_ok"] == 0


def test_reset_closes_connection(fake: ThreadedFakeProvider) -> None:
    with pytest.raises((ConnectionError, urllib.error.URLError, OSError)):
        call(fake.url + "/v1/chat/completions", chat_body("x [[fault:reset]]"))
    assert call(fake.url + "/v1/chat/completions", chat_body("x [[fault:reset]]"))[0] == 200
    st = fake.stats()
    assert st["reset"] == 1 and st["ok"] == 1 and st["inflight"] == 0


def test_garbage_and_auth(fake: ThreadedFakeProvider) -> None:
    url = fake.url + "/v1/chat/completions"
    status, headers, raw = call(url, chat_body("x [[fault:garbage]]"))
    assert (status, headers["content-type"], raw) == (200, "application/json", b"<html>bad gateway")
    fake.provider.config.require_token = True
    assert call(url, chat_body("y"))[0] == 401
    assert call(url, chat_body("y"), headers={"authorization": "Bearer hf_x"})[0] == 200
    st = fake.stats()
    assert st["s401"] == 1 and st["auth_missing"] == 2 and st["garbage"] == 1


def test_402_after_and_config_endpoint(fake: ThreadedFakeProvider) -> None:
    url = fake.url + "/v1/chat/completions"
    status, _, raw = call(fake.url + "/__config", {"fail_402_after": 1, "retry_after": 3})
    assert status == 200 and json.loads(raw)["retry_after"] == "3"
    assert call(url, chat_body("a"))[0] == 200
    status, _, raw = call(url, chat_body("b"))
    assert status == 402 and "credits" in json.loads(raw)["error"]
    assert call(fake.url + "/__config", {"nope": 1})[0] == 400
    assert json.loads(call(fake.url + "/__stats")[2])["s402"] == 1


def test_max_inflight_cap(fake: ThreadedFakeProvider) -> None:
    fake.provider.config.max_inflight = 1
    url = fake.url + "/v1/chat/completions"
    results: list[int] = []
    slow = threading.Thread(target=lambda: results.append(call(url, chat_body("slow [[sleep:0.3]]"))[0]))
    slow.start()
    deadline = time.monotonic() + 2
    while fake.stats()["inflight"] < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    status, headers, _ = call(url, chat_body("fast"))
    slow.join()
    assert status == 429 and "retry-after" in headers
    assert results == [200]
    st = fake.stats()
    assert st["max_inflight"] == 2 and st["s429"] == 1 and st["inflight"] == 0


def test_random_faults_are_seeded() -> None:
    def run() -> list[int]:
        with ThreadedFakeProvider(FakeConfig(fail_429=0.3, fail_500=0.2, seed=7)) as fp:
            return [call(fp.url + "/v1/chat/completions", chat_body(str(i)))[0] for i in range(30)]

    first = run()
    assert first == run()
    assert {200, 429, 500} <= set(first)


def test_hang_and_fast_stop() -> None:
    fp = ThreadedFakeProvider(FakeConfig(hang=1.0)).start()
    with pytest.raises((TimeoutError, urllib.error.URLError, OSError)):
        call(fp.url + "/v1/chat/completions", chat_body("x"), timeout=0.2)
    errors: list[BaseException] = []

    def hang_until_stopped() -> None:
        try:
            call(fp.url + "/v1/chat/completions", chat_body("y"), timeout=5)
        except OSError as exc:  # the stopping server drops the connection
            errors.append(exc)

    hanger = threading.Thread(target=hang_until_stopped, daemon=True)
    hanger.start()
    deadline = time.monotonic() + 10
    while fp.stats()["hang"] < 2 and time.monotonic() < deadline:  # until the second request hangs
        time.sleep(0.005)
    assert fp.stats()["hang"] == 2
    t0 = time.monotonic()
    fp.stop()
    assert time.monotonic() - t0 < 30  # hanging requests dropped at once, not after aiohttp's 60 s of grace
    hanger.join(30)
    assert len(errors) == 1


def test_hub_helper_against_fake(fake: ThreadedFakeProvider) -> None:
    code = (
        "from huggingface_hub.inference._providers import get_provider_helper\n"
        "h = get_provider_helper('hf-inference', 'feature-extraction', 'test-org/tiny-embed')\n"
        "r = h.prepare_request(inputs=['a'], parameters={}, headers={}, model='test-org/tiny-embed',"
        " api_key='hf_fake')\n"
        "print(r.url)\n"
    )
    env = {**os.environ, "HF_ENDPOINT": fake.url}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("/models/test-org/tiny-embed/pipeline/feature-extraction")
    assert fake.stats()["requests"] == 0  # hub API calls are not inference requests
