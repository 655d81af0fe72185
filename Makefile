# The two commands of the README. Each makes (or reuses) .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; on a GPU machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,sky,hf,tensorboard,wandb]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/elastic-train chaos run chaos/scenarios/demo.yaml --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q
