"""What people read on a terminal, rendered at 80 and 120 columns: every batch id, model, path, count and cost
appears whole (never `batch_4c…`, `test-o…`, `$0.00…`), no line is wider than the terminal unless it is one
field longer than the terminal, and the progress line keeps done/total, the rate and the ETA."""

from __future__ import annotations

import pytest
from rich.cells import cell_len
from rich.text import Text

from hfbatch.cli.tables import Col, Snapshot, batch_view, estimate_view, list_view, plain, progress_line, table

WIDTHS = [80, 120]
LONG_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B:cheapest"
PATH = "/data/projects/customer-feedback/2026-11/batches/reviews-part-0007.jsonl"


def batch(i: int, *, status: str = "completed", state: str = "finished", total: int = 1_000_000,
          failed: int = 12_345, done: int | None = None, path: str = PATH,
          model: str | None = LONG_MODEL) -> dict[str, object]:
    done = total - 1000 * i if done is None else done
    return {
        "id": f"batch_{i:024x}", "object": "batch", "status": status, "model": model,
        "input_file_id": path, "output_file_id": path.replace(".jsonl", ".output.jsonl"),
        "error_file_id": path.replace(".jsonl", ".errors.jsonl"), "created_at": 1_795_000_000 + i,
        "request_counts": {"total": total, "completed": done - failed, "failed": failed},
        "usage": {"input_tokens": 123_456_789, "output_tokens": 98_765_432},
        "hfbatch": {"state": state, "elapsed_seconds": 4321.5, "requests_per_second": 231.4,
                    "latency_ms": {"p50": 812.3, "p95": 2301.9}, "http_requests": 1_013_000, "retries": 13_000,
                    "providers": {"together": 600_000, "fireworks-ai": 387_655},
                    "cost": {"estimated_cost_usd": 1234.567891, "unpriced_requests": 0},
                    "savings": {"deduped_requests": 0}, "unsent": 0},
    }


def check_lines(lines: list[Text], width: int, whole: list[str]) -> str:
    text = plain(lines)
    for value in whole:
        assert value in text, f"{value!r} not whole at {width} columns:\n{text}"
    for line in text.splitlines():
        if cell_len(line) > width:  # only a single field may be longer than the terminal (left to it to wrap)
            assert len(line.split()) <= 2, f"line wider than {width}: {line!r}"
    assert "…" not in text
    return text


@pytest.mark.parametrize("width", WIDTHS)
def test_list_never_cuts_ids_counts_or_paths(width: int) -> None:
    rows = [batch(1), batch(2, status="in_progress", state="interrupted", path="b.jsonl"),
            batch(3, failed=0, total=7, done=7, path="samples/chat.jsonl")]
    text = check_lines(list_view(rows, width), width, [
        *(str(b["id"]) for b in rows), "999,000/1,000,000", "12,345", "interrupted", PATH, "samples/chat.jsonl",
        "7/7", "2026-11-"])
    lines = text.splitlines()
    # the long input path leaves the row first (onto a line under it), then, at 80 columns, the creation time
    assert lines[0].split() == ["ID", "STATUS", "DONE", "FAILED", "CREATED"][:5 if width >= 120 else 4]
    assert len(lines) == 1 + 3 * (2 if width >= 120 else 3)
    short = plain(list_view([batch(3, failed=0, total=7, done=7, path="samples/chat.jsonl")], width))
    assert short.splitlines()[0].split() == ["ID", "STATUS", "DONE", "FAILED", "CREATED", "INPUT"][
        :6 if width >= 120 else 5]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("model", [LONG_MODEL, "meta-llama/Llama-3.1-8B-Instruct"])
def test_estimate_never_cuts_models_or_money(width: int, model: str) -> None:
    def provider(name: str, price: float | None, cost: float | None, fastest: bool = False) -> dict[str, object]:
        return {"provider": name, "input_price": price, "output_price": price and price * 3, "cost_usd": cost,
                "fastest": fastest, "status": "live"}

    est = {"requests": 1_234_567, "models": {
        model: {"requests": 1_234_000, "input_tokens": 98_765_432, "max_output_tokens": 631_808_000,
                     "expected_provider": "fireworks-ai", "providers": [
                         provider("novita", 0.07, 0.000012), provider("fireworks-ai", 0.9, 1234.5678, True)]},
        "test-org/tiny-chat": {"requests": 567, "input_tokens": 4_000, "max_output_tokens": 290_304,
                               "expected_provider": None, "providers": []}},
        "total": {"cheapest_usd": 0.000012, "most_expensive_usd": 1234.5678, "savings_usd": 1234.567788},
        "price_source": "router", "prices_fetched_at": 1_795_000_000, "notes": ["input tokens estimated"]}
    text = check_lines(estimate_view(est, width), width, [
        model, "test-org/tiny-chat", "$0.000012", "$1,234.5678", "1,234,000",
        "98,765,432", "631,808,000", "567", "novita", "fireworks-ai", "expected", "fastest", "unknown",
        "1,234,567 requests"])
    flat = any(model in line and "$0.000012" in line for line in text.splitlines())
    # one table when it fits (120 columns, a model name of usual length); else each model on its own line, its
    # providers under it
    assert flat == (width >= 120 and model != LONG_MODEL)


@pytest.mark.parametrize("width", WIDTHS)
def test_a_batch_view_keeps_every_figure_whole(width: int) -> None:
    b = batch(4, status="in_progress", state="running")
    text = check_lines(batch_view(b, width, live=True), width, [
        str(b["id"]), "996,000/1,000,000 done", "12,345 failed", "~$1,234.5679 so far", "231/s", "eta 0:17",
        LONG_MODEL, PATH.replace(".jsonl", ".output.jsonl"), PATH.replace(".jsonl", ".errors.jsonl"),
        "together 600,000", "123,456,789 in", "1,013,000 requests", "in_progress (running)"])
    assert "eta" in text
    done = batch_view(batch(5), width, live=False)
    assert "eta" not in plain(done) and "so far" not in plain(done)


@pytest.mark.parametrize("width", [40, 80, 120])
def test_progress_line_keeps_done_total_rate_and_eta(width: int) -> None:
    snap = Snapshot(done=8, total=1_000_000, elapsed=2.0, failed=3, retries=12, in_flight=512, cost=0.000123,
                    limits=(512, 64))
    line = progress_line(snap, width).plain
    assert cell_len(line) <= width, line
    for whole in ("8/1,000,000", "4.0/s", "eta 69:26:38"):
        assert whole in line, line
    assert "…" not in line
    if width >= 80:
        assert "failed 3" in line and "~$0.000123" in line and "──────────" in line  # the bar (still empty)
    if width >= 120:
        assert "in flight 512" in line and "limit 512,64" in line
    # the less useful leave first: what is shown is a prefix of this order (the bar may be left out alone)
    order = ["failed", "~$", "0:02", "retries", "in flight", "limit"]
    shown = [f for f in order if f in line]
    assert shown == order[:len(shown)], line


def test_progress_line_without_a_total() -> None:
    line = progress_line(Snapshot(done=12_345, total=None, elapsed=10.0), 80).plain
    assert line.startswith("12,345  1,234/s") and "eta" not in line


def test_columns_leave_in_order_then_rows_stack() -> None:
    cols = [Col("ID"), Col("A", give=2), Col("B", give=1), Col("C", give=3, drop=True)]
    rows = [["x" * 20, "a" * 10, "b" * 10, "c" * 10]]
    assert plain(table(cols, rows, 80)).splitlines()[1] == f"{'x' * 20}  {'a' * 10}  {'b' * 10}  {'c' * 10}"
    narrow = plain(table(cols, rows, 44)).splitlines()  # B moves under the row
    assert narrow == [f"{'ID':20}  {'A':10}  C", f"{'x' * 20}  {'a' * 10}  {'c' * 10}", f"  b {'b' * 10}"]
    narrower = plain(table(cols, rows, 30)).splitlines()  # then A; C goes (dropped)
    assert narrower == ["ID", "x" * 20, f"  b {'b' * 10}", f"  a {'a' * 10}"]
    stacked = plain(table([Col("ID"), Col("NAME")], [["x" * 20, "n" * 20]], 30)).splitlines()
    assert stacked == ["x" * 20, f"  name  {'n' * 20}"]
