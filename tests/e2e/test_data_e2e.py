"""The real CLI on datasets: prepare -> submit -> merge, on a local Parquet file and on a private Hub dataset read
through huggingface_hub's HfFileSystem from a local fake Hub (HF_ENDPOINT, plain HTTP, Xet off), the result
pushed back with HfApi; the `data` extra stays optional and `submit` never imports it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CHAT_MODEL, TOKEN, batch_from, chat_line, check_output_line, cli_env, read_jsonl, write_jsonl

from hfbatch import __version__
from hfbatch.testing.fake_hub_files import ThreadedFakeHubFiles
from hfbatch.testing.fake_provider import ThreadedFakeProvider

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def hub() -> Iterator[ThreadedFakeHubFiles]:
    with ThreadedFakeHubFiles(TOKEN) as h:
        yield h


def hub_env(hub: ThreadedFakeHubFiles, **extra: str | None) -> dict[str, str | None]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", **extra}


def parquet_bytes(columns: dict[str, list[Any]], row_group_size: int = 4) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, row_group_size=row_group_size)
    return buf.getvalue()


def report(p: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert p.returncode == 0, p.stderr
    obj: dict[str, Any] = json.loads(p.stdout.splitlines()[-1])
    return obj


def test_parquet_round_trip_through_submit(tmp_path: Path, fake: ThreadedFakeProvider, run_cli: Run) -> None:
    texts = [f"question {i}" for i in range(12)]
    texts[4] = "[[fault:400]] a request the provider rejects"
    texts[7] = ""  # an empty prompt: skipped, then marked by merge
    (tmp_path / "data.parquet").write_bytes(parquet_bytes({"id": [f"q{i:02d}" for i in range(12)], "text": texts}))

    prep = report(run_cli(["data.parquet", "-m", CHAT_MODEL, "--column", "text", "--id-column", "id",
                           "--max-tokens", "5", "-o", "batch.jsonl"], command="prepare"))
    assert (prep["rows"], prep["requests"], prep["skipped_rows"]) == (12, 11, [7])

    sub = run_cli(["batch.jsonl", "-q"])
    assert sub.returncode == 3, sub.stderr  # one request failed
    batch = batch_from(sub.stdout)
    assert batch["request_counts"] == {"total": 11, "completed": 10, "failed": 1}
    assert batch["hfbatch"]["version"] == __version__  # a result file says what produced it
    for line in read_jsonl(tmp_path / "batch.output.jsonl"):
        check_output_line(line, "/v1/chat/completions")

    merged = run_cli(["data.parquet", "batch.output.jsonl", "-o", "result.parquet", "--id-column", "id"],
                     command="merge")  # the error file is found beside the output file
    rep = report(merged)
    assert (rep["rows"], rep["answered"], rep["failed"], rep["missing"]) == (12, 10, 1, 1)
    assert "2 of 12 rows have no answer" in merged.stderr
    rows = pq.read_table(tmp_path / "result.parquet").to_pylist()
    assert [r["id"] for r in rows] == [f"q{i:02d}" for i in range(12)]
    assert rows[0]["response"] == "echo: question 0" and rows[0]["completion_tokens"] == 5
    assert rows[4]["response"] is None and rows[4]["error"].startswith("http_400: ")
    assert rows[7]["error"].startswith("no_answer: ")

    # by batch id, to JSON Lines
    report(run_cli(["data.parquet", batch["id"], "-o", "result.jsonl", "--id-column", "id"], command="merge"))
    assert [json.loads(x)["id"] for x in (tmp_path / "result.jsonl").read_text().splitlines()] == [
        r["id"] for r in rows]


def test_private_hub_dataset_prepare_submit_merge_push(tmp_path: Path, hub: ThreadedFakeHubFiles,
                                                       fake: ThreadedFakeProvider, run_cli: Run) -> None:
    """The real CLI on the Hub (HF_ENDPOINT, the token from HF_TOKEN); the sources' cases: unit/test_data.py."""
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n" \
           "  - split: test\n    path: data/test.jsonl\n---\n# Reviews\n"
    test_rows = [{"review_id": f"r{i}", "text": f"review number {i}"} for i in range(9)]
    hub.hub.add_repo("acme/reviews", {
        "README.md": card,
        "data/train-00000-of-00001.parquet": parquet_bytes({"review_id": ["t0", "t1"], "text": ["a", "b"]}),
        "data/test.jsonl": "".join(json.dumps(r) + "\n" for r in test_rows),
    }, private=True)
    env = hub_env(hub)

    # the test split (JSON Lines streamed over HTTP) -> submit -> merge -> push
    prep = report(run_cli(["acme/reviews", "--split", "test", "-m", CHAT_MODEL, "--column", "text",
                           "--id-column", "review_id", "-o", "test.batch.jsonl"], command="prepare", env_extra=env))
    assert prep["requests"] == 9
    assert [json.loads(x)["custom_id"] for x in (tmp_path / "test.batch.jsonl").read_text().splitlines()] == [
        r["review_id"] for r in test_rows]
    sub = run_cli(["test.batch.jsonl", "-q"])
    assert sub.returncode == 0, sub.stderr
    batch_id = batch_from(sub.stdout)["id"]
    pushed = report(run_cli(["acme/reviews", "test.batch.output.jsonl", "--split", "test", "--id-column",
                             "review_id", "-o", "result.parquet", "--push-to-hub", "acme/reviews-answers",
                             "--private"], command="merge", env_extra=env))
    assert pushed["pushed"] == f"{hub.url}/datasets/acme/reviews-answers"
    repo = hub.hub.repos[("dataset", "acme/reviews-answers")]
    assert repo.private
    files = hub.hub.files("acme/reviews-answers")
    assert set(files) == {"README.md", "data/test-00000-of-00001.parquet"}
    table = pq.read_table(io.BytesIO(files["data/test-00000-of-00001.parquet"]))
    assert table.column("response").to_pylist() == [f"echo: review number {i}" for i in range(9)]
    readme = files["README.md"].decode()
    assert CHAT_MODEL in readme and batch_id in readme and "path: data/test-00000-of-00001.parquet" in readme


def test_the_data_extra_is_optional_and_submit_never_imports_it(tmp_path: Path, fake: ThreadedFakeProvider) -> None:
    env = cli_env(tmp_path, fake)
    write_jsonl(tmp_path / "in.jsonl", [chat_line("a")])
    probe = ("import sys\n"
             "from hfbatch.__main__ import main\n"
             "import hfbatch.cli\n"
             "before = sorted(m for m in sys.modules if m.split('.')[0] == 'pyarrow' or m.startswith('hfbatch.data'))\n"
             "code = main(['submit', 'in.jsonl', '-q'])\n"
             "after = sorted(m for m in sys.modules if m.split('.')[0] == 'pyarrow' or m.startswith('hfbatch.data'))\n"
             "print(code, before, after, file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.stderr.strip().splitlines()[-1] == "0 [] []", p.stderr

    blocked = ("import sys\nsys.modules['pyarrow'] = None  # as if not installed\n"
               "from hfbatch.__main__ import main\n"
               "raise SystemExit(main(['prepare', 'in.jsonl', '-m', 'm', '--column', 'text']))\n")
    p = subprocess.run([sys.executable, "-c", blocked], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and 'pip install "hfbatch[data]"' in p.stderr
