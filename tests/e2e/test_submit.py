"""End to end: `hfbatch submit` against the local fake router, every line checked with the openai SDK."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import (
    CHAT_MODEL,
    EMBED_MODEL,
    assert_each_once,
    batch_from,
    chat_line,
    check_error_line,
    check_output_line,
    completions_line,
    dumps,
    embeddings_line,
    ids,
    parse_jsonl_text,
    read_jsonl,
    responses_line,
    write_jsonl,
)

FE_PATH = f"/hf-inference/models/{EMBED_MODEL}/pipeline/feature-extraction"


def mixed_lines() -> list[dict[str, Any]]:
    return [
        chat_line("chat-1", "héllo 世界 🙂"),
        chat_line("chat-2", "with a provider suffix", model=CHAT_MODEL + ":fake-a", max_tokens=3),
        responses_line("resp-1", "tell me"),
        embeddings_line("emb-1", ["alpha", "beta"]),
        embeddings_line("emb-2", "gamma"),
        completions_line("cmp-1", "once upon"),
        embeddings_line("emb-bad", "x", model="test-org/NonExistEmbed"),
        chat_line("chat-400", "hi", model="test-org/NonExist-model"),
    ]


def usage_sums(lines: list[dict[str, Any]]) -> tuple[int, int]:
    inp = out = 0
    for obj in lines:
        u = obj["response"]["body"].get("usage") or {}
        inp += u.get("prompt_tokens", u.get("input_tokens", 0))
        out += u.get("completion_tokens", u.get("output_tokens", 0))
    return inp, out


def url_of(lines: list[dict[str, Any]]) -> dict[str, str]:
    return {line["custom_id"]: line["url"] for line in lines}


def test_mixed_endpoints_through_the_router(tmp_path: Path, fake, run_cli) -> None:
    lines = mixed_lines()
    write_jsonl(tmp_path / "data" / "in.jsonl", lines)
    p = run_cli(["data/in.jsonl", "-q", "--summary", "summary.json"])
    assert p.returncode == 3, p.stderr

    # default output paths: beside the input
    out = read_jsonl(tmp_path / "data" / "in.output.jsonl")
    err = read_jsonl(tmp_path / "data" / "in.errors.jsonl")
    assert_each_once(ids(lines), out, err)
    urls = url_of(lines)
    for obj in out:
        check_output_line(obj, urls[obj["custom_id"]])
        assert obj["response"]["status_code"] == 200
        assert obj["response"]["request_id"].startswith("req_")  # the provider's x-request-id
    for obj in err:
        check_error_line(obj)
    assert sorted(ids(out)) == ["chat-1", "chat-2", "emb-1", "emb-2", "resp-1"]
    by_id = {o["custom_id"]: o for o in out + err}

    # chat content made the round trip, non-ASCII included
    assert by_id["chat-1"]["response"]["body"]["choices"][0]["message"]["content"] == "echo: héllo 世界 🙂"
    # embeddings went through the hf-inference feature-extraction route and came back OpenAI-shaped
    emb1 = by_id["emb-1"]["response"]["body"]
    assert [d["index"] for d in emb1["data"]] == [0, 1] and len(emb1["data"][0]["embedding"]) == 8
    assert emb1["model"] == EMBED_MODEL
    assert len(by_id["emb-2"]["response"]["body"]["data"]) == 1

    # /v1/completions is not served by the router: a clear error line, nothing sent
    cmp = by_id["cmp-1"]
    assert cmp["response"] is None and cmp["error"]["code"] == "unsupported_endpoint"
    assert "--base-url" in cmp["error"]["message"]
    # an embeddings model the Hub does not know: an error line, no crash
    assert by_id["emb-bad"]["response"] is None or by_id["emb-bad"]["response"]["status_code"] >= 400
    # 400 is final: the provider's error body, one attempt only
    e400 = by_id["chat-400"]["response"]
    assert e400["status_code"] == 400
    assert e400["body"]["error"]["code"] == "model_not_supported"

    st = fake.stats()
    assert st["models"]["test-org/NonExist-model"] == 1
    # /v1/models: the price catalog, fetched once per run (no inference)
    assert st["paths"] == {"/v1/models": 1, "/v1/chat/completions": 3, "/v1/responses": 1, FE_PATH: 2}, st["paths"]
    assert st["auth_missing"] == 0

    batch = batch_from(p.stdout)
    assert json.loads((tmp_path / "summary.json").read_text()) == batch
    assert batch["status"] == "completed" and batch["errors"] is None
    assert batch["completed_at"] is not None
    assert batch["request_counts"] == {"total": 8, "completed": 5, "failed": 3}
    inp, outp = usage_sums(out)
    assert batch["usage"]["input_tokens"] == inp and batch["usage"]["output_tokens"] == outp
    assert batch["usage"]["total_tokens"] == inp + outp
    hb = batch["hfbatch"]
    assert hb["state"] == "finished" and hb["stop_reason"] is None and hb["unsent"] == 0
    assert hb["providers"] == {"fake-b": 2, "fake-a": 1, "hf-inference": 2}
    assert hb["http_requests"] == st["requests"] == 6
    assert hb["retries"] == 0
    assert hb["endpoints"] == {"/v1/chat/completions": 3, "/v1/responses": 1, "/v1/embeddings": 3,
                               "/v1/completions": 1}


def test_mixed_endpoints_through_base_url(tmp_path: Path, fake, run_cli) -> None:
    lines = mixed_lines()
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "--base-url", fake.url + "/v1", "-o", "ok.jsonl", "-e", "bad.jsonl"])
    assert p.returncode == 3, p.stderr
    out, err = read_jsonl(tmp_path / "ok.jsonl"), read_jsonl(tmp_path / "bad.jsonl")
    assert not (tmp_path / "in.output.jsonl").exists()
    assert_each_once(ids(lines), out, err)
    urls = url_of(lines)
    for obj in out:
        check_output_line(obj, urls[obj["custom_id"]])
    for obj in err:
        check_error_line(obj)
        assert obj["response"]["status_code"] == 400
    assert sorted(ids(out)) == ["chat-1", "chat-2", "cmp-1", "emb-1", "emb-2", "resp-1"]
    st = fake.stats()
    assert st["paths"] == {"/v1/models": 1, "/v1/chat/completions": 3, "/v1/responses": 1, "/v1/embeddings": 3,
                           "/v1/completions": 1}, st["paths"]
    batch = batch_from(p.stdout)
    assert batch["request_counts"] == {"total": 8, "completed": 6, "failed": 2}
    inp, outp = usage_sums(out)
    assert batch["usage"]["input_tokens"] == inp and batch["usage"]["output_tokens"] == outp
    assert batch["hfbatch"]["providers"] == {"fake-b": 5, "fake-a": 1}


def test_bom_crlf_and_blank_lines_all_succeed(tmp_path: Path, fake, run_cli) -> None:
    lines = [chat_line(f"c{i}", f"line {i}") for i in range(3)]
    data = (b"\xef\xbb\xbf" + dumps(lines[0]) + b"\r\n\r\n" + dumps(lines[1]) + b"\r\n   \r\n"
            + dumps(lines[2]) + b"\r\n\r\n")
    (tmp_path / "win.jsonl").write_bytes(data)
    p = run_cli(["win.jsonl", "-q"])
    assert p.returncode == 0, p.stderr
    out = read_jsonl(tmp_path / "win.output.jsonl")
    assert_each_once(ids(lines), out)
    for obj in out:
        check_output_line(obj, "/v1/chat/completions")
    assert read_jsonl(tmp_path / "win.errors.jsonl") == []
    batch = batch_from(p.stdout)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert batch["model"] == CHAT_MODEL
    assert batch["endpoint"] == "/v1/chat/completions"


def test_stdin_input_and_stdout_output(tmp_path: Path, fake, run_cli) -> None:
    lines = [chat_line(f"s{i}", f"from stdin {i}") for i in range(5)] + [responses_line("s-resp")]
    data = b"".join(dumps(x) + b"\n" for x in lines)
    p = run_cli(["-", "-o", "-", "-q"], input_bytes=data)
    assert p.returncode == 0, p.stderr
    # stdout carries only the output lines
    out = parse_jsonl_text(p.stdout)
    assert all(o.get("object") != "batch" for o in out), "the summary must go to stderr with -o -"
    assert_each_once(ids(lines), out)
    urls = url_of(lines)
    for obj in out:
        check_output_line(obj, urls[obj["custom_id"]])
    # the Batch object went to stderr
    batch = batch_from(p.stderr)
    assert batch["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    assert not (tmp_path / "batch.output.jsonl").exists()
    assert read_jsonl(tmp_path / "batch.errors.jsonl") == []


def test_concurrency_is_bounded(tmp_path: Path, make_fake, run_cli) -> None:
    fake = make_fake(latency=0.15)
    n = 12  # four waves of -c 3 (each 0.15 s): enough to reach the limit and to show it is never passed
    lines = [chat_line(f"k{i}", f"[[id:k{i}]] n {i}") for i in range(n)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "-c", "3"])
    assert p.returncode == 0, p.stderr
    st = fake.stats()
    assert st["max_inflight"] == 3, st
    assert st["requests"] == n and st["dup_ok"] == 0 and st["distinct_ok"] == n
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert_each_once(ids(lines), out)
    batch = batch_from(p.stdout)
    assert Counter(batch["hfbatch"]["providers"]) == Counter({"fake-b": n})
    assert batch["hfbatch"]["latency_ms"]["p50"] >= 100  # the fake's 150 ms latency is measured


def test_hf_task_lines_and_metadata(tmp_path: Path, fake, run_cli) -> None:
    """`/hf/<task>` lines (our extension) go through huggingface_hub's provider helper to the task's
    hf-inference route and their answers are written unchanged; --metadata lands in the Batch."""
    lines = [
        {"custom_id": "cls-1", "method": "POST", "url": "/hf/text-classification",
         "body": {"model": "test-org/tiny-classifier", "inputs": "I love it", "parameters": {"top_k": 2}}},
        {"custom_id": "sum-1", "method": "POST", "url": "/hf/summarization",
         "body": {"model": "test-org/tiny-summarizer", "inputs": "A long text to summarize."}},
        {"custom_id": "bad-task", "method": "POST", "url": "/hf/text-classification",
         "body": {"model": "test-org/NonExistClassifier", "inputs": "x"}},
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "--metadata", "team=ml", "--metadata", "run=7"])
    assert p.returncode == 3, p.stderr  # the unknown model fails its line only
    batch = batch_from(p.stdout)
    assert batch["metadata"] == {"team": "ml", "run": "7"}
    out = {o["custom_id"]: o for o in read_jsonl(tmp_path / "in.output.jsonl")}
    assert out["cls-1"]["response"]["body"] == [[{"label": "POSITIVE", "score": 0.9},
                                                 {"label": "NEGATIVE", "score": 0.1}]]
    assert out["sum-1"]["response"]["body"] == [{"summary_text": "A long text to summarize."}]
    (err,) = read_jsonl(tmp_path / "in.errors.jsonl")
    assert err["custom_id"] == "bad-task" and err["error"]["code"] == "model_not_found"
    paths = fake.stats()["paths"]
    assert paths["/hf-inference/models/test-org/tiny-classifier"] == 1
    assert paths["/hf-inference/models/test-org/tiny-summarizer"] == 1


def test_coalesce_packs_single_input_embeddings(tmp_path: Path, fake, run_cli) -> None:
    """--coalesce 16: 100 single-input embeddings lines send 7 requests; every line still gets its
    own OpenAI CreateEmbeddingResponse (one embedding, index 0) and the usage adds up."""
    import openai

    lines = [embeddings_line(f"e{i}", f"text {i} " * (1 + i % 3)) for i in range(100)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q", "--coalesce", "16", "--base-url", fake.url + "/v1"])
    assert p.returncode == 0, p.stderr
    batch = batch_from(p.stdout)
    assert fake.stats()["paths"]["/v1/embeddings"] == 7
    assert batch["hfbatch"]["savings"]["coalesced_requests"] == 93
    out = read_jsonl(tmp_path / "in.output.jsonl")
    assert sorted(o["custom_id"] for o in out) == sorted(f"e{i}" for i in range(100))
    total = 0
    for o in out:
        body = openai.types.CreateEmbeddingResponse.model_validate(o["response"]["body"])
        assert len(body.data) == 1 and body.data[0].index == 0
        total += body.usage.prompt_tokens
    assert total == batch["usage"]["input_tokens"] == 5 * 100  # the fake bills 5 tokens per input


def test_line_separators_in_answers_and_ids_stay_inside_their_line(tmp_path: Path, fake, run_cli) -> None:
    """U+2028, U+2029 and U+0085 are line breaks to Python's splitlines() (and to JavaScript before ES2019):
    written raw, one JSONL line reads as several. They go out escaped, and the values are unchanged."""
    seps = "a\u2028b\u2029c\u0085d"
    lines = [chat_line(f"ok{seps}", f"say {seps}"),
             chat_line(f"bad{seps}", "hi", model="test-org/NonExist-model"),
             chat_line("plain", "nothing special é — ’")]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = run_cli(["in.jsonl", "-q"])
    assert p.returncode == 3, p.stderr
    for name in ("in.output.jsonl", "in.errors.jsonl"):
        text = (tmp_path / name).read_bytes().decode()
        assert len(text.splitlines()) == text.count("\n"), f"{name}: a line separator was written raw"
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    assert_each_once(ids(lines), out, err)
    got = {o["custom_id"]: o for o in out}
    assert got[f"ok{seps}"]["response"]["body"]["choices"][0]["message"]["content"] == f"echo: say {seps}"
    assert "\\u2028" in (tmp_path / "in.output.jsonl").read_text()
    assert "é — ’" in (tmp_path / "in.output.jsonl").read_text()  # other non-ASCII stays as it was
    assert len(p.stdout.splitlines()) == 1  # the Batch object too
