# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# torch goes in first, chosen for this machine: a bare `pip install torch` (or any package
# that depends on it) pulls a 5 GB CUDA build, useless where there is no GPU.
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH_INSTALL = $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" \
	|| $(BIN)/pip install -q "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu
else
TORCH_INSTALL = $(BIN)/pip install -q "torch==$(TORCH_VERSION)"
endif

LOCK := requirements/lock-cpu.txt

.PHONY: setup demo test test-fast lint format clean lock

setup: $(VENV)/.installed

# Every package at the version CI tested: the lock is a constraints file, so pip installs
# exactly those versions (and fails loudly if they cannot be had) instead of the newest ones.
$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || { $(TORCH_INSTALL); }
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

# Upgrade: the newest versions pyproject.toml allows (torch stays at TORCH_VERSION), then
# write them to the lock. Run `make test` afterwards and commit both files together.
lock: setup
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-pin.txt
	$(BIN)/pip install -q --upgrade -c $(VENV)/torch-pin.txt -e ".[dev]"
	{ echo "# The exact versions CI tested (Python 3.11, CPU). \`make setup\` installs with these as constraints;"; \
	  echo "# \`make lock\` regenerates this file from the virtualenv (see README: upgrading)."; \
	  $(BIN)/pip freeze --exclude-editable | sed -E 's/\+cpu$$//'; } > $(LOCK)

# The main job on the built-in default: no data, no GPU. The whole chain (pretrain -> SFT ->
# reward -> DPO, PPO; classification), 2 processes per stage, ZeRO-2; runs/demo-chain/report.md.
# Pretraining alone: $(BIN)/python -m launcher pretrain configs/pretrain/demo.yaml --nproc 2
demo: setup
	$(BIN)/python -m launcher pipeline configs/pipeline/demo.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything CI runs: lint, then every test (slow and multi-process ones included), in two
# passes. In-process and one-process tests on 2 pytest-xdist workers, one core each (a test
# module stays on one worker, so its fixtures are built once; modules in collection order, where
# tests/conftest.py puts the long fixture chains first); then, one at a time, the
# multi-process runs (2 ranks already take both cores, and their signals and kills are
# timed) and the tests with a wall-clock limit. The second pass runs even when the first
# failed, so that one run reports every failure; make fails if either did. Both passes share
# one KILN_TEST_SHARED directory (removed after): the fixtures that both need (the pretrained
# parent, the genre classifier) are built once, not once per worker and pass (tests/shared_dirs.py).
test: lint
	shared=$$(mktemp -d -t kiln-test-shared.XXXXXX); trap 'rm -rf "$$shared"' EXIT; \
	export KILN_TEST_SHARED="$$shared"; status=0; \
	$(BIN)/python -m pytest -m "not distributed and not serial" -n 2 --dist loadfile --no-loadscope-reorder || status=1; \
	$(BIN)/python -m pytest -m "distributed or serial" || status=1; \
	exit $$status

# Unit tests only, for the edit-run loop.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not distributed"

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs data .pytest_cache .ruff_cache *.egg-info
