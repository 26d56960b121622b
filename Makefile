# Two entry points: `make demo` (the main job) and `make test` (everything CI runs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm

.PHONY: demo test test-unit test-engines test-vllm setup setup-vllm lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e ".[embedded,server,sqlite,postgres,bench,serve,chat,eval,dev]"

demo: setup
	$(BIN)/apr demo

test-unit: setup
	$(BIN)/python -m pytest -m "not engine and not vllm and not server" -q

test-engines: setup
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

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache out
