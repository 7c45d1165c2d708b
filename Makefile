# disttrain: `make run` trains the default example on 2 ranks; `make test` runs every test.
# Each target sets up what it needs on a fresh machine (only python3 with its venv module required).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# a hung multi-rank run is killed after this many seconds (hydra's MPIEXEC_TIMEOUT)
export MPIEXEC_TIMEOUT ?= 600
MPI_PYTEST := $(BIN)/mpiexec -n

.PHONY: install run test test-serial test-mpi bench bench-gpt bench-deps soak clean help

help:
	@echo "make run      train the default example (digits MLP) on 2 ranks"
	@echo "make test     the whole test suite (serial, then MPI at 2 and 3 ranks)"
	@echo "make bench    throughput/memory benchmark against hand-written numpy (and PyTorch if installed)"
	@echo "make bench-gpt  the byte-level GPT against PyTorch: speed, step-time breakdown, memory, loss curves"
	@echo "make bench-deps  install the CPU build of PyTorch for the benchmark's PyTorch columns"
	@echo "make soak     long fault-injection run (random SIGTERM/SIGKILL, resume, compare)"
	@echo "make install  create .venv with disttrain and its MPI, test extras"
	@echo "make clean    remove .venv, build files and runs/"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[mpich,test,fast,plot]'
	touch $(STAMP)

run: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/mpiexec -n 2 $(BIN)/disttrain train examples/digits_mlp.toml

test: test-serial test-mpi

test-serial: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q tests

# --only-mpi alone: with --with-mpi too, pytest-mpi 0.6 runs the serial tests on every rank as well
test-mpi: install
	PATH=$(abspath $(BIN)):$$PATH $(MPI_PYTEST) 2 $(BIN)/python -m pytest -q -p no:cacheprovider --only-mpi tests
	PATH=$(abspath $(BIN)):$$PATH $(MPI_PYTEST) 3 $(BIN)/python -m pytest -q -p no:cacheprovider --only-mpi tests

# options after ARGS=, e.g. make bench ARGS="--preset small" (disttrain bench --help lists them)
bench: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m disttrain.bench $(ARGS)

# options after ARGS=, e.g. make bench-gpt ARGS="--rounds 5" (python -m disttrain.bench.gpt --help lists them)
bench-gpt: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m disttrain.bench.gpt $(ARGS)

# PyTorch (CPU build) for the benchmark's DDP columns; the benchmark runs without it and says so
bench-deps: install
	$(BIN)/python -m pip install --quiet torch==2.13.0 || $(BIN)/python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu

# long fault-injection run: random SIGTERM/SIGKILL of random ranks, resume, compare (see scripts/soak.py)
soak: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/soak.py

clean:
	rm -rf $(VENV) build *.egg-info disttrain.egg-info .pytest_cache runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
