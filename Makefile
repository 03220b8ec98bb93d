# Two commands for a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test check bench lint clean dist test-oldest

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

## dist: the sdist and the wheel, in dist/ (install the wheel with pip; see docs/install.md)
dist: $(STAMP)
	$(PY) -m build --outdir dist .

## test-oldest: the tests that exercise the dependencies, on the oldest Python with the oldest tested
## releases (constraints/oldest.txt: the floors of pyproject.toml)
OLDEST_PYTHON ?= python3.10
OLDEST_TESTS  ?= tests/test_config.py tests/test_core.py tests/test_journald.py tests/test_notify.py \
	tests/test_sense.py tests/test_gpu_sense.py tests/test_client.py tests/test_control.py tests/test_paths.py \
	tests/test_daemon.py tests/test_children.py
test-oldest:
	rm -rf .venv-oldest
	$(OLDEST_PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet --upgrade pip
	.venv-oldest/bin/python -m pip install --quiet -c constraints/oldest.txt -e '.[test]'
	.venv-oldest/bin/python -m pytest -p no:cacheprovider $(OLDEST_TESTS)

clean:
	rm -rf $(VENV) .venv-oldest build dist *.egg-info src/*.egg-info .pytest_cache .hypothesis
