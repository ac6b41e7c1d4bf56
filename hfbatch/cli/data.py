"""Dataset commands: prepare (a dataset -> a batch file) and merge (a dataset + a batch's answers -> a dataset,
optionally pushed to the Hub). Flags -> one call into hfbatch.data -> a report (JSON on stdout when piped or
--json; a few lines for people on a terminal). hfbatch.data and pyarrow are imported only when these run."""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from .options import TokenOpt

if TYPE_CHECKING:
    from ..data.merge import MergeReport
    from ..data.prepare import PrepareReport

DataArg = Annotated[str, typer.Argument(
    metavar="DATA", help="A .parquet, .csv, .tsv, .jsonl or .json file, a folder of them, a Hub dataset "
    "(hf://datasets/OWNER/NAME[/PATH] or OWNER/NAME), read through huggingface_hub's HfFileSystem.")]
IdColumnOpt = Annotated[str | None, typer.Option(
    help="The column whose values are the custom_ids (unique; checked) [default: the row number: row-0, row-1, "
    "...].")]
SplitOpt = Annotated[str | None, typer.Option(
    help="The split of a folder or Hub dataset [default: train, or its only split].")]
ConfigOpt = Annotated[str | None, typer.Option(
    help="The config (subset) of a Hub dataset whose card declares several.")]
RevisionOpt = Annotated[str | None, typer.Option(help="A branch, tag or commit of a Hub dataset [default: main].")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print the report as one JSON object (the default when piped).")]
_BATCH_ID_RE = re.compile(r"^batch_[0-9a-f]{8,}$")


def prepare(
    data: DataArg,
    model: Annotated[str, typer.Option("--model", "-m", help="The model of every request (with a :provider or "
                                       ":cheapest suffix if you like).", show_default=False)],
    column: Annotated[str | None, typer.Option(
        help="The column holding each row's prompt (a text, or a list of chat messages).")] = None,
    template: Annotated[str | None, typer.Option(
        help=r"The prompt built from columns: 'Summarize: {title}\n{body}' (\n and \t are read as a newline "
        "and a tab; {{ and }} are literal braces; a null value is empty).")] = None,
    system: Annotated[str | None, typer.Option(help="A system message (chat) or instructions (responses).")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="max_tokens (chat) or max_output_tokens "
                                                   "(responses) of every request.")] = None,
    endpoint: Annotated[str, typer.Option(help="chat | embeddings | responses.")] = "chat",
    id_column: IdColumnOpt = None,
    param: Annotated[list[str] | None, typer.Option(
        metavar="KEY=VALUE", help="Another body field, repeatable (temperature=0, response_format={...}); the "
        "value is read as JSON when it is JSON, else as text.")] = None,
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="The batch file to write; - is stdout [default: <file>.batch.jsonl beside a local "
        "file, <name>[-<split>].batch.jsonl here for a folder or the Hub].")] = None,
    split: SplitOpt = None,
    config: ConfigOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Turn a dataset's rows into an OpenAI batch input file: one request per row, streamed.

    custom_id is --id-column's value or row-<index>; `hfbatch merge` joins the answers back on it. Rows
    whose prompt is empty are skipped (listed in the report); merge marks them no_answer."""
    from ..data.arrow import pyarrow
    from ..data.prepare import Prompt, default_output, unescape, write_batch
    from ..data.source import resolve
    from ..errors import UsageError
    from .ui import RowsProgress

    pyarrow()  # the `data` extra: checked before anything is read
    prompt = Prompt(model=model, endpoint=endpoint, column=column,
                    template=unescape(template) if template is not None else None,
                    system=unescape(system) if system is not None else None, max_tokens=max_tokens,
                    params=_params(param))
    ds = resolve(data, split=split, config=config, revision=revision, token=token)
    out = output or default_output(ds)
    if out != "-":
        _check_writable(out, "-o")
        if ds.is_local_file(out):
            raise UsageError(f"-o {out} is a file of DATA itself; write the batch elsewhere")
    progress = RowsProgress(f"reading {ds.label}")
    try:
        report = write_batch(ds, prompt, out, stdout=sys.stdout.buffer, id_column=id_column, progress=progress.update)
    finally:
        progress.stop()
    _report(report, json=json, to_stderr=out == "-", human=_prepare_lines)


def merge(
    data: DataArg,
    answers: Annotated[str, typer.Argument(
        metavar="OUTPUT", help="The batch's output file (or its batch id, batch_..., as `hfbatch list` shows).")],
    output: Annotated[str, typer.Option(
        "--output", "-o", help="The result: .parquet, .csv, .tsv or .jsonl (the suffix picks the format).",
        show_default=False)],
    errors: Annotated[str | None, typer.Option(
        "--errors", "-e", help="The batch's error file [default: <name>.errors.jsonl beside <name>.output.jsonl, "
        "when it is there].")] = None,
    id_column: IdColumnOpt = None,
    prefix: Annotated[str, typer.Option(
        help="Put this before the new columns' names (when DATA already has a `response` column, say).")] = "",
    push_to_hub: Annotated[str | None, typer.Option(
        metavar="OWNER/NAME", help="Also upload the result to this Hub dataset (created if needed), with a short "
        "dataset card naming the data, model(s) and batch.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the --push-to-hub dataset private.")] = False,
    split: SplitOpt = None,
    config: ConfigOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Join a batch's answers back onto the dataset's rows, in the rows' order.

    New columns: response (or embedding), finish_reason, prompt_tokens, completion_tokens, error. Every
    row is kept: one without an answer has `error` set (no_answer, or the request's error). The join
    goes through a file on disk, so neither the rows nor the answers need to fit in memory."""
    from ..data.arrow import pyarrow
    from ..data.merge import merge as run_merge
    from ..data.merge import output_format
    from ..data.push import find_batch, push
    from ..data.source import resolve
    from ..errors import UsageError
    from .ui import RowsProgress

    pyarrow()
    output_format(output)
    if private and not push_to_hub:
        raise UsageError("--private applies to --push-to-hub")
    if push_to_hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", push_to_hub):
        raise UsageError(f"--push-to-hub {push_to_hub!r}: give OWNER/NAME")
    out_path, err_path, batch = _answer_files(answers, errors)
    _check_writable(output, "-o")
    if os.path.abspath(output) in {os.path.abspath(p) for p in (out_path, err_path) if p}:
        raise UsageError("-o must not be the batch's output or error file")
    ds = resolve(data, split=split, config=config, revision=revision, token=token)
    if ds.is_local_file(output):
        raise UsageError(f"-o {output} is a file of DATA itself; write the result elsewhere")
    progress = RowsProgress(f"merging {ds.label}")
    try:
        report = run_merge(ds, [p for p in (err_path, out_path) if p], output, id_column=id_column, prefix=prefix,
                           progress=progress.update)
    finally:
        progress.stop()
    pushed = None
    if push_to_hub:
        pushed = push(output, push_to_hub, split=ds.split or "train", report=report,
                      batch=batch or find_batch(out_path), private=private, token=token)
    _report({**report, "pushed": pushed}, json=json, to_stderr=False, human=_merge_lines)
    _merge_notes(report)


def _answer_files(answers: str, errors: str | None) -> tuple[str, str | None, dict[str, Any] | None]:
    """OUTPUT (a file or a batch id) -> (output file, error file or None, the batch when named by its id)."""
    from ..errors import UsageError

    batch = None
    if not os.path.isfile(answers) and _BATCH_ID_RE.match(answers):
        from ..batches.control import get, live_batch

        b = get(answers)
        meta, batch = b.meta(), live_batch(b)
        out, err = meta.get("output_path"), meta.get("errors_path")
        if not isinstance(out, str) or out == "-":
            raise UsageError(f"batch {answers} wrote its output to stdout: give merge the file you kept")
        answers, errors = out, errors or (err if isinstance(err, str) and os.path.isfile(err) else None)
    if not os.path.isfile(answers):
        raise UsageError(f"output file not found: {answers}")
    if errors is None and answers.endswith(".output.jsonl"):
        sibling = answers[: -len(".output.jsonl")] + ".errors.jsonl"
        errors = sibling if os.path.isfile(sibling) else None
    elif errors is not None and not os.path.isfile(errors):
        raise UsageError(f"error file not found: {errors}")
    return answers, errors, batch


def _check_writable(path: str, flag: str) -> None:
    from ..errors import UsageError

    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {path}: directory {parent} does not exist")


def _params(pairs: list[str] | None) -> dict[str, Any]:
    from ..errors import UsageError

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {pair!r}: use KEY=VALUE (temperature=0)")
        try:
            out[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out[key] = raw
    return out


def _report(report: Any, *, json: bool, to_stderr: bool, human: Any) -> None:
    """One JSON line for programs (on stdout, or on stderr when stdout carries the batch lines); on a terminal, a
    few lines for people (on stderr)."""
    stream = sys.stderr if to_stderr else sys.stdout
    if json or not stream.isatty():
        stream.buffer.write(orjson.dumps(report) + b"\n")
        stream.buffer.flush()
        return
    print("\n".join(human(report)), file=sys.stderr)


def _prepare_lines(r: PrepareReport) -> list[str]:
    split = f" (split {r['split']})" if r["split"] else ""
    ids = f"custom_id from {r['id_column']}" if r["id_column"] else "custom_id row-<index>"
    lines = [f"prepared {r['requests']:,} requests → {r['output']}",
             f"  from {r['rows']:,} rows of {r['data']}{split}",
             f"  {r['model']} · {r['endpoint']} · {ids}"]
    if r["skipped"]:
        shown = ", ".join(str(i) for i in r["skipped_rows"]) + (" ..." if r["skipped"] > len(r["skipped_rows"]) else "")
        lines.append(f"  skipped {r['skipped']:,} rows with an empty prompt (rows {shown}); merge marks them no_answer")
    if r["output"] != "-":
        lines.append(f"next: hfbatch submit {r['output']}")
    return lines


def _merge_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"merged {r['rows']:,} rows → {r['output']}",
             f"  from {r['data']}" + (f" (split {r['split']})" if r["split"] else ""),
             f"  {r['answered']:,} answered · {r['failed']:,} failed · {r['missing']:,} without an answer",
             f"  new columns {', '.join(r['columns'])}"]
    if r["models"]:
        lines.append(f"  {', '.join(r['models'])}")
    if r.get("pushed"):
        lines.append(f"pushed to {r['pushed']}")
    return lines


def _merge_notes(r: MergeReport) -> None:
    """What people must not miss, on stderr whatever stdout is."""
    if r["failed"] or r["missing"]:
        print(f"hfbatch: note: {r['failed'] + r['missing']:,} of {r['rows']:,} rows have no answer: their `error` "
              f"column says why ({r['failed']:,} failed; {r['missing']:,} with no line: skipped by prepare, or not "
              "run yet: resume the batch, then merge again)", file=sys.stderr)
    if r["unmatched_answers"]:
        examples = ", ".join(repr(c) for c in r["unmatched_examples"])
        print(f"hfbatch: note: {r['unmatched_answers']:,} answers match no row of {r['data']} (e.g. {examples}): "
              "were they prepared from other data?", file=sys.stderr)
