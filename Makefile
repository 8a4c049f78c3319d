# Two commands: `make demo` runs the main job, `make test` runs the test suite.
# Each builds .venv on first use (CPU torch 2.13.0 first, so no CUDA build is pulled in).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-kernels lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[hf,text,dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/maskkit demo

# Two pytest-xdist workers with one torch thread each (tests/conftest.py): on 2 cores 1.35x faster than one
# process with two threads (2026-12-03: 378 s against 509 s), since much of the suite spawns processes and waits.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2

# The suite under both of x86-64's CPU kernel sets: float results differ in their last bits between them
# (and between processors), and every tolerance in the tests must hold under both.
test-kernels: $(BIN)/.installed
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -n 2
	ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q -n 2

lint: $(BIN)/.installed
	$(BIN)/ruff check maskkit tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/mae_throughput.py

clean:
	rm -rf $(VENV) runs
