"""hfbatch.data in process: datasets made here (Parquet, CSV, TSV, JSONL, a JSON array, folders with splits and
configs) -> prepare -> batch lines that hfbatch's own validator accepts; answer files in OpenAI's shape (written
by hfbatch's writer) -> merge -> every row in order with its answer or an error. The Hub and the real CLI:
tests/e2e/test_data.py."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from hfbatch.data.answers import parse_line
from hfbatch.data.merge import merge
from hfbatch.data.prepare import Prompt, prepare, unescape
from hfbatch.data.source import Dataset, choose, resolve
from hfbatch.errors import UsageError
from hfbatch.fingerprints import IdSet
from hfbatch.models import Request
from hfbatch.validate import validate_line
from hfbatch.writer import error_line, success_line

MODEL = "test-org/tiny-chat"


def run_prepare(ds: Dataset, prompt: Prompt, id_column: str | None = None) -> tuple[dict[str, Any], list[Request]]:
    """prepare into memory; every line must pass hfbatch's validator (as `submit` runs it), ids unique."""
    buf = io.BytesIO()
    report = prepare(ds, prompt, buf, "mem", id_column=id_column)
    seen, requests = IdSet(), []
    for i, raw in enumerate(buf.getvalue().splitlines(), 1):
        result = validate_line(i, raw, seen)
        assert isinstance(result, Request), result
        requests.append(result)
    assert len(requests) == report["requests"]
    return dict(report), requests


def parquet(path: Path, columns: dict[str, list[Any]], row_group_size: int = 3) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


# ------------------------------------------------------------------ prepare


def test_prepare_parquet_template_system_params_and_id_column(tmp_path: Path) -> None:
    data = parquet(tmp_path / "d.parquet", {"id": ["a", "b", "c", "d"], "title": ["T0", "T1", "T2", "T3"],
                                            "body": ["x", None, "z", "w"], "n": [1, 2, 3, 4]})
    prompt = Prompt(MODEL, template=unescape(r"Summarize: {title}\n{body} ({n:03d})"), system="Be brief.",
                    max_tokens=50, params={"temperature": 0, "seed": 1})
    report, reqs = run_prepare(resolve(str(data)), prompt, id_column="id")
    assert [r.custom_id for r in reqs] == ["a", "b", "c", "d"]
    assert reqs[1].body == {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Summarize: T1\n (002)"}],
                            "max_tokens": 50, "temperature": 0, "seed": 1}
    assert report["rows"] == 4 and report["skipped"] == 0 and report["endpoint"] == "/v1/chat/completions"


def test_prepare_row_index_ids_skip_empty_prompts_and_endpoints(tmp_path: Path) -> None:
    data = parquet(tmp_path / "d.parquet", {"text": ["hello", "", None, "  ", "bye"]})
    report, reqs = run_prepare(resolve(str(data)), Prompt(MODEL, endpoint="embeddings", column="text"))
    assert [r.custom_id for r in reqs] == ["row-0", "row-4"]
    assert reqs[0].url == "/v1/embeddings" and reqs[0].body == {"model": MODEL, "input": "hello"}
    assert report["skipped"] == 3 and report["skipped_rows"] == [1, 2, 3]
    _, reqs = run_prepare(resolve(str(data)), Prompt(MODEL, endpoint="responses", column="text", system="S",
                                                     max_tokens=9))
    assert reqs[0].body == {"model": MODEL, "input": "hello", "instructions": "S", "max_output_tokens": 9}


def test_prepare_csv_keeps_text_exactly_and_reads_quoted_newlines(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('id,prompt\n007,"line one\nline two"\n010,"a, ""quoted"" b"\n', encoding="utf-8")
    _, reqs = run_prepare(resolve(str(tmp_path / "d.csv")), Prompt(MODEL, column="prompt"), id_column="id")
    assert [r.custom_id for r in reqs] == ["007", "010"]  # text, not the numbers 7 and 10
    assert [r.body["messages"][0]["content"] for r in reqs] == ["line one\nline two", 'a, "quoted" b']
    (tmp_path / "d.tsv").write_text("id\tprompt\n1\thi there\n", encoding="utf-8")
    _, reqs = run_prepare(resolve(str(tmp_path / "d.tsv")), Prompt(MODEL, column="prompt"), id_column="id")
    assert reqs[0].body["messages"][0]["content"] == "hi there"


def test_prepare_jsonl_messages_column_and_json_array(tmp_path: Path) -> None:
    rows = [{"id": 1, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                   {"role": "user", "content": "again"}]},
            {"id": 2, "messages": [{"role": "user", "content": "second"}], "extra": {"k": [1, 2]}}]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n\n")
    _, reqs = run_prepare(resolve(str(tmp_path / "d.jsonl")), Prompt(MODEL, column="messages", system="sys"),
                          id_column="id")
    assert reqs[0].custom_id == "1" and reqs[0].body["messages"] == [{"role": "system", "content": "sys"},
                                                                    *rows[0]["messages"]]
    (tmp_path / "a.json").write_bytes(orjson.dumps([{"q": "one"}, {"q": "two"}]))
    _, reqs = run_prepare(resolve(str(tmp_path / "a.json")), Prompt(MODEL, template="Q: {q}"))
    assert [r.body["messages"][0]["content"] for r in reqs] == ["Q: one", "Q: two"]


def test_prepare_names_duplicate_ids_with_their_rows(tmp_path: Path) -> None:
    data = parquet(tmp_path / "d.parquet", {"id": ["a", "b", "a", "c", "b", "a"], "t": list("uvwxyz")})
    with pytest.raises(UsageError) as e:
        prepare(resolve(str(data)), Prompt(MODEL, column="t"), io.BytesIO(), "mem", id_column="id")
    msg = str(e.value)
    assert "'a' at rows 0, 2, 5" in msg and "'b' at rows 1, 4" in msg and "'c'" not in msg


@pytest.mark.parametrize("prompt, id_column, words", [
    (Prompt(MODEL, column="nope"), None, ["--column 'nope'", "id, t"]),
    (Prompt(MODEL, template="{t} {missing}"), None, ["--template 'missing'"]),
    (Prompt(MODEL, column="t"), "nope", ["--id-column 'nope'"]),
])
def test_prepare_missing_columns_are_named(tmp_path: Path, prompt: Prompt, id_column: str | None,
                                           words: list[str]) -> None:
    data = parquet(tmp_path / "d.parquet", {"id": ["a"], "t": ["x"]})
    with pytest.raises(UsageError) as e:
        prepare(resolve(str(data)), prompt, io.BytesIO(), "mem", id_column=id_column)
    for w in words:
        assert w in str(e.value)


def test_prompt_options_are_checked() -> None:
    for kwargs in ({"column": "a", "template": "{a}"}, {}, {"column": "a", "endpoint": "images"},
                   {"column": "a", "endpoint": "embeddings", "max_tokens": 3}, {"column": "a", "params": {"model": 1}},
                   {"template": "no fields"}, {"template": "{}"}):
        with pytest.raises(UsageError):
            Prompt(MODEL, **kwargs).fields()


# ------------------------------------------------------------------ splits and configs


def test_splits_by_file_and_folder_names() -> None:
    rels = ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet", "validation/part0.parquet", "notes.txt"]
    files, split, _ = choose(rels, None, None, None, "ds")
    assert split == "train" and [r for r, _ in files] == rels[1:3]
    files, split, _ = choose(rels, "test", None, None, "ds")
    assert [r for r, _ in files] == ["data/test-00000-of-00001.parquet"]
    assert [r for r, _ in choose(rels, "validation", None, None, "ds")[0]] == ["validation/part0.parquet"]
    with pytest.raises(UsageError, match="no split 'dev2'; its splits: train, validation, test"):
        choose(rels, "dev2", None, None, "ds")
    # no split names: everything is train
    assert len(choose(["a.jsonl", "b.jsonl"], None, None, None, "ds")[0]) == 2
    with pytest.raises(UsageError, match="mix formats"):
        choose(["a.jsonl", "b.csv"], None, None, None, "ds")


def test_splits_and_configs_from_the_dataset_card() -> None:
    card = """---
configs:
- config_name: en
  default: true
  data_files:
  - split: train
    path: en/train/*.parquet
  - split: test
    path: "en/test-*"
- config_name: fr
  data_files: fr/**/*.csv
---
# card
"""
    rels = ["en/train/0.parquet", "en/train/1.parquet", "en/test-0.parquet", "fr/a/b.csv", "fr/c.csv"]
    files, split, config = choose(rels, None, None, card, "ds")
    assert (split, config) == ("train", "en") and [r for r, _ in files] == rels[:2]
    assert [r for r, _ in choose(rels, "test", None, card, "ds")[0]] == ["en/test-0.parquet"]
    assert [r for r, _ in choose(rels, None, "fr", card, "ds")[0]] == ["fr/a/b.csv", "fr/c.csv"]
    with pytest.raises(UsageError, match="no config 'de'; its configs: en, fr"):
        choose(rels, None, "de", card, "ds")


def test_a_local_folder_reads_its_split_in_order(tmp_path: Path) -> None:
    (tmp_path / "ds" / "data").mkdir(parents=True)
    parquet(tmp_path / "ds" / "data" / "train-00001.parquet", {"t": ["c", "d"]})
    parquet(tmp_path / "ds" / "data" / "train-00000.parquet", {"t": ["a", "b"]})
    parquet(tmp_path / "ds" / "data" / "test-00000.parquet", {"t": ["z"]})
    _, reqs = run_prepare(resolve(str(tmp_path / "ds")), Prompt(MODEL, column="t"))
    assert [(r.custom_id, r.body["messages"][0]["content"]) for r in reqs] == [
        ("row-0", "a"), ("row-1", "b"), ("row-2", "c"), ("row-3", "d")]
    _, reqs = run_prepare(resolve(str(tmp_path / "ds"), split="test"), Prompt(MODEL, column="t"))
    assert [r.body["messages"][0]["content"] for r in reqs] == ["z"]


def test_data_that_is_not_there_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="hf://datasets/OWNER/NAME"):
        resolve(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UsageError, match="not a dataset file"):
        resolve(str(tmp_path / "x.txt"))
    with pytest.raises(UsageError, match="--split"):
        resolve(str(tmp_path / "x.txt"), split="train")
    with pytest.raises(UsageError, match="no such file"):  # a missing local file, not a Hub repo named data/x
        resolve("data/x.parquet")


# ------------------------------------------------------------------ answers


def chat_body(text: str, finish: str = "stop", pt: int = 5, ct: int = 2) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}


def test_parse_line_reads_every_answer_shape() -> None:
    def parsed(line: bytes) -> tuple[Any, ...]:
        return parse_line(orjson.loads(line))[1:]

    assert parsed(success_line("a", 200, "r", chat_body("hi", "length"))) == (1, "hi", None, "length", 5, 2, None)
    resp = {"object": "response", "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "par"},
                                                         {"type": "output_text", "text": "tial"}]}],
            "usage": {"input_tokens": 3, "output_tokens": 4}}
    assert parsed(success_line("a", 200, "r", resp)) == (1, "partial", None, "max_output_tokens", 3, 4, None)
    emb = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1.25]}],
           "usage": {"prompt_tokens": 2, "total_tokens": 2}}
    assert parsed(success_line("a", 200, "r", emb)) == (1, None, "[0.5,-1.25]", None, 2, None, None)
    b64 = {"object": "list", "data": [{"embedding": "AAAAPwAAoL8="}], "usage": {"prompt_tokens": 1}}
    assert parsed(success_line("a", 200, "r", b64))[1:3] == (None, "[0.5,-1.25]")
    http = error_line("a", "", "", {"status_code": 400, "request_id": "r",
                                     "body": {"error": {"message": "bad input", "type": "x", "param": None,
                                                        "code": None}}})
    assert parsed(http) == (0, None, None, None, None, None, "http_400: bad input")
    assert parsed(error_line("a", "request_timeout", "no answer in 300 s"))[-1] == "request_timeout: no answer in 300 s"


# ------------------------------------------------------------------ merge


def answer_files(tmp_path: Path, ids: list[str], *, fail: set[str], missing: set[str],
                 extra: list[str] = ()) -> tuple[str, str]:  # type: ignore[assignment]
    """Output and error files as a batch writes them: lines in no particular order."""
    out, err = [], []
    for cid in [*ids, *extra]:
        if cid in missing:
            continue
        if cid in fail:
            err.append(error_line(cid, "", "", {"status_code": 422, "request_id": "r", "body": {
                "error": {"message": f"rejected {cid}", "type": "invalid_request_error", "param": None,
                          "code": None}}}))
        else:
            out.append(success_line(cid, 200, "r", chat_body(f"answer {cid}")))
    random.Random(7).shuffle(out)
    (tmp_path / "b.output.jsonl").write_bytes(b"".join(line + b"\n" for line in out))
    (tmp_path / "b.errors.jsonl").write_bytes(b"".join(line + b"\n" for line in err))
    return str(tmp_path / "b.output.jsonl"), str(tmp_path / "b.errors.jsonl")


def read_result(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        return list(pq.read_table(path).to_pylist())
    if path.suffix == ".csv":
        return list(pacsv.read_csv(path).to_pylist())
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_merge_keeps_every_row_in_order(tmp_path: Path, suffix: str) -> None:
    n = 20
    data = parquet(tmp_path / "d.parquet", {"id": [f"q{i}" for i in range(n)], "t": [f"t{i}" for i in range(n)],
                                            "tags": [[i, i + 1] for i in range(n)]}, row_group_size=7)
    out, err = answer_files(tmp_path, [f"q{i}" for i in range(n)], fail={"q3"}, missing={"q5", "q19"})
    dest = tmp_path / f"result{suffix}"
    report = merge(resolve(str(data)), [err, out], str(dest), id_column="id")
    assert (report["rows"], report["answered"], report["failed"], report["missing"]) == (20, 17, 1, 2)
    rows = read_result(dest)
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(n)]
    assert rows[0]["response"] == "answer q0" and rows[0]["finish_reason"] == "stop"
    assert rows[0]["prompt_tokens"] == 5 and rows[0]["error"] in (None, "")
    assert rows[3]["error"] == "http_422: rejected q3" and rows[3]["response"] in (None, "")
    assert rows[5]["error"].startswith("no_answer: ") and rows[19]["error"].startswith("no_answer: ")
    if suffix != ".csv":
        assert rows[2]["tags"] == [2, 3]
    assert not list(tmp_path.glob(".hfbatch-merge-*"))  # the join's files are gone


def test_merge_a_jsonl_dataset_keeps_its_rows_exactly_and_infers_one_schema(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"k": i, "note": None if i < 5 else f"n{i}", "nested": {"a": i}} for i in range(12)]
    (tmp_path / "d.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out, err = answer_files(tmp_path, [f"row-{i}" for i in range(12)], fail=set(), missing=set())
    merge(resolve(str(tmp_path / "d.jsonl")), [err, out], str(tmp_path / "r.jsonl"))
    got = read_result(tmp_path / "r.jsonl")
    assert [{k: g[k] for k in ("k", "note", "nested")} for g in got] == rows
    # Parquet: a column null in the first chunk's rows and text later is text (one schema over all rows)
    from hfbatch.data import merge as merge_module

    monkeypatch.setattr(merge_module, "CHUNK_ROWS", 4)
    merge(resolve(str(tmp_path / "d.jsonl")), [err, out], str(tmp_path / "r.parquet"))
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.schema.field("note").type == pa.string() and table.column("note").to_pylist()[5] == "n5"


def test_merge_embeddings(tmp_path: Path) -> None:
    data = parquet(tmp_path / "d.parquet", {"t": ["a", "b", "c"]})
    emb = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 1.0]}],
           "usage": {"prompt_tokens": 2, "total_tokens": 2}}
    (tmp_path / "o.jsonl").write_bytes(success_line("row-2", 200, "r", emb) + b"\n"
                                       + success_line("row-0", 200, "r", emb) + b"\n")
    report = merge(resolve(str(data)), [str(tmp_path / "o.jsonl")], str(tmp_path / "r.parquet"))
    assert report["columns"] == ["embedding", "prompt_tokens", "error"]
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert table.column("embedding").to_pylist() == [[0.25, -0.5, 1.0], None, [0.25, -0.5, 1.0]]
    merge(resolve(str(data)), [str(tmp_path / "o.jsonl")], str(tmp_path / "r.jsonl"))
    assert read_result(tmp_path / "r.jsonl")[0]["embedding"] == [0.25, -0.5, 1.0]


def test_merge_refuses_what_would_be_wrong(tmp_path: Path) -> None:
    data = parquet(tmp_path / "d.parquet", {"id": ["a", "b"], "response": ["old", "old"]})
    out, err = answer_files(tmp_path, ["row-0", "row-1"], fail=set(), missing=set())
    with pytest.raises(UsageError, match="already has the column"):
        merge(resolve(str(data)), [err, out], str(tmp_path / "r.parquet"))
    report = merge(resolve(str(data)), [err, out], str(tmp_path / "r.parquet"), prefix="new_")
    assert pq.read_table(tmp_path / "r.parquet").column("new_response").to_pylist() == ["answer row-0",
                                                                                      "answer row-1"]
    assert report["columns"][0] == "new_response"
    with pytest.raises(UsageError, match="--id-column"):  # answers keyed by row number, joined on a column
        merge(resolve(str(data)), [err, out], str(tmp_path / "r2.parquet"), id_column="id", prefix="x_")
    assert not (tmp_path / "r2.parquet").exists()
    with pytest.raises(UsageError, match="-o .*name a .parquet"):
        merge(resolve(str(data)), [err, out], str(tmp_path / "r.xlsx"))


def test_merge_counts_answers_that_match_no_row(tmp_path: Path) -> None:
    data = parquet(tmp_path / "d.parquet", {"t": ["a", "b"]})
    out, err = answer_files(tmp_path, ["row-0", "row-1"], fail=set(), missing=set(), extra=["row-7", "stray"])
    report = merge(resolve(str(data)), [err, out], str(tmp_path / "r.parquet"))
    assert report["unmatched_answers"] == 2 and sorted(report["unmatched_examples"]) == ["row-7", "stray"]


# ------------------------------------------------------------------ push (HfApi against the local fake Hub)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    from huggingface_hub import constants

    from hfbatch.testing.fake_hub_files import ThreadedFakeHubFiles

    with ThreadedFakeHubFiles("hf_push_token") as h:
        # what HF_ENDPOINT sets when huggingface_hub is imported
        monkeypatch.setattr(constants, "ENDPOINT", h.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            h.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        for name in ("HF_HUB_CACHE", "AGENT_HARNESSES_PATH", "HF_TOKEN_PATH"):  # not the user's own HF_HOME
            monkeypatch.setattr(constants, name, str(tmp_path / "hf" / name.lower()), raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True, raising=False)
        yield h


def test_push_cards_splits_and_visibility(tmp_path: Path, hub: Any) -> None:
    from hfbatch.data.push import push

    data = parquet(tmp_path / "d.parquet", {"t": ["a", "b"]})
    out, err = answer_files(tmp_path, ["row-0", "row-1"], fail=set(), missing=set())
    report = merge(resolve(str(data)), [err, out], str(tmp_path / "r.parquet"))
    batch = {"id": "batch_" + "a" * 24, "status": "completed", "endpoint": "/v1/chat/completions",
             "request_counts": {"total": 2, "completed": 2, "failed": 0}, "usage": {"input_tokens": 10}}
    url = push(str(tmp_path / "r.parquet"), "me/answers", split="train", report=report, batch=batch,
               private=True, token="hf_push_token")
    assert url == f"{hub.url}/datasets/me/answers" and hub.hub.repos[("dataset", "me/answers")].private
    push(str(tmp_path / "r.parquet"), "me/answers", split="test", report=report, batch=None, token="hf_push_token")
    card = hub.hub.files("me/answers")["README.md"].decode()
    assert "split: test" in card and "split: train" in card and batch["id"] not in card  # the card of the last push
    assert set(hub.hub.files("me/answers")) == {"README.md", "data/train-00000-of-00001.parquet",
                                                "data/test-00000-of-00001.parquet"}
    # a card someone wrote is left alone; --private never applies to an existing public repo
    hub.hub.add_repo("me/public", {"README.md": "# mine\n"})
    push(str(tmp_path / "r.parquet"), "me/public", split="train", report=report, batch=None, token="hf_push_token")
    assert hub.hub.files("me/public")["README.md"] == b"# mine\n"
    with pytest.raises(UsageError, match="exists and is public"):
        push(str(tmp_path / "r.parquet"), "me/public", split="train", report=report, batch=None, private=True,
             token="hf_push_token")
    with pytest.raises(UsageError, match="401"):
        push(str(tmp_path / "r.parquet"), "me/other", split="train", report=report, batch=None, token="hf_wrong")


def test_hub_datasets_through_hffilesystem(hub: Any) -> None:
    card = ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n"
            "  - split: test\n    path: data/test.csv\n---\n# Reviews\n")
    buf0, buf1, old = io.BytesIO(), io.BytesIO(), io.BytesIO()
    pq.write_table(pa.table({"t": ["a", "b"]}), buf0)
    pq.write_table(pa.table({"t": ["c"]}), buf1)
    pq.write_table(pa.table({"t": ["from v1"]}), old)
    hub.hub.add_repo("acme/reviews", {"README.md": card, "data/train-00000-of-00002.parquet": buf0.getvalue(),
                                      "data/train-00001-of-00002.parquet": buf1.getvalue(),
                                      "data/test.csv": 't\n"x, ""y"""\nz\n'}, private=True)
    hub.hub.add_repo("acme/reviews", {"data/train-00000-of-00001.parquet": old.getvalue()}, private=True,
                     revision="v1")
    token = "hf_push_token"

    def texts(ds: Dataset) -> list[str]:
        return [r.body["messages"][0]["content"] for r in run_prepare(ds, Prompt(MODEL, column="t"))[1]]

    # a private dataset without a token: one line saying what to do
    with pytest.raises(UsageError, match="not found on the Hub.*token"):
        resolve("acme/reviews")
    ds = resolve("acme/reviews", token=token)  # the card's train split: two Parquet files, in order
    assert (ds.split, ds.repo_id, texts(ds)) == ("train", "acme/reviews", ["a", "b", "c"])
    assert texts(resolve("acme/reviews", split="test", token=token)) == ['x, "y"', "z"]  # CSV, streamed
    assert texts(resolve("hf://datasets/acme/reviews/data/train-00000-of-00001.parquet", revision="v1",
                         token=token)) == ["from v1"]
    with pytest.raises(UsageError, match="no split 'dev'; its splits: train, test"):
        resolve("acme/reviews", split="dev", token=token)
    ranged = [r for m, p, r in hub.hub.requests if p.endswith(".parquet") and "/resolve/" in p]
    assert ranged and all(r.startswith("bytes=") for r in ranged)  # Parquet: ranged reads, never a whole GET
