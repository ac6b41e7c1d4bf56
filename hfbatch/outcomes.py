"""Outcome classification: what a provider's answer means (tokens used, provider-side failure, auth) and its
error body in OpenAI's envelope."""

from __future__ import annotations

from typing import Any

import orjson

from .models import Outcome

_HTTP_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
    403: "permission_error", 404: "not_found_error", 408: "timeout", 409: "conflict_error",
    413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
}

def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status (invalid_request_error, not_found_error, server_error...)."""
    return _HTTP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def tokens_used(parsed: object, default: int) -> int:
    if isinstance(parsed, dict) and isinstance(parsed.get("usage"), dict):
        u = parsed["usage"]
        total = u.get("total_tokens")
        if isinstance(total, int):
            return total
    return default


def provider_side_failure(o: Outcome) -> bool:
    """Worth another provider: throttled or broken after retries, or the model is not served there."""
    if o.status is None or o.status == 429 or o.status >= 500:
        return True
    if o.status in (400, 404) and isinstance(o.parsed, dict):
        e = o.parsed.get("error")
        return isinstance(e, dict) and e.get("code") in ("model_not_supported", "model_not_found")
    return False


def error_body(status: int, o: Outcome) -> dict[str, Any]:
    """The provider's error answer in OpenAI's envelope {"error": {message, type, param, code}}.

    OpenAI-shaped answers pass through unchanged; Hugging Face's `{"error": "text"}`, `{"detail":
    ...}`, `{"message": ...}`, plain text and HTML are wrapped so OpenAI code can read them."""
    p = o.parsed
    kind = error_type(status)
    if isinstance(p, dict) and isinstance(p.get("error"), dict) and "message" in p["error"]:
        e = p["error"]
        if all(k in e for k in ("type", "param", "code")):
            return p  # already OpenAI's envelope: unchanged
        return {**p, "error": {"type": kind, "param": None, "code": None, **e}}
    if isinstance(p, dict):
        raw = p.get("error") or p.get("detail") or p.get("message") or p
        message = raw if isinstance(raw, str) else orjson.dumps(raw).decode()
    elif p is not None:
        message = orjson.dumps(p).decode()
    else:
        message = o.body[:1000].decode("utf-8", "replace").strip() or f"HTTP {status}"
    code = p.get("error_type") if isinstance(p, dict) else None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def auth_message(status: int | None, o: Outcome) -> str:
    detail = ""
    if isinstance(o.parsed, dict):
        e = o.parsed.get("error")
        detail = (e.get("message") if isinstance(e, dict) else e) or ""
    detail = f" ({str(detail)[:160]})" if detail else ""
    if status == 401:
        return (f"the provider rejected the token (HTTP 401){detail}: check HF_TOKEN / --token; it needs "
                "the 'Make calls to Inference Providers' permission")
    return (f"access denied (HTTP 403){detail}: the token may lack access to this model (gated? accept its "
            "terms on the Hub) or to the org in --bill-to")
