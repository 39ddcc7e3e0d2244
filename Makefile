# Set-up and checks. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# pip itself, upgraded in the venv (the interpreter's bundled pip can be old and have known advisories);
# one version for the venv and the image: the Dockerfile's ARG PIP_VERSION.
PIP_VERSION := $(shell sed -n 's/^ARG PIP_VERSION=\([^[:space:]]*\).*/\1/p' Dockerfile | head -n 1)
$(if $(PIP_VERSION),,$(error Dockerfile has no ARG PIP_VERSION=))

.PHONY: test lint install serve default-model baselines clean-venv

test: lint $(VENV)/bin/promtool
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff's configuration is in pyproject.toml; `$(PY) -m ruff format .` fixes what format --check reports.
lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Serves MODEL (default: the bundled default@prod) on 127.0.0.1:8000; settings from the environment.
serve: $(INSTALLED)
	$(PY) -m service

install: $(INSTALLED)

# Rebuilds the bundled default model from nothing (corpus from Debian's archive, tokenizer, training from
# scratch, evaluation) and publishes it as default@N, alias prod, into MODEL_STORE_ROOT (default models/).
# About 50 minutes on 2 CPU cores (bit-identical to the committed model); rerunning resumes an interrupted run. Needs apt-get (amd64).
default-model: $(INSTALLED)
	$(PY) -m model_store.default_model build

# promtool checks the /metrics output in the tests; from Debian's prometheus package when apt is there.
$(VENV)/bin/promtool: | $(PY)
	scripts/get-prometheus.sh $(VENV)/bin

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalls when the dependency list changes. torch is pinned in pyproject.toml; pip resolves that pin to
# the local CPU wheel on these machines.
$(INSTALLED): pyproject.toml Dockerfile | $(PY)
	$(PY) -m pip install --quiet 'pip==$(PIP_VERSION)'
	$(PY) -m pip install --quiet --editable '.[dev]'
	touch $(INSTALLED)

# The engine benchmark's baselines, once per machine, in build/ (not project dependencies): CTranslate2 in
# its own venv (bench/baselines-requirements.txt), llama.cpp built from PyPI's llama-cpp-python source
# (about 20 minutes on 2 cores; llama-server included). Then: bench/engine.py --ct2-python build/ct2venv/bin/python
# --llama-cpp build/llama-cpp, and bench/http_load.py --llama-cpp build/llama-cpp
baselines: $(INSTALLED)
	test -x build/ct2venv/bin/python || $(PYTHON) -m venv build/ct2venv
	build/ct2venv/bin/pip install --quiet -r bench/baselines-requirements.txt
	$(PY) bench/llama_cpp.py build

clean-venv:
	rm -rf $(VENV)
