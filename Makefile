# rayseg: two commands set everything up.  `make demo` runs the main job, `make test` the suite.
# Each target creates .venv when it is missing.  torch==2.13.0 goes in first so that pip
# never pulls a CUDA build (a looser range downloads gigabytes of CUDA packages).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rayseg-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rayseg demo

# pytest exits 5 when it collects nothing: that is a failure here, never a silent pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/rayseg bench all

clean:
	rm -rf $(VENV) rayseg_work .pytest_cache
