# Same commands locally and in CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8765

.PHONY: install test check demo bench docs clean

$(BIN)/hfbatch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,dev]"
	@touch $@

install: $(BIN)/hfbatch

test: install
	$(BIN)/python -m pytest -n 2 --dist worksteal -q

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

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
