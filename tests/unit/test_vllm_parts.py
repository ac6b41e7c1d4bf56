"""The pieces of the GPU engines that need no process: vLLM's lines as OpenAI's (every shape vLLM writes), its
progress lines, the engine's validation rule, and the GPU cost rules (fit, priors, measurements, billing)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from conftest import check_error_envelope

from hfbatch.cost.gpu import (
    Flavor,
    GpuCost,
    ModelSize,
    billed_minutes,
    estimate_run,
    fits,
    flavors_from,
    measured,
    model_size,
    record,
)
from hfbatch.engines.vllm_lines import (
    LogTail,
    cap_output,
    convert,
    engine_rule,
    parse_interval,
    parse_progress,
    rejected_line,
    vllm_model,
)
from hfbatch.models import Failure, NoAnswer, Success
from hfbatch.testing.fake_hub import HARDWARE
from hfbatch.validate import validate_line


def _line(status: int, body: object, error: object) -> bytes:
    obj = {"id": "vllm-1", "custom_id": "c1", "response": {"status_code": status, "request_id": "vllm-batch-9",
                                                          "body": body}, "error": error}
    return json.dumps(obj, separators=(",", ":")).encode()


def test_a_success_keeps_vllms_body_bytes_and_request_id() -> None:
    body = {"object": "chat.completion", "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "x": 1e-05}
    raw = _line(200, body, None)
    answer, usage_body = convert(orjson.loads(raw), raw)
    assert isinstance(answer, Success) and answer.request_id == "vllm-batch-9" and answer.tokens == (3, 2)
    assert isinstance(answer.body, orjson.Fragment)  # passed through as written: 1e-05 stays 1e-05
    assert orjson.dumps(answer.body) == json.dumps(body, separators=(",", ":")).encode()
    assert usage_body == body


@pytest.mark.parametrize("error, message", [
    ({"error": {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}}, "too long"),
    ({"object": "error", "message": "flat", "type": "BadRequestError", "param": "messages", "code": 400}, "flat"),
    ("Request must not be sent in stream mode", "Request must not be sent in stream mode"),
])
def test_every_error_shape_of_vllm_becomes_openais_envelope(error: object, message: str) -> None:
    raw = _line(400, None, error)
    answer, _ = convert(orjson.loads(raw), raw)
    assert isinstance(answer, Failure) and answer.status == 400 and answer.request_id == "vllm-batch-9"
    err = check_error_envelope(answer.body)  # the openai SDK's ErrorObject: code is a string or null
    assert err["message"] == message and err["type"] == "invalid_request_error" and err["code"] is None


def test_a_404_is_a_not_found_error_and_a_line_without_answer_is_no_answer() -> None:
    raw = _line(404, None, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                                      "param": "model", "code": 404}})
    answer, _ = convert(orjson.loads(raw), raw)
    assert isinstance(answer, Failure) and answer.body["error"]["type"] == "not_found_error"
    assert answer.body["error"]["param"] == "model"
    broken = b'{"id":"vllm-1","custom_id":"c1","response":null,"error":"engine died"}'
    assert isinstance(convert(orjson.loads(broken), broken)[0], NoAnswer)


def test_progress_lines_and_refused_lines_are_read_from_the_log() -> None:
    p = parse_progress("Running batch:  40% Completed | 4/10 [01:05<00:30, 3.21req/s]")
    assert p is not None and (p.done, p.total, p.elapsed, p.rate) == (4, 10, 65.0, "3.21req/s")
    assert parse_interval("1:02:03") == 3723 and parse_interval("2d, 1:00:00") == 2 * 86400 + 3600
    assert parse_progress("INFO loading weights") is None
    assert rejected_line("ValueError: Invalid request on line 7: 1 validation error") == (7, "1 validation error")
    log = LogTail("hf_secret_canary")
    log.feed("Running batch: 100% Completed | 3/3 [00:02<00:00, 1.5req/s]\rsomething")
    log.feed("token is hf_secret_canary, oops")
    assert log.progress is not None and log.progress.done == 3
    assert "hf_secret_canary" not in log.tail() and "hf_***" in log.tail()


def test_the_rule_refuses_what_vllms_runner_cannot_serve_naming_engine_http() -> None:
    rule = engine_rule("vllm")
    for url in ("/v1/responses", "/v1/completions", "/v1/moderations", "/hf/text-classification"):
        line = json.dumps({"custom_id": "a", "method": "POST", "url": url, "body": {"model": "m", "input": "x"}})
        r = validate_line(1, line.encode(), None, rule=rule)
        assert not hasattr(r, "url") and r.code == "invalid_request" and "--engine http" in r.message, (url, r)
    for url in ("/v1/chat/completions", "/v1/embeddings", "/score", "/v1/rerank", "/v2/rerank"):
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "input": "x"}
        assert rule(url, body) is None, url
    assert rule("/v1/chat/completions", {"model": "m", "messages": []}) is not None  # one would abort the run


def test_router_suffixes_are_dropped_and_max_tokens_caps_chat() -> None:
    assert vllm_model("org/m:fastest") == "org/m" and vllm_model("org/m:groq") == "org/m"
    assert cap_output({"max_tokens": 900}, "/v1/chat/completions", 100) == ({"max_tokens": 100}, True)
    assert cap_output({}, "/v1/chat/completions", 100) == ({"max_tokens": 100}, True)
    assert cap_output({"input": "x"}, "/v1/embeddings", 100) == ({"input": "x"}, False)


def _hardware() -> dict[str, Flavor]:
    items = []
    for name, pretty, gpu, n, vram, usd in HARDWARE:
        acc = SimpleNamespace(model=gpu, quantity=str(n), vram=vram) if gpu else None
        items.append(SimpleNamespace(name=name, pretty_name=pretty, accelerator=acc, unit_cost_usd=usd / 60,
                                     unit_label="minute"))
    return flavors_from(items)


def test_fit_uses_the_gpu_memory_of_the_whole_flavor() -> None:
    flavors = _hardware()
    llama8 = model_size(SimpleNamespace(safetensors=SimpleNamespace(parameters={"BF16": 8_030_261_248},
                                                                    total=8_030_261_248)))
    assert llama8.weights_bytes == 2 * 8_030_261_248
    assert fits(llama8, flavors["l4x1"]) and not fits(llama8, flavors["t4-small"])
    big = ModelSize(70_000_000_000, 140_000_000_000)
    assert not fits(big, flavors["a100-large"]) and fits(big, flavors["a100x4"]) and flavors["a100x4"].memory_gb == 320
    assert fits(ModelSize(None, None), flavors["l4x1"]) is None
    assert flavors["cpu-basic"].gpu is None and flavors["l4x1"].usd_per_hour == pytest.approx(0.80)


def test_estimates_use_the_priors_then_this_machines_measurements(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFBATCH_HOME", str(tmp_path / "home"))
    l4 = _hardware()["l4x1"]
    size = ModelSize(8_000_000_000, 16_000_000_000)
    prior = estimate_run(l4, "org/m", size, 730_000)
    assert prior.basis.startswith("prior: L4") and prior.generate_seconds == pytest.approx(1000)
    record("l4x1", "org/m", 10_000, 5.0, 100.0)
    assert measured("l4x1", "org/m") is not None
    after = estimate_run(l4, "org/m", size, 730_000)
    assert after.basis.startswith("measured") and after.generate_seconds == pytest.approx(730_000 / 2_000)
    assert after.startup_seconds == 100.0


def test_jobs_bill_started_minutes_and_a_local_gpu_its_time() -> None:
    assert [billed_minutes(s) for s in (0, 0.4, 60, 61)] == [0, 1, 1, 2]
    jobs = GpuCost("jobs_billing")
    jobs.set("p1", "l4x1", 61, 0.80 / 60, billed=True)
    assert jobs.summary()["estimated_cost_usd"] == pytest.approx(2 * 0.80 / 60, abs=1e-6)
    local = GpuCost("gpu_time")
    local.set("p1", "local", 1800, None)
    assert local.summary()["estimated_cost_usd"] is None
    local.set("p1", "local", 1800, 2.0 / 60)
    assert local.spent == pytest.approx(1.0)


def test_engine_flags_belong_to_their_engine_and_a_missing_vllm_says_how_to_get_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hfbatch.cli.submit import _check_engine
    from hfbatch.errors import UsageError

    with pytest.raises(UsageError, match="--flavor only applies to --engine hf-jobs"):
        _check_engine("vllm", flavor="l4x1")
    with pytest.raises(UsageError, match="--budget only applies to --engine http"):
        _check_engine("hf-jobs", budget=5.0, flavor="l4x1")
    with pytest.raises(UsageError, match="--vllm-args only applies to --engine vllm or hf-jobs"):
        _check_engine("http", vllm_args="--max-model-len 4096")
    with pytest.raises(UsageError, match="needs --flavor"):
        _check_engine("hf-jobs")
    with pytest.raises(UsageError, match="--job-timeout"):
        _check_engine("hf-jobs", flavor="l4x1", job_timeout="soon")
    monkeypatch.delenv("HFBATCH_VLLM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match=r"pip install vllm.*--engine hf-jobs"):
        _check_engine("vllm")
    monkeypatch.setenv("HFBATCH_VLLM", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="HFBATCH_VLLM"):
        _check_engine("vllm")


def test_a_line_vllm_cannot_serve_fails_validation_naming_engine_http(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from hfbatch.batches.run import BatchRun
    from hfbatch.config import RunConfig
    from hfbatch.errors import InputError
    from hfbatch.testing.vllm import install

    monkeypatch.setenv("HFBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HFBATCH_VLLM", str(install(tmp_path / "bin")))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"custom_id": c, "method": "POST", "url": u, "body": {"model": "m", **b}})
                             for c, u, b in (("ok", "/v1/chat/completions", {"messages": [{"role": "user",
                                                                                          "content": "x"}]}),
                                             ("no", "/v1/responses", {"input": "x"}))) + "\n")
    cfg = RunConfig(input_path=str(src), output_path=str(tmp_path / "o.jsonl"), errors_path=str(tmp_path / "e.jsonl"),
                    engine="vllm")
    result = asyncio.run(BatchRun(cfg).execute())
    assert isinstance(result.error, InputError) and "run this file with --engine http" in str(result.error)
    errors = result.batch["errors"]["data"]
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [(2, "invalid_request", "url")]
    assert not (tmp_path / "o.jsonl").exists() or not (tmp_path / "o.jsonl").read_bytes()  # nothing ran


def test_compare_sorts_the_options_and_gives_serverless_a_wall_time_from_the_providers_probes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hfbatch.cost.estimate import compare_file, estimate_file
    from hfbatch.cost.pricing import Catalog, Price, ProviderInfo

    monkeypatch.setenv("HFBATCH_HOME", str(tmp_path / "home"))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": {"model": "org/m", "max_tokens": 100,
                                                "messages": [{"role": "user", "content": "x" * 400}]}}) + "\n"
                           for i in range(64)))
    catalog = Catalog({"org/m": [ProviderInfo("fast", Price(0.2, 0.6), 50.0, 500.0, "live"),
                                 ProviderInfo("slow", Price(0.1, 0.3), None, None, "live")]}, "file")
    est = estimate_file(str(src), catalog, local_tokenizers=False)
    flavors = _hardware()
    cmp = compare_file(est, catalog, [flavors["l4x1"], flavors["t4-small"]], {"org/m": ModelSize(8e9, 16e9)})
    options = cmp["options"]
    assert [o.get("provider") or o.get("flavor") for o in options] == ["slow", "fast", "l4x1"]
    fast = options[1]
    # 64 requests, 32 at a time: 2 waves of (0.5 s first token + 100 tokens / 50 tokens/s) = 5 s
    assert fast["minutes"] == pytest.approx(5 / 60, abs=0.01) and options[0]["minutes"] is None
    assert cmp["skipped_flavors"] == [{"flavor": "t4-small", "why": "org/m needs about 21 GB of GPU memory; "
                                                                    "t4-small has 16"}]
    assert options[2]["engine"] == "hf-jobs" and "prior: L4" in options[2]["basis"]
