# Set-up and checks. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: test install clean-venv

test: $(INSTALLED)
	$(PY) -m pytest -q $(PYTEST_ARGS)

install: $(INSTALLED)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalls when the dependency list changes. torch is pinned in pyproject.toml; pip resolves that pin to
# the local CPU wheel on these machines.
$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --editable '.[dev]'
	touch $(INSTALLED)

clean-venv:
	rm -rf $(VENV)
