"""Validate stage: (line_no, raw bytes) -> Request | LineError, by OpenAI's batch input rules."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from .models import LineError, Request
from .reader import MAX_LINE_BYTES, LineTooLong

# OpenAI's batch endpoints (openai SDK batch_create_params). Which of them the router can serve is
# decided later (routing.py); validation only says whether the line is a well-formed batch line.
OPENAI_ENDPOINTS = frozenset(
    {
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
    }
)
# vLLM's batch runner endpoints (`vllm run-batch`; reference/vllm_and_hf_jobs.md). Valid batch lines
# either way; only a --base-url server can run them (the router answers unsupported_endpoint).
VLLM_ENDPOINTS = frozenset(
    {
        "/score",
        "/rerank",
        "/v1/score",
        "/v1/rerank",
        "/v2/rerank",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    }
)
# With --base-url, any /v1/... path is passed through too (segments of unreserved characters).
_V1_PATH_RE = re.compile(r"^/v1(/[A-Za-z0-9._~-]+)+$")
# Our extension: Hugging Face tasks beyond OpenAI's endpoints, e.g. /hf/text-classification.
HF_TASK_RE = re.compile(r"^/hf/[a-z0-9]+(-[a-z0-9]+)*$")
_NAMED = ", ".join([*sorted(OPENAI_ENDPOINTS), *sorted(VLLM_ENDPOINTS)])


def is_batch_endpoint(url: str, *, pass_through: bool) -> bool:
    """Is `url` (normalized: normalize_url) a batch line's url? OpenAI's batch endpoints, vLLM's,
    `/hf/<task>`, and with `pass_through` (--base-url) any `/v1/...` path. The one rule for input lines
    and for `hfbatch serve`'s `endpoint`."""
    if url in OPENAI_ENDPOINTS or url in VLLM_ENDPOINTS or HF_TASK_RE.match(url):
        return True
    return pass_through and bool(_V1_PATH_RE.match(url)) and not any(
        part in (".", "..") for part in url.split("/"))


def endpoints_hint(pass_through: bool) -> str:
    """What to use instead of a url that is not a batch endpoint (the end of one message)."""
    if pass_through:
        return f"use one of {_NAMED}, /hf/<task>, or any /v1/... path your --base-url server serves"
    return (f"use one of {_NAMED} or /hf/<task> for a Hugging Face task (with --base-url, any /v1/... "
            "path is passed to your own server)")


# What an engine adds to the rules (engines.endpoint_rule): (url, body) -> None, or (param, message) when the
# engine cannot run that line (vLLM's batch runner serves fewer endpoints than OpenAI's batch API).
EngineRule = Callable[[str, dict[str, Any]], tuple[str, str] | None]


class SeenIds(Protocol):
    def add(self, custom_id: str) -> bool:
        """Record `custom_id`; False if it was already there."""
        ...


def normalize_url(url: str) -> str:
    """Azure-style `/chat/completions` -> `/v1/chat/completions`; anything else unchanged."""
    if not url.startswith("/v1/") and "/v1" + url in OPENAI_ENDPOINTS:
        return "/v1" + url
    return url


def validate_line(
    line_no: int,
    raw: bytes | LineTooLong,
    seen: SeenIds | None,
    *,
    pass_through: bool = False,
    endpoint: str | None = None,
    rule: EngineRule | None = None,
) -> Request | LineError:
    """Check one line. `seen` (None: skip the uniqueness check) records custom_ids of valid lines.

    `pass_through` (a --base-url run) accepts any relative URL path; `endpoint` (when given)
    must equal every line's url, as a batch's `endpoint` must in OpenAI's API; `rule` is the engine's
    own check of a line that passed every other.
    """
    if isinstance(raw, LineTooLong):
        return LineError(
            line_no, None, "invalid_request",
            f"line is {raw.size:,} bytes, over the {MAX_LINE_BYTES >> 20} MB limit per line; shrink this request",
        )
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return LineError(line_no, None, "invalid_json_line", _json_problem(raw, e))
    if not isinstance(obj, dict):
        return LineError(
            line_no, None, "invalid_request",
            f"expected a JSON object with custom_id, method, url and body, got a JSON {_kind(obj)}",
        )
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return LineError(
            line_no, None, "invalid_request",
            "custom_id is missing or not a non-empty string; give every line a unique custom_id",
            "custom_id",
        )
    if seen is not None and not seen.add(cid):
        # Checked before the other rules: an invalid line still claims its custom_id, as in OpenAI.
        return LineError(
            line_no, cid, "duplicate_custom_id",
            f"custom_id {_show(cid)} is used by an earlier line; custom_ids must be unique in a batch",
            "custom_id",
        )
    method = obj.get("method")
    if method != "POST":
        return LineError(
            line_no, cid, "invalid_request",
            f"method must be \"POST\" (the only method batches support), got {_show(method)}", "method",
        )
    url = obj.get("url")
    if not isinstance(url, str):
        return LineError(line_no, cid, "invalid_request", "url is missing or not a string", "url")
    url = normalize_url(url)
    if not is_batch_endpoint(url, pass_through=pass_through):
        return LineError(
            line_no, cid, "invalid_request",
            f"url {_show(url)} is not a batch endpoint; {endpoints_hint(pass_through)}", "url",
        )
    if endpoint is not None and url != endpoint:
        return LineError(
            line_no, cid, "url_mismatch",
            f"url {_show(url)} does not match the batch endpoint {endpoint}", "url",
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(
            line_no, cid, "invalid_request",
            f"body must be a JSON object (the endpoint's parameters), got {_kind(body)}", "body",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return LineError(
            line_no, cid, "invalid_request", "body.model is missing or not a non-empty string", "body.model"
        )
    if body.get("stream") is True:
        return LineError(
            line_no, cid, "invalid_request",
            "body.stream is true; batch requests cannot stream, remove it or set it to false", "body.stream",
        )
    if rule is not None and (problem := rule(url, body)) is not None:
        return LineError(line_no, cid, "invalid_request", problem[1], problem[0])
    return Request(line_no, cid, url, body, model)


def _json_problem(raw: bytes, e: orjson.JSONDecodeError) -> str:
    """OpenAI's words, then what is wrong and where: the parser's reason, the column and the text there."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as u:
        return (f"This line is not valid UTF-8 text (binary data?): byte {u.start + 1} is "
                f"0x{raw[u.start]:02x}; save the file as UTF-8")
    reason = str(e.msg).split(": line ", 1)[0]
    hint = {"no low surrogate in string": " (an escape such as \\ud800 alone is not a character; write the "
                                          "character itself, or a surrogate pair)",
            "number is infinity when parsed as double": " (too large for a number; send it as a string)"
            }.get(reason, "")
    near = text[max(0, e.pos - 12):e.pos + 12]
    return f"This line is not parseable as valid JSON: {reason}{hint} at column {e.colno}, near {near!r}"


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number"
    )


def _show(v: Any) -> str:
    s = orjson.dumps(v).decode() if v is not None else "nothing"
    return s if len(s) <= 80 else s[:77] + "..."
