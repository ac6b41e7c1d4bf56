"""Validate stage: (line_no, raw bytes) -> Request | LineError, by OpenAI's batch input rules."""

from __future__ import annotations

import re
from typing import Any

import orjson

from .models import LineError, Request
from .reader import MAX_LINE_BYTES, LineTooLong

# OpenAI's batch endpoints (openai SDK batch_create_params). Which of them the router can serve is
# decided later (providers.py); validation only says whether the line is a well-formed batch line.
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
# With --base-url any relative path is passed through (vLLM's /v1/score, /rerank, ...).
_PATH_RE = re.compile(r"^/[A-Za-z0-9._~/-]*$")


class IdSet:
    """The custom_ids seen so far (uniqueness check)."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def add(self, custom_id: str) -> bool:
        """Record `custom_id`; False if it was already there."""
        before = len(self._seen)
        self._seen.add(custom_id)
        return len(self._seen) != before

    def __contains__(self, custom_id: str) -> bool:
        return custom_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)


def normalize_url(url: str) -> str:
    """Azure-style `/chat/completions` -> `/v1/chat/completions`; anything else unchanged."""
    if not url.startswith("/v1/") and "/v1" + url in OPENAI_ENDPOINTS:
        return "/v1" + url
    return url


def validate_line(
    line_no: int,
    raw: bytes | LineTooLong,
    seen: IdSet | None,
    *,
    pass_through: bool = False,
    endpoint: str | None = None,
) -> Request | LineError:
    """Check one line. `seen` (None: skip the uniqueness check) records custom_ids of valid lines.

    `pass_through` (a --base-url run) accepts any relative URL path; `endpoint` (when given)
    must equal every line's url, as a batch's `endpoint` must in OpenAI's API.
    """
    if isinstance(raw, LineTooLong):
        return LineError(
            line_no, None, "invalid_request",
            f"line is {raw.size:,} bytes, over the {MAX_LINE_BYTES >> 20} MB limit per line; shrink this request",
        )
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            raw.decode("utf-8")
            why = "This line is not parseable as valid JSON."
        except UnicodeDecodeError:
            why = "This line is not valid UTF-8 text (binary data?)."
        return LineError(line_no, None, "invalid_json_line", why)
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
    if pass_through:
        if not _PATH_RE.match(url) or ".." in url:
            return LineError(
                line_no, cid, "invalid_request",
                f"url {_show(url)} is not a relative path such as /v1/chat/completions", "url",
            )
    elif url not in OPENAI_ENDPOINTS:
        return LineError(
            line_no, cid, "invalid_request",
            f"url {_show(url)} is not a batch endpoint; use one of {', '.join(sorted(OPENAI_ENDPOINTS))}"
            " (or --base-url to pass other paths to your own server)",
            "url",
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
    return Request(line_no, cid, url, body, model)


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number"
    )


def _show(v: Any) -> str:
    s = orjson.dumps(v).decode() if v is not None else "nothing"
    return s if len(s) <= 80 else s[:77] + "..."
