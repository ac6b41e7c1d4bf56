"""Tables and the progress line for people, laid out for a terminal's width (pure: data and a width in, lines out).

What people read them for is never cut: batch ids, model names, paths, counts and money appear whole. When a row
is wider than the terminal, its less useful columns leave it, in a set order: moved to an indented line under the
row, or dropped when nothing is lost; a row that still does not fit is stacked (one field a line). A line that is
longer than the terminal (a very long path alone) is printed whole and left to the terminal to wrap."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.text import Text

GAP = 2  # spaces between columns


@dataclass(frozen=True)
class Col:
    header: str
    right: bool = False
    give: int = 0  # 0: always in the row; 1, 2, ...: the order in which it leaves a row that is too wide
    drop: bool = False  # when it leaves, drop it (its content is elsewhere) instead of moving it under the row


def natural_width(cols: list[Col], rows: list[list[str]]) -> int:
    """The width of the whole table, every column in the row."""
    widths = [max([cell_len(c.header), *(cell_len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    return sum(widths) + GAP * (len(cols) - 1)


def table(cols: list[Col], rows: list[list[str]], width: int, indent: int = 0,
          under: list[list[str]] | None = None) -> list[Text]:
    """A header and one line per row, in `width` columns; see the module's docstring for what happens when they do
    not fit. `under`: per row, prose shown dim under it (wrapped between words, never inside one)."""
    pad = " " * indent
    widths = [max([cell_len(c.header), *(cell_len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    kept = list(range(len(cols)))
    moved: list[int] = []

    def total() -> int:
        return indent + sum(widths[i] for i in kept) + GAP * (len(kept) - 1)

    for i in sorted((i for i, c in enumerate(cols) if c.give), key=lambda i: cols[i].give):
        if total() <= width:
            break
        kept.remove(i)
        if not cols[i].drop:
            moved.append(i)
    if total() > width and len(kept) > 1:
        return _stacked(cols, rows, width, indent, under)
    lines = [Text(pad + _join([_cell(cols[i].header, widths[i], cols[i].right) for i in kept]), style="bold")]
    for n, r in enumerate(rows):
        lines.append(Text(pad + _join([_cell(r[i], widths[i], cols[i].right) for i in kept])))
        for i in moved:
            if r[i]:
                lines.append(Text(f"{pad}  {cols[i].header.lower()} {r[i]}", style="dim"))
        for prose in (under[n] if under else []):
            lines += wrapped(prose, width, indent + 2)
    return lines


def _stacked(cols: list[Col], rows: list[list[str]], width: int, indent: int,
             under: list[list[str]] | None = None) -> list[Text]:
    pad = " " * indent
    key = max(cell_len(c.header) for c in cols[1:]) if len(cols) > 1 else 0
    lines: list[Text] = []
    for n, r in enumerate(rows):
        lines.append(Text(pad + r[0], style="bold"))
        for c, v in zip(cols[1:], r[1:], strict=True):
            if v:
                line = Text(f"{pad}  ")
                line.append(c.header.lower().ljust(key), style="dim")
                line.append(f"  {v}")
                lines.append(line)
        for prose in (under[n] if under else []):
            lines += wrapped(prose, width, indent + 2)
    return lines


def wrapped(text: str, width: int, indent: int = 0, style: str = "dim") -> list[Text]:
    """Prose in lines of `width` at most, broken between words (a word longer than a line is left whole, to the
    terminal); continuation lines are indented 2 more."""
    import textwrap

    lines = textwrap.wrap(text, max(width - indent, 20), subsequent_indent="  ", break_long_words=False,
                          break_on_hyphens=False) or [""]
    return [Text(" " * indent + line, style=style) for line in lines]


def _cell(text: str, width: int, right: bool) -> str:
    space = " " * (width - cell_len(text))
    return space + text if right else text + space


def _join(cells: list[str]) -> str:
    return (" " * GAP).join(cells).rstrip()


def key_values(pairs: list[tuple[str, str]], indent: int = 2) -> list[Text]:
    """`key  value` lines; values are never cut."""
    key = max((cell_len(k) for k, _ in pairs), default=0)
    out = []
    for k, v in pairs:
        line = Text(" " * indent)
        line.append(k.ljust(key), style="dim")
        line.append(f"  {v}")
        out.append(line)
    return out


def plain(lines: list[Text]) -> str:
    return "\n".join(line.plain for line in lines)


# ------------------------------------------------------------------ figures


def usd(x: float | None) -> str:
    """$ figure: 6 decimals under a cent, else 4 (never rounded away); None -> 'unknown'."""
    return "unknown" if x is None else (f"${x:.6f}" if x < 0.01 else f"${x:,.4f}")


def duration(seconds: float | None) -> str:
    """0:07, 12:03, 1:02:03; '-' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds > 1e8:
        return "-"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rate(per_second: float | None) -> str:
    if not per_second:
        return "-/s"
    return f"{per_second:,.0f}/s" if per_second >= 10 else f"{per_second:,.1f}/s"


def short_path(path: str | None) -> str:
    """A path relative to the current folder when it is under it (shorter, still whole and exact)."""
    if not path or path == "-":
        return path or "—"
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") and len(rel) < len(path) else path


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if isinstance(ts, int | float) else ""


def _status(batch: dict[str, Any]) -> str:
    state = (batch.get("hfbatch") or {}).get("state")
    status = str(batch.get("status"))
    return status + (f" ({state})" if state and state not in ("finished", status) else "")


# ------------------------------------------------------------------ hfbatch list


def list_view(batches: list[dict[str, Any]], width: int) -> list[Text]:
    if not batches:
        return [Text("no batches yet: `hfbatch submit FILE` runs one", style="dim")]
    cols = [Col("ID"), Col("STATUS"), Col("DONE", right=True), Col("FAILED", right=True, give=3),
            Col("CREATED", give=2), Col("INPUT", give=1)]
    rows = []
    for b in batches:
        rc = b["request_counts"]
        rows.append([str(b["id"]), _short_status(b), f"{rc['completed'] + rc['failed']:,}/{rc['total']:,}",
                     f"{rc['failed']:,}", _when(b.get("created_at")), short_path(b.get("input_file_id"))])
    return table(cols, rows, width)


def _short_status(batch: dict[str, Any]) -> str:
    """OpenAI's status, or our state where it says more (an in_progress batch whose process is gone is
    interrupted: `hfbatch resume` continues it)."""
    state = (batch.get("hfbatch") or {}).get("state")
    return "interrupted" if state == "interrupted" else str(batch.get("status"))


# ------------------------------------------------------------------ hfbatch estimate


def estimate_view(est: dict[str, Any], width: int) -> list[Text]:
    """The models and their providers, cheapest first: one flat table when it fits, else each model on its own
    line with its providers under it."""
    from ..cost.pricing import iso

    out = [Text(f"Cost estimate: {est['requests']:,} requests (USD, an estimate)", style="bold"), Text("")]
    cols = [Col("MODEL"), Col("PROVIDER"), Col("NOTE", give=1), Col("REQUESTS", right=True), Col("IN TOK", right=True),
            Col("OUT TOK", right=True), Col("$/M IN", right=True), Col("$/M OUT", right=True),
            Col("COST", right=True)]
    rows: list[list[str]] = []
    groups: list[tuple[str, list[list[str]]]] = []
    for model, m in est["models"].items():
        sub = [_provider_cells(m, p) for p in m["providers"] or [None]]
        for i, cells in enumerate(sub):
            per_model = [model, *_model_cells(m)] if i == 0 else ["", "", "", ""]
            rows.append([per_model[0], *cells[:2], *per_model[1:], *cells[2:]])
        groups.append((model, sub))
    if natural_width([c for c in cols if not c.give], [[v for c, v in zip(cols, r, strict=True) if not c.give]
                                                       for r in rows]) <= width:
        out += table(cols, rows, width)  # one table (the notes under their rows if they do not fit)
    else:
        sub_cols = [Col("PROVIDER"), Col("NOTE"), Col("$/M IN", right=True), Col("$/M OUT", right=True),
                    Col("COST", right=True)]
        for n, (model, sub) in enumerate(groups):
            m = est["models"][model]
            if n:
                out.append(Text(""))
            out.append(Text(model, style="bold"))
            out.append(Text(f"  {m['requests']:,} requests · {m['input_tokens']:,} tokens in (est.) · "
                            f"{m['max_output_tokens']:,} out (max)", style="dim"))
            out += table(sub_cols, sub, width, indent=2)
    t = est["total"]
    out.append(Text(""))
    out.append(Text(f"cheapest {usd(t['cheapest_usd'])} · most expensive {usd(t['most_expensive_usd'])} · "
                    f"savings {usd(t['savings_usd'])}"))
    when = f" ({iso(est['prices_fetched_at'])})" if est.get("prices_fetched_at") else ""
    out.append(Text(f"prices: {est['price_source']}{when} · expected: the provider the router picks", style="dim"))
    for note in est.get("notes") or []:
        out.append(Text(f"note: {note}", style="dim"))
    return out


def _model_cells(m: dict[str, Any]) -> list[str]:
    return [f"{m['requests']:,}", f"{m['input_tokens']:,}", f"{m['max_output_tokens']:,}"]


def _provider_cells(m: dict[str, Any], p: dict[str, Any] | None) -> list[str]:
    """PROVIDER, NOTE, $/M IN, $/M OUT, COST."""
    if p is None:
        return ["-", "", "?", "?", "unknown"]
    notes = [n for n, on in (("expected", p["provider"] == m["expected_provider"]), ("fastest", p["fastest"])) if on]
    return [p["provider"], ", ".join(notes), "?" if p["input_price"] is None else f"{p['input_price']:g}",
            "?" if p["output_price"] is None else f"{p['output_price']:g}", usd(p["cost_usd"])]


def compare_view(cmp: dict[str, Any], width: int) -> list[Text]:
    """`estimate --compare`: serverless providers and a Job per model on each flavor, cheapest first; each option's
    basis (one line per model) under its row, then the flavors left out and why, and the notes."""
    out = [Text(f"Tokens or GPU minutes: {cmp['requests']:,} requests (USD, estimates, cheapest first)",
                style="bold"), Text("")]
    cols = [Col("ENGINE"), Col("PROVIDER / FLAVOR"), Col("COST", right=True), Col("WALL TIME", right=True)]
    rows, under = [], []
    for o in cmp["options"]:
        minutes = o.get("minutes")
        rows.append(["serverless" if o["engine"] == "http" else "HF Jobs", o.get("provider") or o.get("flavor") or "",
                     usd(o.get("cost_usd")), "?" if minutes is None else f"{minutes:,.1f} min"])
        under.append([b.strip() for b in str(o.get("basis") or "").split(" | ") if b.strip()])
    if rows:
        out += table(cols, rows, width, under=under)
    else:
        out.append(Text("no option could be priced (see the notes)", style="dim"))
    if cmp.get("skipped_flavors") or cmp.get("notes"):
        out.append(Text(""))
    for skip in cmp.get("skipped_flavors") or []:
        out += wrapped(f"not shown: {skip['flavor']}: {skip['why']}", width)
    for note in cmp.get("notes") or []:
        out += wrapped(f"note: {note}", width)
    return out


# ------------------------------------------------------------------ a batch (submit's end, status, cancel, wait)


def batch_view(batch: dict[str, Any], width: int, *, live: bool = False) -> list[Text]:
    """A batch in a few lines: its id and status, the counts, time and rate (and, while it runs, the ETA), tokens,
    cost, a GPU engine's runs (one row each: no HTTP or latency figures then), and its files in one line at the
    end."""
    hb = batch.get("hfbatch") or {}
    jobs = hb.get("jobs") or []  # --engine vllm / hf-jobs: each run of a part
    rc, usage = batch["request_counts"], batch.get("usage") or {}
    head = Text(str(batch["id"]), style="bold")
    head.append(f"  {_status(batch)}")
    pairs: list[tuple[str, str]] = []
    done = rc["completed"] + rc["failed"]
    pairs.append(("requests", f"{done:,}/{rc['total']:,} done · {rc['completed']:,} ok · {rc['failed']:,} failed"
                  + (f" · {hb['unsent']:,} not sent" if hb.get("unsent") else "")))
    rps = hb.get("requests_per_second")
    if "elapsed_seconds" in hb:
        running = live and batch.get("status") in ("validating", "in_progress", "finalizing", "cancelling")
        eta = (rc["total"] - done) / rps if running and rps else None
        timing = f"{duration(hb['elapsed_seconds'])} · {rate(rps)}"
        if running:
            timing += f" · eta {duration(eta)}"
        lat = hb.get("latency_ms") or {}
        if lat.get("p50") is not None and not jobs:
            timing += f" · p50 {lat['p50']:,} ms · p95 {lat['p95']:,} ms"
        pairs.append(("time", timing))
    if usage:
        pairs.append(("tokens", f"{usage.get('input_tokens', 0):,} in · {usage.get('output_tokens', 0):,} out"))
    if hb.get("http_requests") and not jobs:
        pairs.append(("http", f"{hb['http_requests']:,} requests · {hb.get('retries', 0):,} retries"))
    cost = hb.get("cost") or {}
    if cost:
        spent = cost.get("estimated_cost_usd")
        unpriced = cost.get("unpriced_requests") or 0
        unknown = ("unknown (pass --gpu-price USD_PER_HOUR)" if cost.get("basis") == "gpu_time"
                   else "unknown (no prices for these models)")
        pairs.append(("cost", (unknown if spent is None else
                               f"~{usd(spent)}{' so far' if live and done < rc['total'] else ''} (estimate)")
                      + (f" · {unpriced:,} requests unpriced" if unpriced and spent is not None else "")))
    saved = hb.get("savings") or {}
    n_saved = sum(saved.get(k) or 0 for k in ("deduped_requests", "cache_hits", "coalesced_requests"))
    if n_saved:
        pairs.append(("saved", f"{n_saved:,} requests not sent · ~{usd(saved.get('estimated_saved_usd') or 0)}"))
    if hb.get("providers"):
        pairs += _listing("providers", [f"{k} {v:,}" for k, v in hb["providers"].items()], width)
    if batch.get("model"):
        pairs.append(("model", str(batch["model"])))
    elif hb.get("models"):
        pairs += _listing("models", [f"{k} {v:,}" for k, v in hb["models"].items()], width)
    if live:
        pairs.append(("input", short_path(batch.get("input_file_id"))))
        pairs.append(("created", _when(batch.get("created_at"))))
    return [head, *key_values(pairs), *jobs_lines(jobs, width), *files_lines(batch, width)]


def _listing(key: str, items: list[str], width: int) -> list[tuple[str, str]]:
    """`key  a 1, b 2` when it fits the width (the keys of batch_view are 9 columns at most), else one item a
    line under the key (several models with long names)."""
    if cell_len(", ".join(items)) <= width - 2 - 9 - 2:
        return [(key, ", ".join(items))]
    return [(key if i == 0 else "", item) for i, item in enumerate(items)]


def jobs_lines(jobs: list[dict[str, Any]], width: int) -> list[Text]:
    """A GPU engine's runs, one row each: part, model, stage, answered/requests, flavor, and the Job's page (or a
    local run's process id), which moves under the row first when the row is too wide, then the flavor."""
    if not jobs:
        return []
    cols = [Col("PART"), Col("MODEL"), Col("STAGE"), Col("ANSWERED", right=True), Col("FLAVOR", give=2),
            Col("WHERE", give=1)]
    rows = [[str(j.get("part") or ""), str(j.get("model") or ""), str(j.get("stage") or ""),
             f"{j.get('answered') or 0:,}/{j.get('requests') or 0:,}", str(j.get("flavor") or ""),
             str(j.get("url") or (f"pid {j['id']}" if j.get("id") else ""))] for j in jobs]
    return table(cols, rows, width, indent=2)


def files_lines(batch: dict[str, Any], width: int) -> list[Text]:
    """One line naming the files a batch wrote (two when one does not hold both paths whole)."""
    out, err = Text("output ", style="dim"), Text("errors ", style="dim")
    out.append(short_path(batch.get("output_file_id")))
    err.append(short_path(batch.get("error_file_id")))
    if cell_len(out.plain) + 3 + cell_len(err.plain) > width:
        return [out, err]
    return [Text.assemble(out, (" · ", "dim"), err)]


# ------------------------------------------------------------------ the progress line


@dataclass(frozen=True)
class Snapshot:
    done: int
    total: int | None
    elapsed: float
    failed: int = 0
    retries: int = 0
    in_flight: int = 0
    cost: float | None = None
    limits: tuple[int, ...] = ()
    gpu: bool = False  # a GPU engine's run (vLLM's runner, Jobs): its parts' stages, no retries or in flight
    stages: tuple[str, ...] = ()  # per running part: "p0001 RUNNING 120/500" (Jobs: GPU use too)


BAR_MIN, BAR_MAX = 10, 30


def progress_line(s: Snapshot, width: int) -> Text:
    """done/total, the rate and the ETA always, whole; then, as the width allows, in this order: failed, cost, a
    bar, elapsed, retries, in flight, the concurrency limits (the less useful leave first; the bar, 10 columns at
    least, is left out alone when it does not fit). A GPU engine's run: failed, cost, the first running part's
    stage (minutes of SCHEDULING or loading show no other progress; left out alone, like the bar, when it does
    not fit), the bar, elapsed, the other parts' stages, instead of retries and in flight."""
    per_s = s.done / s.elapsed if s.elapsed > 0.5 or (s.done and s.done == s.total and s.elapsed > 0) else None
    total = s.total or None
    fields: list[tuple[str, str]] = [(f"{s.done:,}/{total:,}" if total else f"{s.done:,}", "green"),
                                     (rate(per_s), "")]
    if total:
        fields.append((f"eta {duration((total - s.done) / per_s) if per_s else '-'}", "cyan"))
    extra: list[tuple[str, str]] = []
    alone: set[str] = set()  # left out alone when they do not fit (what follows may still)
    if s.failed:
        extra.append((f"failed {s.failed:,}", "red"))
    if s.cost:
        extra.append((f"~{usd(s.cost)}", ""))
    if s.gpu:
        extra += [(stage, "cyan") for stage in s.stages[:1]]
        alone.update(s.stages[:1])
    extra.append(("BAR", ""))
    extra.append((duration(s.elapsed), "yellow"))
    if s.gpu:
        extra += [(stage, "cyan") for stage in s.stages[1:]]
    else:
        if s.retries:
            extra.append((f"retries {s.retries:,}", "dim"))
        extra.append((f"in flight {s.in_flight:,}", "dim"))
    if s.limits:
        extra.append(("limit " + ",".join(str(v) for v in s.limits), "dim"))
    used = sum(cell_len(t) for t, _ in fields) + GAP * (len(fields) - 1)
    shown: list[tuple[str, str]] = []
    bar = 0
    for text, style in extra:
        if text == "BAR":
            if total and used + GAP + BAR_MIN <= width:
                bar = BAR_MIN
                used += GAP + BAR_MIN
                shown.append((text, style))
            continue
        if used + GAP + cell_len(text) > width:
            if text in alone:
                continue
            break  # what follows is less useful than what did not fit
        used += GAP + cell_len(text)
        shown.append((text, style))
    if bar:
        bar = min(BAR_MAX, BAR_MIN + width - used)
    line = Text()
    if bar and total:
        filled = min(bar, int(bar * s.done / total))
        line.append("━" * filled, style="green")
        line.append("─" * (bar - filled), style="grey37")
        line.append(" " * GAP)
    parts = fields + [(t, st) for t, st in shown if t != "BAR"]
    for i, (text, style) in enumerate(parts):
        if i:
            line.append(" " * GAP)
        line.append(text, style=style or None)
    return line
