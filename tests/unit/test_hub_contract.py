"""huggingface_hub's private provider helpers, which routing.py calls for embeddings and /hf/<task> lines.

No public huggingface_hub API builds a provider's request without sending it, so hfbatch imports
`huggingface_hub.inference._providers.get_provider_helper`. The contract test below fails loudly when an
upgrade changes what hfbatch calls; the others check that a changed API stops being a quiet per-line
model_not_found (DependencyChanged), while a lookup's expected failures stay the model's per-line error.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
import textwrap
import types
from typing import Any

import pytest

from hfbatch.errors import DependencyChanged, ExitCode
from hfbatch.models import Request
from hfbatch.routing import Route, Router, Unroutable
from hfbatch.testing.fake_provider import ThreadedFakeProvider

EMBED, CLASSIFY = "test-org/tiny-embed", "test-org/tiny-classifier"

CONTRACT = textwrap.dedent("""
    import inspect, json, sys
    from huggingface_hub.inference._providers import get_provider_helper

    embed = sys.argv[1]

    out = {"signature": list(inspect.signature(get_provider_helper).parameters)}
    helper = get_provider_helper("hf-inference", "feature-extraction", embed)
    out["prepare_params"] = list(inspect.signature(helper.prepare_request).parameters)
    r = helper.prepare_request(inputs=["a"], parameters={}, headers={}, model=embed, api_key="hf_x")
    out["url"], out["json"] = r.url, r.json
    auto = get_provider_helper("auto", "feature-extraction", embed)  # the Hub lookup of the mapping
    out["auto_provider"] = auto.provider
    print(json.dumps(out))
""")

ROUTES = textwrap.dedent("""
    import asyncio, json, sys
    from hfbatch.models import Request
    from hfbatch.routing import Route, Router

    embed, classify = sys.argv[1:3]

    def route(url, model, **body):
        got = asyncio.run(Router(None).route(Request(1, "c", url, {"model": model, **body}, model)))
        return [got.url, json.loads(got.data)] if isinstance(got, Route) else [got.code, got.message]

    print(json.dumps({"embeddings": route("/v1/embeddings", embed, input="hello"),
                      "task": route("/hf/text-classification", classify, inputs="great"),
                      "missing": route("/v1/embeddings", "test-org/NonExistent", input="hello")}))
""")


def run_script(script: str, hub: str) -> dict[str, Any]:
    """`script` in a fresh interpreter whose Hub is `hub` (huggingface_hub reads HF_ENDPOINT at import)."""
    env = {**os.environ, "HF_ENDPOINT": hub, "HFBATCH_ROUTER_URL": hub, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", script, EMBED, CLASSIFY], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_the_private_provider_api_is_what_routing_calls() -> None:
    with ThreadedFakeProvider() as hub:
        got = run_script(CONTRACT, hub.url)
        got.update(run_script(ROUTES, hub.url))
        assert hub.stats()["requests"] == 0  # Hub lookups only: nothing was sent to a model
    assert got["signature"][:3] == ["provider", "task", "model"], got["signature"]
    assert {"inputs", "parameters", "headers", "model", "api_key"} <= set(got["prepare_params"])
    assert got["url"].endswith(f"/hf-inference/models/{EMBED}/pipeline/feature-extraction"), got["url"]
    assert got["json"] == {"inputs": ["a"]}
    assert got["auto_provider"] == "hf-inference"
    url, payload = got["embeddings"]
    assert url == f"{hub.url}/hf-inference/models/{EMBED}/pipeline/feature-extraction" and payload == {
        "inputs": "hello"}
    url, payload = got["task"]
    assert url == f"{hub.url}/hf-inference/models/{CLASSIFY}" and payload["inputs"] == "great"
    code, message = got["missing"]
    assert code == "model_not_found" and "test-org/NonExistent" in message


def test_an_unreachable_hub_is_a_retryable_line_error() -> None:
    got = run_script(ROUTES, "http://127.0.0.1:9")  # nothing listens on the discard port
    for key in ("embeddings", "task"):
        code, message = got[key]
        assert code == "connection_error", message


# ------------------------------------------------------------------ a changed API, in process


def embeddings(router: Router | None = None) -> Route | Unroutable:
    r = Request(1, "c", "/v1/embeddings", {"model": "org/e", "input": "hi"}, "org/e")
    return asyncio.run((router or Router(None)).route(r))


def hf_task() -> Route | Unroutable:
    r = Request(1, "c", "/hf/text-classification", {"model": "org/c", "inputs": "hi"}, "org/c")
    return asyncio.run(Router(None).route(r))


@pytest.fixture
def providers(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.setenv("HFBATCH_ROUTER_URL", "http://127.0.0.1:9")
    return importlib.import_module("huggingface_hub.inference._providers")


class Params:
    def __init__(self, url: str = "https://router.huggingface.co/p/e", json: Any = None) -> None:
        self.url, self.json, self.data = url, json if json is not None else {"inputs": "\x00hfbatch-input\x00"}, None


def helper_that(prepare: Any) -> Any:
    return lambda provider, task, model: types.SimpleNamespace(prepare_request=prepare)


def check_changed(call: Any) -> None:
    with pytest.raises(DependencyChanged) as info:
        call()
    message = str(info.value)
    assert "huggingface_hub" in message and "changed the private API" in message, message
    assert "\n" not in message and len(message) <= 240, message  # one line, whole in an error line too
    assert info.value.exit_code == ExitCode.INTERNAL


def test_a_renamed_helper_is_an_internal_error(providers: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(providers, "get_provider_helper")
    check_changed(embeddings)
    check_changed(hf_task)


def test_a_changed_signature_is_an_internal_error(providers: types.ModuleType,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "get_provider_helper", lambda provider, task: None)
    check_changed(embeddings)


def test_a_changed_prepare_request_is_an_internal_error(providers: types.ModuleType,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "get_provider_helper", helper_that(lambda inputs, params: Params()))
    check_changed(embeddings)
    monkeypatch.setattr(providers, "get_provider_helper",  # a result without .json
                        helper_that(lambda **kw: types.SimpleNamespace(url="https://router.huggingface.co/x")))
    check_changed(embeddings)
    check_changed(hf_task)


def test_a_working_helper_routes(providers: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "get_provider_helper", helper_that(lambda **kw: Params()))
    got = embeddings()
    assert isinstance(got, Route) and got.url == "http://127.0.0.1:9/p/e" and json.loads(got.data) == {
        "inputs": "hi"}


def _http_library() -> types.ModuleType:
    """The HTTP library huggingface_hub uses (httpx in 1.x, httpx2 in 2.x)."""
    from huggingface_hub.errors import HfHubHTTPError

    base = next(b for b in HfHubHTTPError.__mro__[1:] if b.__name__ == "HTTPError")
    return importlib.import_module(base.__module__.split(".")[0])


def _hub_answer(status: int) -> Exception:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    http = _http_library()
    response = http.Response(status, request=http.Request("GET", "http://hub/api/models/org/e"))
    return (RepositoryNotFoundError if status == 404 else HfHubHTTPError)(f"{status} from the Hub",
                                                                           response=response)


@pytest.mark.parametrize("error, code", [
    (lambda: ValueError("Model org/e is not supported by provider x."), "model_not_found"),
    (lambda: KeyError("x"), "model_not_found"),
    (lambda: StopIteration(), "model_not_found"),  # provider="auto" on a model no provider serves
    (lambda: _hub_answer(404), "model_not_found"),
    (lambda: _hub_answer(401), "model_not_found"),
    (lambda: _hub_answer(503), "connection_error"),
    (lambda: _hub_answer(429), "connection_error"),
    (lambda: _hub_answer(501), "model_not_found"),  # what retry.retryable says of a 501: final
    (lambda: _http_library().ConnectError("connection refused"), "connection_error"),
    (lambda: _http_library().ReadTimeout("timed out"), "connection_error"),
    (lambda: ConnectionRefusedError("refused"), "connection_error"),
], ids=["value", "key", "stop", "404", "401", "503", "429", "501", "connect", "timeout", "oserror"])
def test_an_expected_lookup_failure_is_the_lines_error(providers: types.ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                       error: Any, code: str) -> None:
    def lookup(provider: str, task: str, model: str) -> Any:
        raise error()

    monkeypatch.setattr(providers, "get_provider_helper", lookup)
    got = embeddings()
    assert isinstance(got, Unroutable) and got.code == code, got
    assert "org/e" in got.message
    got = hf_task()
    assert isinstance(got, Unroutable) and got.code == code, got
