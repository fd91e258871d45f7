# Two commands do everything on a fresh clone:  make demo  |  make test
# Both create or refresh .venv first (re-installed only when pyproject.toml changes). pip compiles
# the bytecode at install: these machines set PYTHONDONTWRITEBYTECODE=1, so with --no-compile every
# process (each Ray worker, each job) compiled torch, ray and mlflow from source on import (measured
# 2026-12-02: venv 101 s -> 68 s, but the suite's chaos+unit shard 13 -> 26 min).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
# The torch build these machines carry locally; pinned here so pip never fetches another.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test test-unit lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,ncnn]" $(TORCH_PINS)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The whole pipeline on the embedded default: local Ray, sqlite:///mlflow.db, demo data in ./data/demo.
demo: venv
	$(PY) -m mlc_ray.demo_pipeline

# Two shards side by side (tests/run_shards.py); MLC_RAY_TEST_SHARDS=1 runs one serial pytest.
test: venv
	$(PY) -m tests.run_shards $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
