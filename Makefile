# Set-up and checks. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: test install serve clean-venv

test: $(INSTALLED) $(VENV)/bin/promtool
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Serves MODEL (default: the bundled default@prod) on 127.0.0.1:8000; settings from the environment.
serve: $(INSTALLED)
	$(PY) -m service

install: $(INSTALLED)

# promtool checks the /metrics output in the tests; from Debian's prometheus package when apt is there.
$(VENV)/bin/promtool: | $(PY)
	scripts/get-prometheus.sh $(VENV)/bin

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalls when the dependency list changes. torch is pinned in pyproject.toml; pip resolves that pin to
# the local CPU wheel on these machines.
$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --editable '.[dev]'
	touch $(INSTALLED)

clean-venv:
	rm -rf $(VENV)
