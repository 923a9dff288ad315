# rayseg: two commands set everything up.  `make demo` runs the main job, `make test` the suite.
# Each target creates .venv when it is missing.  torch==2.13.0 goes in first so that pip
# never pulls a CUDA build (a looser range downloads gigabytes of CUDA packages).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rayseg-installed

.PHONY: demo test test-fast bench install clean gpu-check gpu-check-data

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rayseg demo

# pytest exits 5 when it collects nothing: that is a failure here, never a silent pass.  The
# 15 slowest durations close the run, so that the time each test costs stays in view.
# TEST_WORKERS=2: two pytest processes (pytest-xdist) share the modules, each with its own Ray
# and S3 server; a module stays on one worker (its fixtures are built once), in the order
# collected, so `rayseg bench all --quick` (tests/jobs) starts early: 13.5-14.5 minutes here
# instead of 18.  The default stays one process: under the other worker's load a time-budget
# test's pace fell 20-fold after the schedule's last refit and the deadline cut it off before
# the learning-rate floor (1 run in 4; the schedule holds after its midpoint refit).
TEST_WORKERS ?= 0
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadscope \
	  --no-loadscope-reorder tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The inner loop: everything that needs no Ray, no multi-node cluster, no browser and is not
# slow (seg_core, configs, records, storage, CLI parsing, ...), in about a minute.  A test of
# this tier that starts Ray anyway fails the run (tests/conftest.py).
FAST := not ray and not cluster and not browser and not slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --durations=5 -m "$(FAST)" tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/rayseg bench all

# The GPU path of seg_core (train step, Segmenter, checkpoints) on one device, with no Ray and no
# network: it runs on a lent GPU machine that has torch alone.  GPU_CHECK_CPU=1 rehearses it on
# the CPU with tiny sizes (make test does).  Writes gpu_check.json and gpu_check.md under $$OUT
# (else rayseg_work/gpu_check/).  No install step: the machine may have no network.
GPU_CHECK_PY := $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)

gpu-check:
	$(GPU_CHECK_PY) -m benchmarks.gpu_check

# Copies the ISBI 2012 slices into .gpu_check_data/ (ignored by git) so that a device call can
# carry them: ../shared does not travel.  The licence is non-commercial: never commit them.
gpu-check-data:
	mkdir -p .gpu_check_data
	cp -r ../shared/data/isbi2012_em_membrane .gpu_check_data/

clean:
	rm -rf $(VENV) rayseg_work .pytest_cache
