# One virtual environment at .venv, used by every target.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

# torch is pinned to 2.13.0 in pyproject.toml: on this machine that is the local CPU wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job (README's first command).
demo: $(STAMP)
	$(BIN)/hedgehog bench attention --out bench_out/attention

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: demo

clean:
	rm -rf $(VENV) bench_out .pytest_cache
