# Lifelong: `make run` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/default.toml

.PHONY: run test bench results install clean lint stack stack-down stack-status docker-lint

run: $(STAMP)  ## set up, then run the default pipeline (naive vs replay vs joint on Split-Digits)
	$(BIN)/lifelong run $(CONFIG)

# Two workers (pytest-xdist): the integration tests spend much of their time waiting on servers
# and subprocesses, so two of them share 2 cores well. Each test file runs whole on one worker
# (--dist loadfile): its module fixtures are built once and its tests keep their order. Tests in
# different files may run at the same time, so none may assume the machine to itself (a test's
# process checks look at its own processes only; each Ray simulation starts its own Ray).
# Files go out in the order tests/conftest.py puts them, the heaviest first, so the two workers
# finish together (xdist's own order, files with the most tests first, left the few long
# deployment and training files for last, with one worker idle while the other ran them).
# The slowest tests are listed at the end of every run (--durations), to see where the time goes.
PYTEST_WORKERS ?= 2

test: $(STAMP)  ## set up, then run the whole test suite
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 $(PYTEST_ARGS)

bench: $(STAMP)  ## benchmarks: ratios measured side by side in one run
	$(BIN)/python -m bench

# docs/results.md's tables, one sweep each (each writes its own section), 5 seeds, in the page's order.
# About 2 h 25 min on 2 cores; a sweep stopped midway resumes cell by cell from what MLflow holds.
RESULTS := split_digits28_rehearsal_free federated_clock_modes split_digits_pretrained permuted_digits \
           rotated_digits split_digits_scratch multitask_recon multitask_all gcond_continual federated_dp_noise

results: $(STAMP)  ## regenerate every table of docs/results.md under the protocol
	for s in $(RESULTS); do $(BIN)/lifelong sweep configs/sweeps/$$s.toml --seeds 5 || exit 1; done

install: $(STAMP)

# Reinstall whenever pyproject.toml changes. torch/torchvision are pinned in pyproject.toml;
# pip takes those exact builds from this machine's disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .lifelong mlruns.db mlartifacts .pytest_cache

STACK_ARGS ?=

stack: $(STAMP)  ## the whole stack natively on loopback, detached (MLflow, Prefect server + worker, SuperLink + 2 SuperNodes)
	$(BIN)/python -m lifelong.cli.stack up --detach $(STACK_ARGS)

stack-down: $(STAMP)  ## stop what `make stack` started, and everything it started
	$(BIN)/python -m lifelong.cli.stack down

stack-status: $(STAMP)
	$(BIN)/python -m lifelong.cli.stack status

docker-lint: $(STAMP)  ## static checks of docker/: hadolint, compose schema, our rules (no Docker engine needed)
	$(BIN)/python -m pytest -q tests/docker
