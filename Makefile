# The two commands of the README: `make run` and `make test`. Both create .venv when it
# is missing. torch is installed first and pinned to the CPU wheel: any looser spec would
# pull a multi-GB CUDA build.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cnnflow-installed
TORCH := torch==2.13.0

.PHONY: run test lint bench mlflow-ui clean

# pip's output goes to $(VENV)/install.log; on a failure its last lines are shown.
PIP = $(PY) -m pip install --quiet --disable-pip-version-check
INSTALL_LOG := $(VENV)/install.log

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV) (torch 2.13.0 CPU, then cnnflow[dev]; log: $(INSTALL_LOG))"; $(PYTHON) -m venv $(VENV); }
	@{ $(PIP) --upgrade pip && $(PIP) $(TORCH) && $(PIP) -e '.[dev]'; } > $(INSTALL_LOG) 2>&1 \
	  || { tail -n 30 $(INSTALL_LOG); echo "pip failed: see $(INSTALL_LOG)"; exit 1; }
	@touch $(STAMP)

## run: the whole pipeline with kfp.local on params.yaml (digits, 2 training processes)
run: $(STAMP)
	@$(VENV)/bin/cnnflow pipeline run

## test: the whole suite (unit, distributed, pipeline), in 2 worker processes (a test
## file stays on one worker: its module fixtures are built once); the slowest are listed
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench components pipelines

## bench: every benchmark in bench/, each printing ratios against its baseline
bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

## mlflow-ui: a real MLflow server on 127.0.0.1:5000 over the local store (Ctrl-C stops it)
mlflow-ui: $(STAMP)
	$(VENV)/bin/cnnflow mlflow-server

clean:
	rm -rf data/prepared data/shards outputs reports runs
