# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv if missing, install, run the demo on ml-100k
#   make test   create .venv if missing, install, check the import layers and lint, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.recbole-diff-installed
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so that nothing later makes pip pick another torch (on the development machine pip serves
# the CPU wheel; elsewhere install it from https://download.pytorch.org/whl/cpu first: docs/install.md).
$(STAMP): setup.py | $(BIN)/python
	$(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[tune,test]"
	$(BIN)/python -m recbole_diff.cli doctor
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python run_recbole_diff.py

test: install
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
