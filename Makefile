# Same commands locally and in CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8765
HUB_PORT ?= 8766

.PHONY: install test check demo demo-gpu bench docs clean

$(BIN)/hfbatch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,dev]"
	@touch $@

install: $(BIN)/hfbatch

# Four workers on two cores: most of the suite waits (a fake's latency, a child's start). The tests are handed
# out one at a time, longest first (tests/conftest.py orders them), so the run does not end on one worker's
# 10 s test (BENCHMARKS.md: "The test suite").
test: install
	$(BIN)/python -m pytest -n 4 --dist load --maxschedchunk 1 -q

check: install
	$(BIN)/ruff check hfbatch tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python scripts/gen_cli_docs.py --check

docs: install
	$(BIN)/python scripts/gen_cli_docs.py

# The main job on the embedded default: the local fake provider stands in for the router.
demo: install
	@$(BIN)/hfbatch fake-provider --port $(PORT) --latency 0.2 & echo $$! > .demo.pid; \
	trap 'kill $$(cat .demo.pid) 2>/dev/null; rm -f .demo.pid' EXIT; \
	$(BIN)/python -c "import socket,time;[time.sleep(0.1) for _ in range(50) if socket.socket().connect_ex(('127.0.0.1',$(PORT)))]"; \
	demo_home=$$(mktemp -d); \
	HF_TOKEN=hf_demo_not_a_real_token HFBATCH_ROUTER_URL=http://127.0.0.1:$(PORT) HFBATCH_HOME=$$demo_home \
	  $(BIN)/hfbatch submit samples/chat.jsonl -o samples/chat.output.jsonl -e samples/chat.errors.jsonl -c 8 \
	  --overwrite; \
	rm -rf $$demo_home; \
	echo "demo: output in samples/chat.output.jsonl" >&2

# The GPU engine without a GPU: hfbatch's stand-in `vllm` runs in "Jobs" of the local fake Hub (HF_ENDPOINT),
# the bucket transfers go through a local folder (HFBATCH_BUCKETS_DIR); the fake router gives the serverless prices.
demo-gpu: install
	@demo=$$(mktemp -d); \
	$(BIN)/python -c "from pathlib import Path; from hfbatch.testing.vllm import install; install(Path('$$demo/bin'))"; \
	$(BIN)/hfbatch fake-provider --port $(PORT) 2>/dev/null & echo $$! > .demo.pid; \
	$(BIN)/hfbatch fake-hub --port $(HUB_PORT) --storage $$demo/buckets --bin-dir $$demo/bin \
	  --job-env FAKE_VLLM_DELAY=0.15 --job-env FAKE_VLLM_LOAD_SECONDS=1 --schedule-seconds 1 & echo $$! >> .demo.pid; \
	trap 'kill $$(cat .demo.pid) 2>/dev/null; rm -f .demo.pid; rm -rf $$demo' EXIT; \
	$(BIN)/python -c "import socket,time;[time.sleep(0.1) for _ in range(50) if socket.socket().connect_ex(('127.0.0.1',$(HUB_PORT)))]"; \
	export HF_TOKEN=hf_demo_not_a_real_token HFBATCH_ROUTER_URL=http://127.0.0.1:$(PORT) HF_ENDPOINT=http://127.0.0.1:$(HUB_PORT) \
	  HFBATCH_BUCKETS_DIR=$$demo/buckets HFBATCH_HOME=$$demo/home HF_HUB_DISABLE_TELEMETRY=1; \
	echo "demo-gpu: which is cheaper for samples/chat.jsonl? (hfbatch estimate --compare)" >&2; \
	$(BIN)/hfbatch estimate samples/chat.jsonl --compare --flavors l4x1,l40sx1,a100-large,h200; \
	echo "demo-gpu: running it on a (fake) h200 Job per model" >&2; \
	$(BIN)/hfbatch submit samples/chat.jsonl --engine hf-jobs --flavor h200 -o samples/chat.gpu.output.jsonl \
	  -e samples/chat.gpu.errors.jsonl --overwrite; \
	echo "demo-gpu: output in samples/chat.gpu.output.jsonl" >&2

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
