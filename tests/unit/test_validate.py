"""validate.validate_line: OpenAI's batch input rules, one line at a time."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hfbatch.fingerprints import IdSet
from hfbatch.models import LineError, Request
from hfbatch.reader import LineTooLong
from hfbatch.validate import OPENAI_ENDPOINTS, is_batch_endpoint, normalize_url, validate_line


def line(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "org/m", "messages": [{"role": "user", "content": "hi"}]}}
    for k, v in over.items():
        if v is ...:
            obj.pop(k, None)
        else:
            obj[k] = v
    return obj


def check(obj: Any, seen: IdSet | None = None, raw: bytes | None = None, **kw: Any) -> Request | LineError:
    data = raw if raw is not None else json.dumps(obj).encode()
    return validate_line(7, data, seen if seen is not None else IdSet(), **kw)


def bad(result: Request | LineError, code: str, param: str | None = ...) -> LineError:  # type: ignore[assignment]
    assert isinstance(result, LineError), result
    assert result.code == code, result
    assert result.line_no == 7
    assert result.message
    if param is not ...:
        assert result.param == param, result
    return result


def test_valid_line_becomes_a_request() -> None:
    r = check(line())
    assert isinstance(r, Request)
    assert (r.line_no, r.custom_id, r.url, r.model) == (7, "c1", "/v1/chat/completions", "org/m")
    assert r.body == line()["body"]


@pytest.mark.parametrize("url", sorted(OPENAI_ENDPOINTS))
def test_every_openai_batch_endpoint_is_accepted(url: str) -> None:
    assert isinstance(check(line(url=url)), Request)


def test_the_documented_endpoints_are_batch_endpoints() -> None:
    assert {"/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions"} <= OPENAI_ENDPOINTS


@pytest.mark.parametrize("raw", [b"not json", b'{"custom_id": "x",', b"{'a': 1}", b"\x00\xff\xfe\x80\x81",
                                 b'{"a":1} trailing'])
def test_unparseable_lines_are_invalid_json_line(raw: bytes) -> None:
    r = bad(check(None, raw=raw), "invalid_json_line")
    assert r.custom_id is None


@pytest.mark.parametrize(("raw", "why", "where"), [
    (b'{"custom_id": "x", "body": {"t": "\\ud800"}}', "surrogate", "column 35"),
    (b'{"custom_id": "x", "body": {"n": 1e400}}', "infinity", "column 34"),
    (b'{"custom_id": "x",', "end of data", "column 19"),
])
def test_unparseable_lines_say_what_is_wrong_and_where(raw: bytes, why: str, where: str) -> None:
    r = bad(check(None, raw=raw), "invalid_json_line")
    assert r.message.startswith("This line is not parseable as valid JSON")  # OpenAI's words, then why
    assert why in r.message and where in r.message, r.message


def test_binary_junk_message_says_it_is_not_text() -> None:
    r = bad(check(None, raw=b"\xff\xfe\x00\x81"), "invalid_json_line")
    assert "UTF-8" in r.message


@pytest.mark.parametrize("value", [[1, 2], "string", 42, None, True])
def test_json_that_is_not_an_object_is_invalid_request(value: Any) -> None:
    bad(check(value), "invalid_request")


@pytest.mark.parametrize("cid", [..., None, "", 12, ["a"], {"a": 1}])
def test_custom_id_missing_or_not_a_non_empty_string(cid: Any) -> None:
    r = bad(check(line(custom_id=cid)), "invalid_request", "custom_id")
    assert r.custom_id is None


@pytest.mark.parametrize("method", ["GET", "post", "PUT", ..., None, 1])
def test_method_must_be_post(method: Any) -> None:
    r = bad(check(line(method=method)), "invalid_request", "method")
    assert r.custom_id == "c1"  # readable lines keep their custom_id


@pytest.mark.parametrize("url", ["/v1/unknown", "/v1/chat/complete", "https://api.openai.com/v1/chat/completions",
                                 "", ..., None, 5])
def test_url_must_be_an_openai_batch_endpoint(url: Any) -> None:
    bad(check(line(url=url)), "invalid_request", "url")


def test_azure_style_url_without_v1_is_normalized() -> None:
    r = check(line(url="/chat/completions"))
    assert isinstance(r, Request) and r.url == "/v1/chat/completions"
    assert normalize_url("/embeddings") == "/v1/embeddings"
    assert normalize_url("/v1/embeddings") == "/v1/embeddings"
    assert normalize_url("/score") == "/score"


@pytest.mark.parametrize("body", ["model=gpt", [1], None, 3, ...])
def test_body_must_be_an_object(body: Any) -> None:
    bad(check(line(body=body)), "invalid_request", "body")


@pytest.mark.parametrize("model", [..., "", None, 3])
def test_body_model_is_required(model: Any) -> None:
    body = {"messages": []} if model is ... else {"model": model, "messages": []}
    bad(check(line(body=body)), "invalid_request")


def test_stream_true_is_refused_but_false_is_fine() -> None:
    bad(check(line(body={"model": "m", "stream": True})), "invalid_request")
    assert isinstance(check(line(body={"model": "m", "stream": False})), Request)


def test_duplicate_custom_id_the_later_line_is_the_bad_one() -> None:
    seen = IdSet()
    assert isinstance(validate_line(1, json.dumps(line()).encode(), seen), Request)
    r = validate_line(2, json.dumps(line()).encode(), seen)
    assert isinstance(r, LineError) and r.code == "duplicate_custom_id" and r.line_no == 2
    assert r.custom_id == "c1"
    assert isinstance(validate_line(3, json.dumps(line(custom_id="c2")).encode(), seen), Request)


def test_no_uniqueness_check_when_seen_is_none() -> None:
    raw = json.dumps(line()).encode()
    assert isinstance(validate_line(1, raw, None), Request)
    assert isinstance(validate_line(2, raw, None), Request)


def test_endpoint_flag_requires_every_url_to_match() -> None:
    assert isinstance(check(line(), endpoint="/v1/chat/completions"), Request)
    r = bad(check(line(url="/v1/embeddings"), endpoint="/v1/chat/completions"), "url_mismatch", "url")
    assert r.custom_id == "c1"


def test_line_too_long_is_invalid_request() -> None:
    r = validate_line(3, LineTooLong(11 * 1024 * 1024), IdSet())
    assert isinstance(r, LineError) and r.code == "invalid_request" and r.line_no == 3
    assert "MB" in r.message


def test_idset() -> None:
    s = IdSet()
    assert s.add("a") and not s.add("a") and s.add("b")
    assert "a" in s and "z" not in s and len(s) == 2


def test_utf8_bom_inside_json_is_not_accepted_on_a_later_line() -> None:
    bad(check(None, raw=b"\xef\xbb\xbf" + json.dumps(line()).encode()), "invalid_json_line")


def test_non_ascii_custom_id_and_content_are_fine() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "日本"}]}
    r = check(line(custom_id="über-✓", body=body))
    assert isinstance(r, Request) and r.custom_id == "über-✓"


VLLM = ["/score", "/rerank", "/v1/score", "/v1/rerank", "/v2/rerank", "/v1/audio/transcriptions",
        "/v1/audio/translations"]


@pytest.mark.parametrize("pass_through", [False, True], ids=["router", "base-url"])
@pytest.mark.parametrize("url", VLLM)
def test_vllm_endpoints_are_batch_endpoints(url: str, pass_through: bool) -> None:
    """Valid lines either way; without --base-url the router cannot serve them (unsupported_endpoint when
    run, tests/unit/test_providers.py)."""
    r = check(line(url=url), pass_through=pass_through)
    assert isinstance(r, Request) and r.url == url
    assert is_batch_endpoint(url, pass_through=pass_through)


@pytest.mark.parametrize("url", ["/v1/chat/completions", "/v1/completions", "/v1/tokenize", "/v1/models/x/score",
                                 "/v1/classify", "/hf/text-classification", "/chat/completions"])
def test_base_url_accepts_any_v1_path_and_hf_tasks(url: str) -> None:
    r = check(line(url=url), pass_through=True)
    assert isinstance(r, Request) and r.url == normalize_url(url)


@pytest.mark.parametrize("url", ["/bad_url", "/tokenize", "/v2/embeddings", "/v1", "/v1/", "/v1//score",
                                 "/v1/../admin", "/v1/./score", "/hf/", "/hf/Text_Classification",
                                 "http://evil.example/v1/chat", "v1/chat/completions", "/v1/chat completions",
                                 "/v1/score?x=1", ""])
def test_base_url_refuses_other_paths(url: str) -> None:
    r = bad(check(line(url=url), pass_through=True), "invalid_request", "url")
    assert not is_batch_endpoint(normalize_url(url), pass_through=True)
    assert "/v1/..." in r.message  # says what --base-url accepts


@pytest.mark.parametrize("pass_through", [False, True], ids=["router", "base-url"])
def test_an_invalid_url_message_names_the_valid_ones(pass_through: bool) -> None:
    r = bad(check(line(url="/bad_url"), pass_through=pass_through), "invalid_request", "url")
    for url in [*OPENAI_ENDPOINTS, *VLLM, "/hf/<task>"]:
        assert url in r.message, (url, r.message)
    assert r.message.startswith('url "/bad_url" is not a batch endpoint'), r.message
    assert "--base-url" in r.message


@pytest.mark.parametrize("url", ["/v1/unknown", "/v1/tokenize", "/bad_url", "/hf/"])
def test_without_base_url_only_the_named_endpoints_are_valid(url: str) -> None:
    bad(check(line(url=url)), "invalid_request", "url")
    assert not is_batch_endpoint(url, pass_through=False)


def test_serve_checks_endpoints_by_the_same_rule(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hfbatch serve`'s POST /v1/batches `endpoint` follows the batch lines' rule."""
    monkeypatch.setenv("HFBATCH_HOME", str(tmp_path / "home"))
    from hfbatch.serve.app import BatchServer, ServeOptions
    from hfbatch.serve.files import ApiError

    for base_url in (None, "http://127.0.0.1:9/v1"):
        server = BatchServer(ServeOptions(base_url=base_url), None, 1 << 20)
        for url in [*OPENAI_ENDPOINTS, *VLLM, "/hf/summarization", "/v1/tokenize", "/bad_url", "/v1/../x"]:
            if is_batch_endpoint(url, pass_through=base_url is not None):
                assert server._endpoint(url) == url
            else:
                with pytest.raises(ApiError):
                    server._endpoint(url)
