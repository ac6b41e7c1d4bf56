"""What people read on a terminal, rendered at 80 and 120 columns: every batch id, model, path, count and cost
appears whole (never `batch_4c…`, `test-o…`, `$0.00…`), no line is wider than the terminal unless it is one
field longer than the terminal, and the progress line keeps done/total, the rate and the ETA."""

from __future__ import annotations

import pytest
from rich.cells import cell_len
from rich.text import Text

from hfbatch.cli.tables import (
    Col,
    Snapshot,
    batch_view,
    compare_view,
    estimate_view,
    list_view,
    plain,
    progress_line,
    table,
)

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


def gpu_batch(*, cost: float | None, basis: str) -> dict[str, object]:
    b = batch(6, total=40, failed=0, done=40, model=None)
    hb = b["hfbatch"]
    assert isinstance(hb, dict)
    hb.update(latency_ms={"p50": None, "p95": None}, http_requests=0, retries=0, providers={},
              cost={"estimated_cost_usd": cost, "unpriced_requests": 0, "basis": basis},
              models={"org-a/chat-one": 20, LONG_MODEL: 20},
              jobs=[{"part": "p0001", "model": "org-a/chat-one", "requests": 20, "id": "41234", "url": None,
                     "flavor": "local", "stage": "COMPLETED", "billed_seconds": None, "answered": 20, "message": None},
                    {"part": "p0002", "model": LONG_MODEL, "requests": 20, "id": "68ab12cd34ef5678",
                     "url": "https://huggingface.co/jobs/my-org/68ab12cd34ef5678", "flavor": "a100-large",
                     "stage": "ERROR", "billed_seconds": 120.0, "answered": 7, "message": "CUDA out of memory"}])
    return b


@pytest.mark.parametrize("width", WIDTHS)
def test_a_gpu_batch_view_shows_its_jobs_and_no_http_figures(width: int) -> None:
    text = check_lines(batch_view(gpu_batch(cost=None, basis="gpu_time"), width), width, [
        "p0001", "p0002", "org-a/chat-one", LONG_MODEL, "COMPLETED", "ERROR", "20/20", "7/20", "local",
        "a100-large", "pid 41234", "https://huggingface.co/jobs/my-org/68ab12cd34ef5678",
        "unknown (pass --gpu-price USD_PER_HOUR)", "40/40 done", f"{LONG_MODEL} 20", "org-a/chat-one 20"])
    assert "p50" not in text and "http" not in text.replace("https://", "")  # no latency or HTTP figures
    assert "no prices for these models" not in text
    jobs = plain(batch_view(gpu_batch(cost=0.0867, basis="jobs_billing"), width))
    assert "~$0.0867 (estimate)" in jobs and "--gpu-price" not in jobs
    assert "no prices for these models" in plain(batch_view(gpu_batch(cost=None, basis="jobs_billing"), width))


@pytest.mark.parametrize("width", [40, 80, 120])
def test_a_gpu_runs_progress_line_shows_its_parts_stages_not_retries(width: int) -> None:
    snap = Snapshot(done=12, total=40, elapsed=3.0, failed=1, retries=5, in_flight=7, gpu=True,
                    stages=("p0001 RUNNING 12/20 GPU 87% 12.3/80 GB", "p0002 SCHEDULING 0/20"))
    line = progress_line(snap, width).plain
    assert cell_len(line) <= width, line
    assert "12/40" in line and "eta" in line and "retries" not in line and "in flight" not in line
    if width >= 80:
        assert "p0001 RUNNING 12/20 GPU 87% 12.3/80 GB" in line and "failed 1" in line
    if width >= 120:
        assert "p0002 SCHEDULING 0/20" in line
    narrow = progress_line(snap, 60).plain  # the first stage does not fit: left out alone, the rest still shown
    assert "RUNNING" not in narrow and "0:03" in narrow


@pytest.mark.parametrize("width", WIDTHS)
def test_compare_shows_options_bases_skipped_flavors_and_notes(width: int) -> None:
    basis = ("org/m: start-up 3.2 min (image pull + weights + engine start: a prior); prior: A100 6,250 tokens/s for "
             "an 8B BF16 model (Lambda), x1 for 16 GB of weights | org/n: start-up 1.1 min (measured); measured "
             "1,234 tokens/s")
    cmp = {"requests": 100_000, "options": [
        {"engine": "http", "provider": "novita", "cost_usd": 4.09, "minutes": None, "basis": "tokens x price"},
        {"engine": "hf-jobs", "flavor": "a100-large", "cost_usd": 8.0, "minutes": 191.2, "basis": basis}],
        "skipped_flavors": [{"flavor": "t4-small", "why": "org/m needs about 20 GB of GPU memory; t4-small has 16"}],
        "notes": ["Jobs: billed per started minute of each Job (one per model) at the flavor's price from the Hub's "
                  "hardware list; output tokens counted at their upper bound (max_tokens)"]}
    lines = compare_view(cmp, width)
    text = check_lines(lines, width, ["100,000 requests", "novita", "a100-large", "$4.0900", "$8.0000",
                                      "191.2 min", "HF Jobs", "serverless", "not shown: t4-small"])
    assert all(cell_len(line) <= width for line in text.splitlines())
    words = text.split()
    for part in (basis, cmp["skipped_flavors"][0]["why"], cmp["notes"][0]):  # wrapped between words, none cut
        for word in part.replace(" | ", " ").split():
            assert word in words, word
    rows = text.splitlines()
    assert rows.index(next(r for r in rows if "a100-large" in r)) < rows.index(next(r for r in rows if "org/m:" in r))
