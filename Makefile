# Everything a fresh machine needs, in two commands:
#   make demo   # installs, then runs the daemon with a live demo of a real training run
#   make test   # installs, then runs the whole test suite (lint and type check included)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch's CPU build; a plain `pip install torch` would fetch a multi-GB CUDA build
TORCH  ?= torch==2.13.0

.PHONY: demo test setup system-deps bench quality clean

$(BIN)/.installed: pyproject.toml clients/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ./clients -e '.[test,demo]'
	touch $@

setup: $(BIN)/.installed

# Prometheus and promtool (Debian package) for the exporter and alert-rule tests;
# node/npm for validating the Grafana dashboards against @grafana/schema.
system-deps:
	@bash scripts/install-system-deps.sh

demo: setup
	$(BIN)/lrpilot demo

test: setup system-deps
	@bash scripts/run-tests.sh $(BIN)

# speed benchmarks (a few minutes)
bench: setup
	$(BIN)/python bench/run_all.py

# the training-quality benchmark: regenerates docs/quality.md's tables and plots (~5 min)
quality: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/quality/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
