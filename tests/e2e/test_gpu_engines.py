"""The GPU engines end to end: the real CLI as a subprocess, `vllm` being hfbatch's stand-in (testing/vllm.py)
and Hugging Face Jobs the local fake Hub (testing/fake_hub.py) reached through huggingface_hub's real client
(HF_ENDPOINT). The bucket transfers (xet) go through the local folder seam (HFBATCH_BUCKETS_DIR) that the fake
Hub mounts in its Jobs. Every run is checked by conftest: no traceback, the token in no output, log or file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CHAT_MODEL,
    TOKEN,
    Cli,
    assert_each_once,
    chat_line,
    check_batch,
    check_completed,
    check_error_line,
    check_output_line,
    check_private,
    cli_env,
    embeddings_line,
    last_json,
    poll,
    read_jsonl,
    write_jsonl,
)

from hfbatch.testing.fake_hub import FakeHubConfig, ThreadedFakeHub
from hfbatch.testing.vllm import install

M1, M2, M3 = "org-a/chat-one", "org-b/chat-two", "org-c/chat-three"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"  # 8B parameters in the fake Hub, as on hf.co


@pytest.fixture
def vllm_bin(tmp_path: Path) -> Path:
    return install(tmp_path / "bin")


@pytest.fixture
def hub(tmp_path: Path, vllm_bin: Path) -> Iterator[ThreadedFakeHub]:
    h = ThreadedFakeHub(FakeHubConfig(storage=str(tmp_path / "buckets"), bin_dir=str(vllm_bin.parent),
                                      metrics_interval=0.2)).start()
    yield h
    h.stop()


class GpuCli(Cli):
    """Cli with the GPU engines' environment (the stand-in, the fake Hub, the bucket folder)."""

    extra: dict[str, str | None] = {}

    def _env(self) -> dict[str, str]:
        return cli_env(self.tmp_path, self.fakes[-1] if self.fakes else None, self.extra)


@pytest.fixture
def gpu(tmp_path: Path, _fakes: list[Any], vllm_bin: Path) -> Iterator[GpuCli]:
    c = GpuCli(tmp_path, _fakes)
    c.extra = {"HFBATCH_VLLM": str(vllm_bin), "FAKE_VLLM_RECORD": str(tmp_path / "vllm-runs.jsonl")}
    yield c
    c.close()


def on_hub(gpu: GpuCli, hub: ThreadedFakeHub) -> GpuCli:
    gpu.extra = {**gpu.extra, "HF_ENDPOINT": hub.url, "HFBATCH_BUCKETS_DIR": hub.config.storage,
                 "HFBATCH_JOBS_POLL": "0.3"}
    hub.config.job_env["FAKE_VLLM_RECORD"] = str(gpu.tmp_path / "vllm-runs.jsonl")
    return gpu


def runs(tmp_path: Path) -> list[dict[str, Any]]:
    """What each stand-in vllm run was given (model, custom_ids, flags, whether HF_TOKEN was set)."""
    return read_jsonl(tmp_path / "vllm-runs.jsonl")


def check_lines(tmp_path: Path, urls: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The output and error files in exactly OpenAI's shapes (the openai SDK's types as the oracle)."""
    out, err = read_jsonl(tmp_path / "in.output.jsonl"), read_jsonl(tmp_path / "in.errors.jsonl")
    for line in out:
        check_output_line(line, urls[line["custom_id"]])
    for line in err:
        check_error_line(line)
    return out, err


def test_vllm_here_models_embeddings_every_error_shape_a_crash_then_only_the_rest(tmp_path: Path,
                                                                                 gpu: GpuCli) -> None:
    lines = [
        chat_line("a1", "first", model=f"{M1}:fastest"), chat_line("a2", "[[vllm:crash]] second", model=M1),
        chat_line("a3", "first", model=f"{M1}:fastest"),  # a copy of a1: sent once
        chat_line("b1", "hello", model=M2), embeddings_line("b2", "some text", model=M2),
        chat_line("c1", "[[vllm:error]] too long", model=M3), chat_line("c2", "[[vllm:plain]]", model=M3),
        chat_line("c3", "[[vllm:reject]]", model=M3), chat_line("c4", "fine", model=M3, max_tokens=900),
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    urls = {ln["custom_id"]: ln["url"] for ln in lines}
    gpu.extra["FAKE_VLLM_CRASH_MARKER"] = "1"
    first = gpu.run("submit", "in.jsonl", "--engine", "vllm", "--gpu-price", "1.8", "--max-tokens", "64", "-q")
    assert first.returncode == 5, first.stderr  # the crash: stopped early, resumable
    assert f"part p0001 ({M1}, 2 requests) exited with code 1 after 1 answers" in first.stderr, first.stderr
    assert "illegal memory access" in first.stderr  # the tail of vLLM's log says why
    b = check_batch(last_json(first.stdout))
    assert b["status"] == "in_progress" and b["hfbatch"]["stop_reason"] == "engine_failed"
    out, err = check_lines(tmp_path, urls)
    assert sorted(x["custom_id"] for x in out + err) == ["a1", "a3", "b1", "b2", "c1", "c2", "c3", "c4"]
    sent = runs(tmp_path)
    assert [r["model"] for r in sent] == [M1, M2, M3, M3]  # one part per model; c's again without c3
    assert sent[0]["custom_ids"] == ["a1", "a2"] and sent[2]["custom_ids"] == ["c1", "c2", "c3", "c4"]
    assert sent[3]["custom_ids"] == ["c1", "c2", "c4"]
    assert all(r["has_token"] for r in sent)

    del gpu.extra["FAKE_VLLM_CRASH_MARKER"]
    again = gpu.run("submit", "in.jsonl", "--engine", "vllm", "--gpu-price", "1.8", "--max-tokens", "64", "-q")
    assert again.returncode == 3, again.stderr  # finished; c1, c2 and c3 failed
    assert [r["custom_ids"] for r in runs(tmp_path)[4:]] == [["a2"]]  # only the rest: never an answered line
    out, err = check_lines(tmp_path, urls)
    assert_each_once(urls, out, err)
    done = check_batch(last_json(again.stdout))
    check_completed(done)
    assert done["request_counts"] == {"total": 9, "completed": 6, "failed": 3}
    by_id = {x["custom_id"]: x for x in out + err}
    assert by_id["a3"]["response"]["body"] == by_id["a1"]["response"]["body"]  # the copy got the answer
    assert by_id["b2"]["response"]["body"]["object"] == "list"
    assert by_id["c1"]["response"]["body"]["error"]["message"].startswith("This model's maximum context")
    assert by_id["c2"]["response"]["status_code"] == 400  # vLLM's plain-string error, in OpenAI's envelope
    assert by_id["c2"]["response"]["body"]["error"]["message"] == "Request must not be sent in stream mode"
    assert by_id["c3"]["error"]["code"] == "invalid_request" and "refused" in by_id["c3"]["error"]["message"]
    assert all(x["id"].startswith("batch_req_") for x in out + err)
    assert by_id["a1"]["response"]["request_id"].startswith("vllm-batch-")
    assert by_id["c4"]["response"]["body"]["usage"]["completion_tokens"] == 8
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    hb = done["hfbatch"]
    assert hb["engine"] == "vllm" and b["hfbatch"]["savings"]["deduped_requests"] == 1  # a3, in the first run
    assert [j["stage"] for j in hb["jobs"]] == ["ERROR", "COMPLETED", "ERROR", "COMPLETED", "COMPLETED"]
    assert hb["cost"]["basis"] == "gpu_time" and hb["estimated_cost_usd"] > 0  # 1.8 $/h x wall time
    check_private(gpu.home)


def test_jobs_killed_hfbatch_reattaches_without_a_second_job_and_the_token_is_only_a_secret(
        tmp_path: Path, gpu: GpuCli, hub: ThreadedFakeHub, make_fake: Any) -> None:
    make_fake()  # the router's price list, for the estimate at the end
    on_hub(gpu, hub)
    hold = tmp_path / "release"
    hub.config.job_env.update(FAKE_VLLM_HOLD=str(hold), FAKE_VLLM_HOLD_AFTER="1")
    # Models the fake router prices (the estimate below); the 8B one is too big for a T4.
    lines = [chat_line(f"r{i}", f"q{i}", model=CHAT_MODEL if i % 2 else LLAMA) for i in range(6)]
    lines.append(embeddings_line("e0", "text", model=CHAT_MODEL))
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = gpu.start("submit", "in.jsonl", "--engine", "hf-jobs", "--flavor", "l4x1", "-q")

    def running() -> bool:
        jobs = hub.stats()["jobs"].values()
        return len(jobs) == 2 and all(j["stage"] == "RUNNING" for j in jobs)

    poll(running, "two Jobs running", proc=p)
    gpu.kill9(p)  # hfbatch dies; the Jobs go on
    batch_id = gpu.only_batch_id()
    calls = hub.stats()["calls"]
    again = gpu.start("submit", "in.jsonl", "--engine", "hf-jobs", "--flavor", "l4x1", "-q")
    poll(lambda: hub.stats()["calls"].get("logs", 0) >= calls.get("logs", 0) + 2, "the rerun following the Jobs",
         proc=again)
    hold.touch()
    code, out_text, err_text = gpu.finish(again)
    assert code == 0, err_text
    stats = hub.stats()
    assert stats["calls"]["run_job"] == 2 and stats["calls"]["whoami"] == 1  # no second Job; whoami once
    assert all(j["stage"] == "COMPLETED" for j in stats["jobs"].values())
    urls = {ln["custom_id"]: ln["url"] for ln in lines}
    out, err = check_lines(tmp_path, urls)
    assert not err, err
    assert_each_once(urls, out, err)
    done = check_batch(last_json(out_text))
    check_completed(done)
    hb = done["hfbatch"]
    assert hb["engine"] == "hf-jobs" and {j["stage"] for j in hb["jobs"]} == {"COMPLETED"}
    assert all(j["url"].startswith(hub.url + "/jobs/test-user/") and j["flavor"] == "l4x1" for j in hb["jobs"])
    assert hb["cost"]["basis"] == "jobs_billing"
    assert hb["estimated_cost_usd"] == pytest.approx(2 * 0.80 / 60, abs=1e-6)  # 2 Jobs x 1 started minute
    # The token: a Job secret, never in a command, environment or label (the files: conftest checks them all).
    for spec in stats["specs"]:
        assert spec["secrets"] == {"HF_TOKEN": "<secret>"} and spec["timeoutSeconds"] >= 1800
        assert TOKEN not in json.dumps([spec["command"], spec["environment"], spec["labels"], spec["volumes"]])
        assert spec["labels"]["hfbatch-batch"] == batch_id
    assert hub.call(lambda: hub.hub.secrets_seen) == [{"HF_TOKEN": TOKEN}] * 2
    assert all(r["has_token"] for r in runs(tmp_path))  # the secret reached the Job
    assert not list((Path(hub.config.storage) / "test-user" / "hfbatch" / batch_id).glob("*.jsonl"))  # cleaned up

    # The run measured its tokens/s on l4x1: the comparison now rests on it for that flavor.
    est = gpu.run("estimate", "in.jsonl", "--compare", "--flavors", "l4x1,t4-small,a100-large", "--json")
    assert est.returncode == 0, est.stderr
    cmp = json.loads(est.stdout)
    options = cmp["options"]
    assert [o["cost_usd"] for o in options] == sorted(o["cost_usd"] for o in options)  # cheapest first
    jobs = {o["flavor"]: o for o in options if o["engine"] == "hf-jobs"}
    assert set(jobs) == {"l4x1", "a100-large"} and [s["flavor"] for s in cmp["skipped_flavors"]] == ["t4-small"]
    assert f"{LLAMA}: start-up" in jobs["l4x1"]["basis"] and "measured" in jobs["l4x1"]["basis"]
    assert "prior: A100" in jobs["a100-large"]["basis"]
    assert {o["provider"] for o in options if o["engine"] == "http"} == {"fake-a", "fake-b"}


def test_a_job_in_error_is_reported_with_its_log_and_the_rerun_relaunches_only_the_rest(
        tmp_path: Path, gpu: GpuCli, hub: ThreadedFakeHub) -> None:
    on_hub(gpu, hub)
    hub.config.job_env.update(FAKE_VLLM_CRASH_AFTER="2", FAKE_VLLM_ECHO_TOKEN="1")  # its log prints the token
    lines = [chat_line(f"r{i}", f"q{i}", model=M1) for i in range(5)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    first = gpu.run("submit", "in.jsonl", "--engine", "hf-jobs", "--flavor", "a10g-small", "--namespace", "my-org",
                    "--job-timeout", "45m", "-q")
    assert first.returncode == 5, first.stderr
    assert "ended in ERROR after 2 answers: Job failed with exit code: 1; its log ends:" in first.stderr
    assert "illegal memory access" in first.stderr and "HF_TOKEN=hf_***" in first.stderr  # redacted
    b = check_batch(last_json(first.stdout))
    assert b["hfbatch"]["jobs"][0]["stage"] == "ERROR" and "illegal memory" in b["hfbatch"]["jobs"][0]["message"]
    assert b["request_counts"]["completed"] == 2
    spec = hub.stats()["specs"][0]
    assert spec["timeoutSeconds"] == 45 * 60 and spec["flavor"] == "a10g-small"
    assert hub.stats()["calls"].get("whoami") is None  # --namespace given: no whoami at all

    del hub.config.job_env["FAKE_VLLM_CRASH_AFTER"]
    again = gpu.run("submit", "in.jsonl", "--engine", "hf-jobs", "--flavor", "a10g-small", "--namespace", "my-org",
                    "-q")
    assert again.returncode == 0, again.stderr
    assert [r["custom_ids"] for r in runs(tmp_path)] == [[f"r{i}" for i in range(5)], ["r2", "r3", "r4"]]
    out, err = check_lines(tmp_path, {f"r{i}": "/v1/chat/completions" for i in range(5)})
    assert_each_once([f"r{i}" for i in range(5)], out, err)
    assert [j["stage"] for j in check_batch(last_json(again.stdout))["hfbatch"]["jobs"]] == ["ERROR", "COMPLETED"]


def test_jobs_detach_then_cancel_cancels_the_job_and_ends_the_rest_cancelled(
        tmp_path: Path, gpu: GpuCli, hub: ThreadedFakeHub) -> None:
    on_hub(gpu, hub)
    hold = tmp_path / "never"
    hub.config.job_env.update(FAKE_VLLM_HOLD=str(hold), FAKE_VLLM_HOLD_AFTER="2")
    lines = [chat_line(f"r{i}", f"q{i}", model=M1) for i in range(5)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    p = gpu.run("submit", "in.jsonl", "--engine", "hf-jobs", "--flavor", "l4x1", "--detach", "-q")
    assert p.returncode == 0, p.stderr
    launched = check_batch(last_json(p.stdout))
    batch_id = launched["id"]
    assert launched["status"] == "in_progress" and launched["hfbatch"]["jobs"][0]["stage"] in ("SCHEDULING", "RUNNING")
    assert hub.stats()["calls"]["run_job"] == 1  # launched before the command returned
    poll(lambda: _held(hub), "the Job answering its first lines")
    c = gpu.run("cancel", batch_id)
    assert c.returncode == 0, c.stderr
    w = gpu.run("wait", batch_id, "--timeout", "20", timeout=30)
    assert w.returncode == 6, (w.returncode, w.stderr)
    done = check_batch(last_json(w.stdout))
    assert done["status"] == "cancelled" and done["hfbatch"]["jobs"][0]["stage"] == "CANCELED"
    assert [j["stage"] for j in hub.stats()["jobs"].values()] == ["CANCELED"]
    out, err = check_lines(tmp_path, {f"r{i}": "/v1/chat/completions" for i in range(5)})
    assert_each_once([f"r{i}" for i in range(5)], out, err)
    assert [x["custom_id"] for x in out] == ["r0", "r1"]  # what the Job had answered is kept
    assert {x["error"]["code"] for x in err} == {"batch_cancelled"}


def _held(hub: ThreadedFakeHub) -> bool:
    """The Job wrote its first two answers and waits."""
    found = list((Path(hub.config.storage)).rglob("p0001.output.jsonl"))
    return bool(found) and found[0].read_bytes().count(b"\n") >= 2


def test_before_any_gpu_is_paid_the_model_must_exist_and_fit(tmp_path: Path, gpu: GpuCli,
                                                           hub: ThreadedFakeHub) -> None:
    on_hub(gpu, hub)
    hub.config.params[M1] = 70_000_000_000
    write_jsonl(tmp_path / "in.jsonl", [chat_line("r0", model=M2), chat_line("r1", model=M1)])
    big = gpu.run("submit", "in.jsonl", "--engine", "hf-jobs", "--flavor", "l4x1", "-q")
    assert big.returncode == 2, big.stderr
    assert f"model {M1} needs about 187 GB of GPU memory" in big.stderr and "l4x1 has 24 GB" in big.stderr
    write_jsonl(tmp_path / "in2.jsonl", [chat_line("r0", model="org/NonExistent-model")])
    missing = gpu.run("submit", "in2.jsonl", "--engine", "hf-jobs", "--flavor", "a100x4", "-q")
    assert missing.returncode == 2 and "model org/NonExistent-model: not found" in missing.stderr, missing.stderr
    assert hub.stats()["calls"].get("run_job") is None  # nothing launched, nothing paid
