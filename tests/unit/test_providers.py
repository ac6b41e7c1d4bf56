"""providers (routing, no network) and config (output paths, token lookup)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from openai.types import CreateEmbeddingResponse

from hfbatch.config import default_output_paths, is_hf_host, resolve_token
from hfbatch.errors import UsageError
from hfbatch.models import Request
from hfbatch.routing import Route, Router, Unroutable, hf_features_to_openai, split_model


def req(url: str, model: str = "org/m", **body: object) -> Request:
    return Request(1, "c", url, {"model": model, **body}, model)


def route(router: Router, r: Request) -> Route | Unroutable:
    return asyncio.run(router.route(r))


def test_base_url_passes_every_endpoint_through() -> None:
    router = Router("http://127.0.0.1:8000/v1/")
    for url, expect in [("/v1/chat/completions", "http://127.0.0.1:8000/v1/chat/completions"),
                        ("/v1/completions", "http://127.0.0.1:8000/v1/completions"),
                        ("/v1/embeddings", "http://127.0.0.1:8000/v1/embeddings"),
                        ("/v1/score", "http://127.0.0.1:8000/v1/score")]:
        r = route(router, req(url, messages=[]))
        assert isinstance(r, Route) and r.url == expect and r.adapt is None
        assert json.loads(r.data) == {"model": "org/m", "messages": []}


def test_router_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFBATCH_ROUTER_URL", "http://127.0.0.1:1234/")
    router = Router(None)
    for url in ("/v1/chat/completions", "/v1/responses"):
        r = route(router, req(url, model="org/m:fastest"))
        assert isinstance(r, Route) and r.url == "http://127.0.0.1:1234" + url
        assert json.loads(r.data)["model"] == "org/m:fastest"  # the suffix is the router's business


def test_default_router_is_hugging_face(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HFBATCH_ROUTER_URL", raising=False)
    r = route(Router(None), req("/v1/chat/completions"))
    assert isinstance(r, Route) and r.url == "https://router.huggingface.co/v1/chat/completions"


def test_base_url_sends_paths_outside_v1_to_the_server_root() -> None:
    """vLLM serves /score, /rerank and /v2/rerank at its root: base URL without its /v1, + the url."""
    root = "http://127.0.0.1:8000"
    for base, v1_rerank in ((root + "/v1", root + "/v1/rerank"), (root + "/v1/", root + "/v1/rerank"),
                            (root, root + "/rerank")):  # a /v1/... url always goes to base + its rest
        router = Router(base)
        for url in ("/score", "/rerank", "/v2/rerank"):
            r = route(router, req(url, query="q", documents=["d"]))
            assert isinstance(r, Route) and r.url == root + url, (base, url, r)
        r = route(router, req("/v1/rerank"))
        assert isinstance(r, Route) and r.url == v1_rerank, (base, r)


@pytest.mark.parametrize("url", ["/v1/completions", "/v1/moderations", "/v1/images/generations",
                                 "/score", "/rerank", "/v1/score", "/v1/rerank", "/v2/rerank",
                                 "/v1/audio/transcriptions", "/v1/audio/translations"])
def test_router_refuses_endpoints_it_does_not_serve(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFBATCH_ROUTER_URL", "http://127.0.0.1:9")
    r = route(Router(None), req(url))
    assert isinstance(r, Unroutable) and r.code == "unsupported_endpoint"
    assert "--base-url" in r.message


@pytest.mark.parametrize("model, expect", [
    ("org/m", ("org/m", None)), ("org/m:groq", ("org/m", "groq")), ("org/m:fastest", ("org/m", None)),
    ("org/m:cheapest", ("org/m", None)), ("m", ("m", None))])
def test_split_model(model: str, expect: tuple[str, str | None]) -> None:
    assert split_model(model) == expect


def test_hf_features_become_an_openai_embedding_response() -> None:
    r = req("/v1/embeddings", model="org/e")
    body = hf_features_to_openai([[0.1, 0.2], [0.3, 0.4]], r)
    CreateEmbeddingResponse.model_validate(body, strict=True)
    assert [d["embedding"] for d in body["data"]] == [[0.1, 0.2], [0.3, 0.4]]
    assert [d["index"] for d in body["data"]] == [0, 1] and body["model"] == "org/e"
    flat = hf_features_to_openai([0.5, 0.6], r)  # one input answered with a flat vector
    CreateEmbeddingResponse.model_validate(flat, strict=True)
    assert [d["embedding"] for d in flat["data"]] == [[0.5, 0.6]]
    already = {"object": "list", "data": [], "model": "x", "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    assert hf_features_to_openai(already, r) == already


# ------------------------------------------------------------------ config


def test_default_output_paths() -> None:
    assert default_output_paths("data/in.jsonl") == ("data/in.output.jsonl", "data/in.errors.jsonl")
    assert default_output_paths("batch.txt") == ("batch.output.jsonl", "batch.errors.jsonl")
    assert default_output_paths("-") == ("batch.output.jsonl", "batch.errors.jsonl")


def test_is_hf_host() -> None:
    assert is_hf_host("https://router.huggingface.co/v1")
    assert is_hf_host("https://xyz.endpoints.huggingface.cloud/v1")
    assert not is_hf_host("http://127.0.0.1:8000/v1")
    assert not is_hf_host("https://huggingface.co.evil.example/v1")


def _no_saved_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub  # its token path was fixed at import: make "no saved login" certain

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


def test_token_flag_wins_then_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_saved_token(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env_123")
    assert resolve_token("hf_flag_123", None) == "hf_flag_123"
    assert resolve_token(None, None) == "hf_from_env_123"


def test_missing_token_for_the_router_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    _no_saved_token(monkeypatch, tmp_path)
    with pytest.raises(UsageError, match="HF_TOKEN"):
        resolve_token(None, None)


def test_no_token_is_fine_for_a_local_base_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_saved_token(monkeypatch, tmp_path)
    assert resolve_token(None, "http://127.0.0.1:8000/v1") is None
