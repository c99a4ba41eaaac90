# make setup: one .venv with everything (CPU torch 2.13.0, onnx, onnxscript, onnxruntime CPU).
# It is idempotent: it reinstalls only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest

.PHONY: setup test test-slow test-all demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[cpu,export,hub,dev]'
	touch $@

# The quick suite (< 20 min on 2 cores). CI also runs `make test-slow`.
test: setup
	$(PYTEST) -q -m "not slow"

test-slow: setup
	$(PYTEST) -q -m slow || [ $$? -eq 5 ]  # 5: no slow test collected

test-all: setup
	$(PYTEST) -q

demo: setup
	@echo "make demo: not yet (needs the embedded model, issue 5)"

bench: setup
	@echo "make bench: not yet (issue 6)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
