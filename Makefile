# The two commands of the README. Each makes (or reuses) .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch from PyPI: on Linux x86-64 that is a CUDA build (runs on CPU too, ~3 GB of wheels).
# A CPU-only machine can take the small CPU build: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml examples/spiral/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test,sky,hf,parquet,tensorboard,wandb]'
	# The example user project, installed as a user would: its chaos tests run with the rest.
	$(PY) -m pip install -q --no-deps -e examples/spiral
	touch $@

demo: $(STAMP)
	$(VENV)/bin/elastic-train chaos run chaos/scenarios/demo.yaml --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q
