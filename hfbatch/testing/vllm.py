"""A stand-in for `vllm run-batch` (tests, `make demo-gpu`): the same flags, vLLM's output shapes and progress
lines, no GPU and no vLLM. Never imports vLLM.

    python -m hfbatch.testing.vllm run-batch -i IN -o OUT --model M [any other vLLM flag]

`install(bin_dir)` writes an executable `vllm` there that runs this module (put the folder first on PATH, or
point HFBATCH_VLLM at it). What it does, as vLLM 0.33's runner (engines/vllm_parts.py says what is relied on):
every line is validated first and one bad line aborts the run ("Invalid request on line N", nothing written,
exit 1); then each answer is written in input order and flushed; progress goes to stderr.

Knobs (environment): FAKE_VLLM_CRASH_AFTER=N exit 1 after N answers (FAKE_VLLM_CRASH_MARKER=1: at a line
that says `[[vllm:crash]]`); FAKE_VLLM_DELAY=s per answer;
FAKE_VLLM_HOLD=path wait for that file to exist before answering (FAKE_VLLM_HOLD_AFTER=N: after N answers);
FAKE_VLLM_OLD=1 write the whole file at the end (vLLM before 0.33); FAKE_VLLM_ECHO_TOKEN=1 print HF_TOKEN in
the log (a careless image: what hfbatch keeps of a Job's log must not hold it); FAKE_VLLM_RECORD=path append one JSON
line per run (model, custom_ids, flags, whether HF_TOKEN was set; never the token). In a request's text:
`[[vllm:reject]]` fails validation, `[[vllm:error]]` a model error (400, `{"error": {...}}`), `[[vllm:plain]]`
an error as a plain string (as vLLM writes for an unsupported url or a stream). A body whose model is not
--model gets vLLM's 404.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

VERSION = "0.33.0"
_URLS = ("/v1/chat/completions", "/v1/embeddings", "/v1/audio/transcriptions", "/v1/audio/translations")


def install(bin_dir: Path) -> Path:
    """An executable `vllm` in `bin_dir` that runs this stand-in with this Python."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "vllm"
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom hfbatch.testing.vllm import main\nsys.exit(main())\n")
    shim.chmod(0o755)
    return shim


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)  # pydantic's compact model_dump_json


def _log(err: TextIO, text: str) -> None:
    err.write(text + "\n")
    err.flush()


def _interval(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _progress(err: TextIO, n: int, total: int, start: float) -> None:
    elapsed = time.monotonic() - start
    rate = n / elapsed if elapsed > 0 else 0.0
    remaining = (total - n) / rate if rate > 0 else 0.0
    pct = int(100 * n / total) if total else 100
    _log(err, f"Running batch: {pct:3d}% Completed | {n}/{total} [{_interval(elapsed)}<{_interval(remaining)}, "
              f"{rate:.2f}req/s]")


def _text(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False)


def _tokens(text: str) -> int:
    return 10 + len(text) // 4


def _answer(line: dict[str, Any], model: str) -> tuple[int, Any, Any]:
    """(status, body, error) for one valid line."""
    body, url = line["body"], line["url"]
    text = _text(body)
    if "[[vllm:plain]]" in text:
        return 400, None, "Request must not be sent in stream mode"
    if "[[vllm:error]]" in text:
        return 400, None, {"error": {"message": "This model's maximum context length is 8192 tokens. However, you "
                                                "requested 9000 tokens.", "type": "BadRequestError", "param": None,
                                     "code": 400}}
    if body.get("model") != model:
        return 404, None, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                     "type": "NotFoundError", "param": "model", "code": 404}}
    now = int(time.time())
    if url == "/v1/chat/completions":
        msgs = body.get("messages") or [{}]
        last = msgs[-1].get("content") if isinstance(msgs[-1], dict) else ""
        content = last if isinstance(last, str) else json.dumps(last)
        cap = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        completion = min(int(cap), 8)
        prompt = _tokens(json.dumps(msgs))
        return 200, {
            "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": now, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {content[:64]}",
                                                 "refusal": None, "annotations": None, "audio": None,
                                                 "function_call": None, "tool_calls": [], "reasoning": None,
                                                 "reasoning_content": None},
                         "logprobs": None, "finish_reason": "stop", "stop_reason": None, "token_ids": None}],
            "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
                      "prompt_tokens_details": None},
            "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None}, None
    if url == "/v1/embeddings":
        inputs = body.get("input")
        texts = inputs if isinstance(inputs, list) else [inputs]
        data = [{"index": i, "object": "embedding",
                 "embedding": [round(((hash(str(t)) >> k) % 1000) / 1000 - 0.5, 6) for k in range(8)]}
                for i, t in enumerate(texts)]
        k = sum(_tokens(str(t)) for t in texts)
        return 200, {"id": "embd-" + uuid.uuid4().hex, "object": "list", "created": now, "model": model,
                     "data": data, "usage": {"prompt_tokens": k, "total_tokens": k, "completion_tokens": 0,
                                             "prompt_tokens_details": None}}, None
    if url.endswith("/score"):
        return 200, {"id": "score-" + uuid.uuid4().hex, "object": "list", "created": now, "model": model,
                     "data": [{"index": 0, "object": "score", "score": 0.5}],
                     "usage": {"prompt_tokens": 12, "total_tokens": 12, "completion_tokens": 0}}, None
    if url.endswith("/rerank"):
        docs = body.get("documents") or []
        return 200, {"id": "rerank-" + uuid.uuid4().hex, "model": model, "usage": {"total_tokens": 12},
                     "results": [{"index": i, "document": {"text": str(d)}, "relevance_score": 0.5}
                                 for i, d in enumerate(docs)]}, None
    if url in _URLS:
        return 200, {"text": "stand-in transcription"}, None
    return 400, None, (f"URL {url} was used. Supported endpoints: /v1/chat/completions, /v1/embeddings, "
                       "/v1/audio/transcriptions, /v1/audio/translations, /score,  /rerank.")


def _args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    flags: dict[str, str] = {}
    rest: list[str] = []
    names = {"-i": "input", "--input-file": "input", "-o": "output", "--output-file": "output", "--model": "model"}
    i = 0
    while i < len(argv):
        a = argv[i]
        if "=" in a and a.split("=", 1)[0] in names:
            k, v = a.split("=", 1)
            flags[names[k]] = v
        elif a in names and i + 1 < len(argv):
            flags[names[a]] = argv[i + 1]
            i += 1
        else:
            rest.append(a)
        i += 1
    return flags, rest


def run_batch(argv: list[str], err: TextIO) -> int:
    flags, rest = _args(argv)
    for need in ("input", "output", "model"):
        if need not in flags:
            _log(err, f"vllm run-batch: error: the following arguments are required: --{need}")
            return 2
    env = os.environ
    model, started = flags["model"], time.monotonic()
    _log(err, f"INFO vLLM batch processing API version {VERSION} (hfbatch's stand-in: no GPU, no model)")
    _log(err, f"INFO Reading batch from {flags['input']}...")
    try:
        raw_lines = [ln for ln in Path(flags["input"]).read_text(encoding="utf-8").split("\n") if ln.strip()]
    except OSError as e:
        _log(err, f"FileNotFoundError: {e}")
        return 1
    record = env.get("FAKE_VLLM_RECORD")
    if record:  # every run, a refused one too
        with open(record, "a", encoding="utf-8") as f:
            ids = [json.loads(ln).get("custom_id") if ln.startswith("{") else None for ln in raw_lines]
            f.write(_dumps({"model": model, "custom_ids": ids, "flags": rest,
                            "has_token": bool(env.get("HF_TOKEN"))}) + "\n")
    lines: list[dict[str, Any]] = []
    for n, raw in enumerate(raw_lines, 1):
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or not isinstance(obj.get("body"), dict) or "[[vllm:reject]]" in raw:
                raise ValueError("1 validation error for BatchRequestInput\nbody\n  Input should be a valid "
                                 "request body for this url")
        except ValueError as e:
            _log(err, f"ValueError: Invalid request on line {n}: {str(e).splitlines()[0]}")
            return 1
        lines.append(obj)
    if env.get("FAKE_VLLM_ECHO_TOKEN") == "1":  # an image that prints its environment: hfbatch must redact it
        _log(err, f"DEBUG environment: HF_TOKEN={env.get('HF_TOKEN')}")
    time.sleep(float(env.get("FAKE_VLLM_LOAD_SECONDS") or 0))
    crash_after = int(env["FAKE_VLLM_CRASH_AFTER"]) if env.get("FAKE_VLLM_CRASH_AFTER") else None
    delay = float(env.get("FAKE_VLLM_DELAY") or 0)
    hold, hold_after = env.get("FAKE_VLLM_HOLD"), int(env.get("FAKE_VLLM_HOLD_AFTER") or 0)
    old = env.get("FAKE_VLLM_OLD") == "1"
    start = time.monotonic()
    _progress(err, 0, len(lines), start)
    done: list[str] = []
    out = open(flags["output"], "w", encoding="utf-8")  # noqa: SIM115 - flushed line by line, closed below
    try:
        for n, line in enumerate(lines):
            if hold and n >= hold_after:
                while not os.path.exists(hold):
                    time.sleep(0.02)
            marked = env.get("FAKE_VLLM_CRASH_MARKER") == "1" and "[[vllm:crash]]" in json.dumps(line)
            if (crash_after is not None and n >= crash_after) or marked:
                _log(err, "RuntimeError: CUDA error: an illegal memory access was encountered (stand-in crash)")
                return 1
            if delay:
                time.sleep(delay)
            status, body, error = _answer(line, model)
            text = _dumps({"id": "vllm-" + uuid.uuid4().hex, "custom_id": line.get("custom_id"),
                           "response": {"status_code": status, "request_id": "vllm-batch-" + uuid.uuid4().hex,
                                        "body": body}, "error": error})
            if old:
                done.append(text)
            else:
                out.write(text + "\n")
                out.flush()
            _progress(err, n + 1, len(lines), start)
        if old:
            _log(err, f"INFO Writing outputs to local file {flags['output']}")
            out.write("".join(t + "\n" for t in done))
    finally:
        out.close()
    _log(err, f"INFO batch done in {time.monotonic() - started:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "run-batch":
        print("usage: vllm run-batch -i INPUT -o OUTPUT --model MODEL [engine flags] (hfbatch's stand-in)",
              file=sys.stderr)
        return 2
    return run_batch(args[1:], sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
