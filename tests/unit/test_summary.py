"""summary: LatencyHistogram quantiles, Stats.add_usage for each endpoint's usage shape, the Batch object."""

from __future__ import annotations

import math

import pytest
from openai.types import Batch

from hfbatch.models import LineError
from hfbatch.summary import BatchInfo, LatencyHistogram, Stats, batch_object

# ------------------------------------------------------------------ LatencyHistogram


def test_empty_histogram_has_no_quantiles() -> None:
    h = LatencyHistogram()
    assert h.count == 0
    assert h.quantile(0.5) is None and h.quantile(0.95) is None


def test_quantile_of_identical_samples_is_within_one_bucket() -> None:
    # 5 %-wide buckets: whatever the rounding, the estimate of a constant sample must be within 5 %,
    # for sub-second latencies (the common case) as for slow ones.
    off = []
    for seconds in (0.001, 0.0123, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 0.99, 1.0, 1.5, 2.0, 7.3, 30.0, 120.0):
        h = LatencyHistogram()
        for _ in range(20):
            h.add(seconds)
        for q in (0.0, 0.5, 0.95, 1.0):
            est = h.quantile(q)
            assert est is not None
            if abs(est / seconds - 1) > 0.05:
                off.append(f"p{int(q * 100)} of {seconds} s -> {est:.6f} s ({est / seconds - 1:+.1%})")
    assert not off, "; ".join(off)


def test_p50_p95_of_a_uniform_spread() -> None:
    h = LatencyHistogram()
    for i in range(1, 1001):
        h.add(i / 1000)  # 1 ms .. 1 s
    assert h.count == 1000
    p50, p95 = h.quantile(0.5), h.quantile(0.95)
    assert p50 is not None and p95 is not None
    assert p50 == pytest.approx(0.5, rel=0.05)
    assert p95 == pytest.approx(0.95, rel=0.05)


def test_quantiles_are_monotonic() -> None:
    h = LatencyHistogram()
    for x in (0.01, 0.02, 0.5, 3.0, 3.0, 9.0, 0.2):
        h.add(x)
    qs = [h.quantile(q / 20) for q in range(21)]
    assert all(a is not None and b is not None and a <= b for a, b in zip(qs, qs[1:], strict=False)), qs


def test_zero_and_tiny_latencies_do_not_crash() -> None:
    h = LatencyHistogram()
    h.add(0.0)
    h.add(1e-9)
    est = h.quantile(0.5)
    assert est is not None and 0 < est < 1e-3 and math.isfinite(est)


def test_p95_reports_the_slow_tail() -> None:
    h = LatencyHistogram()
    for _ in range(90):
        h.add(0.1)
    for _ in range(10):
        h.add(2.0)
    assert h.quantile(0.5) == pytest.approx(0.1, rel=0.05)
    assert h.quantile(0.95) == pytest.approx(2.0, rel=0.05)


# ------------------------------------------------------------------ Stats.add_usage


def test_add_usage_chat_completions() -> None:
    s = Stats()
    s.add_usage({"object": "chat.completion", "usage": {
        "prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 3}, "completion_tokens_details": {"reasoning_tokens": 2}}})
    s.add_usage({"object": "chat.completion", "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                        "total_tokens": 2}})
    assert (s.input_tokens, s.output_tokens, s.cached_tokens, s.reasoning_tokens) == (12, 8, 3, 2)


def test_add_usage_responses() -> None:
    s = Stats()
    s.add_usage({"object": "response", "usage": {
        "input_tokens": 20, "output_tokens": 5, "total_tokens": 25,
        "input_tokens_details": {"cached_tokens": 4}, "output_tokens_details": {"reasoning_tokens": 1}}})
    assert (s.input_tokens, s.output_tokens, s.cached_tokens, s.reasoning_tokens) == (20, 5, 4, 1)


def test_add_usage_embeddings_has_no_output_tokens() -> None:
    s = Stats()
    s.add_usage({"object": "list", "data": [], "usage": {"prompt_tokens": 9, "total_tokens": 9}})
    assert (s.input_tokens, s.output_tokens) == (9, 0)


@pytest.mark.parametrize("body", [
    None, [], "text", {"no": "usage"}, {"usage": None}, {"usage": "x"}, {"usage": {"prompt_tokens": "12"}},
    {"usage": {"prompt_tokens_details": None, "completion_tokens_details": None}}])
def test_add_usage_ignores_what_it_cannot_read(body: object) -> None:
    s = Stats()
    s.add_usage(body)
    assert (s.input_tokens, s.output_tokens, s.cached_tokens, s.reasoning_tokens) == (0, 0, 0, 0)


def test_add_usage_mixed_endpoints_sum() -> None:
    s = Stats()
    s.add_usage({"usage": {"prompt_tokens": 10, "completion_tokens": 2}})
    s.add_usage({"usage": {"input_tokens": 5, "output_tokens": 3}})
    s.add_usage({"usage": {"prompt_tokens": 4, "total_tokens": 4}})
    assert (s.input_tokens, s.output_tokens) == (19, 5)


# ------------------------------------------------------------------ batch_object


def test_fresh_batch_object_validates() -> None:
    b = batch_object(BatchInfo(), Stats())
    Batch.model_validate(b, strict=True)
    assert b["object"] == "batch" and b["id"].startswith("batch_")
    assert b["status"] == "validating"
    assert b["errors"] is None
    assert b["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert b["hfbatch"]["latency_ms"] == {"p50": None, "p95": None}


def test_completed_batch_object() -> None:
    info, s = BatchInfo(input_file_id="in.jsonl"), Stats(total=3, completed=2, failed=1, sent=5, retries=2)
    s.add_usage({"usage": {"prompt_tokens": 10, "completion_tokens": 4,
                           "prompt_tokens_details": {"cached_tokens": 1}}})
    s.add_usage({"usage": {"input_tokens": 6, "output_tokens": 2,
                           "output_tokens_details": {"reasoning_tokens": 1}}})
    s.providers.update({"fake-a": 1, "fake-b": 1})
    s.concurrency, s.pace = {"fake-a": 40, "fake-b": 200}, {"fake-b": 291.0}
    s.models.update({"org/m": 3})
    s.endpoints.update({"/v1/chat/completions": 2, "/v1/responses": 1})
    s.latency.add(0.1)
    s.latency.add(0.2)
    for st in ("in_progress", "finalizing", "completed"):
        info.set_status(st)
    info.output_file_id, info.error_file_id, info.state = "in.output.jsonl", "in.errors.jsonl", "finished"
    b = batch_object(info, s)
    batch = Batch.model_validate(b, strict=True)
    assert batch.status == "completed"
    assert b["in_progress_at"] and b["finalizing_at"] and b["completed_at"]
    assert b["failed_at"] is None and b["cancelled_at"] is None
    assert b["expires_at"] == b["created_at"] + 86400
    assert b["endpoint"] == "/v1/chat/completions"
    assert b["model"] == "org/m"
    assert b["input_file_id"] == "in.jsonl"
    assert b["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert b["usage"] == {"input_tokens": 16, "input_tokens_details": {"cached_tokens": 1},
                          "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 1},
                          "total_tokens": 22}
    hb = b["hfbatch"]
    assert hb["http_requests"] == 5 and hb["retries"] == 2
    assert hb["providers"] == {"fake-a": 1, "fake-b": 1}
    assert hb["concurrency"] == {"fake-a": 40, "fake-b": 200} and hb["pace_rps"] == {"fake-b": 291.0}
    assert hb["models"] == {"org/m": 3}
    assert hb["endpoints"] == {"/v1/chat/completions": 2, "/v1/responses": 1}
    assert hb["state"] == "finished" and hb["stop_reason"] is None and hb["unsent"] == 0
    assert hb["latency_ms"]["p50"] is not None and hb["latency_ms"]["p95"] is not None
    assert hb["elapsed_seconds"] >= 0


def test_several_models_give_model_none() -> None:
    s = Stats()
    s.models.update({"a": 1, "b": 1})
    assert batch_object(BatchInfo(), s)["model"] is None


def test_failed_batch_lists_its_errors() -> None:
    info = BatchInfo()
    info.errors = [LineError(2, None, "invalid_json_line", "bad json"),
                   LineError(5, "x", "duplicate_custom_id", "dup", "custom_id")]
    info.set_status("failed")
    b = batch_object(info, Stats(total=5))
    batch = Batch.model_validate(b, strict=True)
    assert batch.status == "failed" and b["failed_at"] is not None
    assert b["errors"] == {"object": "list", "data": [
        {"code": "invalid_json_line", "line": 2, "message": "bad json", "param": None},
        {"code": "duplicate_custom_id", "line": 5, "message": "dup", "param": "custom_id"}]}


def test_dropped_errors_are_counted_and_still_valid() -> None:
    info = BatchInfo()
    info.errors = [LineError(1, None, "invalid_json_line", "bad")]
    info.errors_dropped = 41
    info.set_status("failed")
    b = batch_object(info, Stats())
    Batch.model_validate(b, strict=True)
    assert b["errors"]["data"][-1]["code"] == "too_many_errors"
    assert "41" in b["errors"]["data"][-1]["message"]


def test_stopped_batch_stays_in_progress() -> None:
    info = BatchInfo()
    info.set_status("in_progress")
    info.state, info.stop_reason, info.unsent = "interrupted", "credits", 7
    b = batch_object(info, Stats(total=10, completed=3))
    Batch.model_validate(b, strict=True)
    assert b["status"] == "in_progress" and b["completed_at"] is None
    assert b["hfbatch"]["state"] == "interrupted" and b["hfbatch"]["stop_reason"] == "credits"
    assert b["hfbatch"]["unsent"] == 7


def test_batch_ids_are_unique() -> None:
    assert len({BatchInfo().id for _ in range(50)}) == 50


def test_latency_histograms_merge_across_processes() -> None:
    """A Ray run's workers each keep one; the driver adds their buckets: the same quantiles as one histogram."""
    one, a, b = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for i, seconds in enumerate([0.01 * k for k in range(1, 200)]):
        one.add(seconds)
        (a if i % 3 else b).add(seconds)
    merged = LatencyHistogram()
    merged.merge(a.counts())
    merged.merge(b.counts())
    assert merged.count == one.count == 199
    assert merged.quantile(0.5) == one.quantile(0.5) and merged.quantile(0.95) == one.quantile(0.95)
