# The two commands of the README: `make demo` (train the tiny model on the built-in task,
# then talk to it) and `make test`. Both create the virtual environment they need.

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; point TORCH at another build (e.g. a CUDA wheel) on a GPU machine.
TORCH ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: demo lint test clean

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	# CUTLASS/CuTe headers for compiling csrc/ (docs/cuda.md); --no-deps: only the headers are
	# used, not the wheel's Python generator (which would pull scipy, networkx, cuda-python)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps 'nvidia-cutlass>=4.2'
	touch $@

demo: $(VENV)/.base
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/hrm train --preset tiny --out $(DEMO_OUT)
	$(VENV)/bin/hrm generate $(DEMO_OUT) --ema --prompt "12+345" --prompt "907+88" --prompt "5+5"

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# One worker per core (-n auto), every test file on one worker (--dist loadfile: a file's
# module fixtures run once); most tests wait on a subprocess or a compiler, so one process
# leaves a core idle.
test: lint
	$(PY) -m pytest -q -n auto --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
