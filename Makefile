# Two commands for a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test check bench lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: the daemon in the foreground on the demo config (no root, no systemd, no GPU needed)
run: $(STAMP)
	$(VENV)/bin/memguard daemon --config config/demo/memguard.yaml

## test: everything the tests need, then the whole suite
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

## check: validate the demo and example configs
check: $(STAMP)
	$(VENV)/bin/memguard check config/demo/memguard.yaml
	$(VENV)/bin/memguard check --no-host-checks config/memguard.yaml

## bench: the reaction-speed benchmark (root; runs inside a memory-limited cgroup it creates)
bench: $(STAMP)
	$(PY) bench/reaction.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis
