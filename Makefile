# disttrain: `make run` trains the default example on 2 ranks; `make test` runs every test.
# Each target sets up what it needs on a fresh machine (only python3 with its venv module required).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# a hung multi-rank run is killed after this many seconds (hydra's MPIEXEC_TIMEOUT)
export MPIEXEC_TIMEOUT ?= 600
MPI_PYTEST := $(BIN)/mpiexec -n

.PHONY: install run test test-serial test-mpi test-openmpi bench bench-gpt bench-deps bench-multihost soak clean help

help:
	@echo "make run      train the default example (digits MLP, bundled in the package) on 2 ranks"
	@echo "make test     the whole test suite (serial, then MPI at 2 and 3 ranks)"
	@echo "make test-openmpi  the MPI tests and launcher tests under Debian's Open MPI (apt, own venv)"
	@echo "make bench    throughput/memory benchmark against hand-written numpy (and PyTorch if installed)"
	@echo "make bench-gpt  the byte-level GPT against PyTorch: speed, step-time breakdown, memory, loss curves"
	@echo "make bench-deps  install the CPU build of PyTorch for the benchmark's PyTorch columns"
	@echo "make bench-multihost  disttrain vs PyTorch DDP across 2 fake hosts with 1 Gbit/s links (root)"
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
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/mpiexec -n 2 $(BIN)/disttrain train

test: test-serial test-mpi

# tests/test_openmpi.py runs in test-openmpi, with the Python built for it
test-serial: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q tests --ignore=tests/test_openmpi.py

# --only-mpi alone: with --with-mpi too, pytest-mpi 0.6 runs the serial tests on every rank as well
test-mpi: install
	PATH=$(abspath $(BIN)):$$PATH $(MPI_PYTEST) 2 $(BIN)/python -m pytest -q -p no:cacheprovider --only-mpi tests
	PATH=$(abspath $(BIN)):$$PATH $(MPI_PYTEST) 3 $(BIN)/python -m pytest -q -p no:cacheprovider --only-mpi tests

# Open MPI 4.1 from Debian, mpi4py built against it in $(OPENMPI_VENV) (scripts/openmpi_venv.sh): the MPI
# tests at 2 ranks under its mpirun, then what mpirun does with failing, dead and stopped ranks and signals
OPENMPI_VENV := .venv-openmpi
OPENMPI_MPIRUN := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
	timeout -k 10 900 mpirun.openmpi --oversubscribe --timeout 800
test-openmpi: install
	scripts/openmpi_venv.sh $(OPENMPI_VENV)
	$(OPENMPI_MPIRUN) -n 2 $(OPENMPI_VENV)/bin/python -m pytest -q -p no:cacheprovider --only-mpi tests
	DISTTRAIN_OPENMPI_PYTHON=$(abspath $(OPENMPI_VENV))/bin/python PATH=$(abspath $(BIN)):$$PATH \
		$(BIN)/python -m pytest -q tests/test_openmpi.py

# options after ARGS=, e.g. make bench ARGS="--preset small" (disttrain bench --help lists them)
bench: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m disttrain.bench $(ARGS)

# options after ARGS=, e.g. make bench-gpt ARGS="--rounds 5" (python -m disttrain.bench.gpt --help lists them)
bench-gpt: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m disttrain.bench.gpt $(ARGS)

# PyTorch (CPU build) for the benchmark's DDP columns; the benchmark runs without it and says so
bench-deps: install
	$(BIN)/python -m pip install --quiet torch==2.13.0 || $(BIN)/python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu

# disttrain against PyTorch DDP (and each one's compression) across fake hosts whose links tc shapes to
# 1 Gbit/s (scripts/bench_multihost/run.py --help lists the options, e.g. ARGS="--rates 1gbit,10gbit").
# Needs root (network namespaces): the first line says why not, and the target fails, where it cannot run.
# Without PyTorch (no wheel reachable) the disttrain systems run alone and the results say so.
bench-multihost: install
	$(BIN)/python scripts/bench_multihost/run.py --check
	$(MAKE) --no-print-directory bench-deps || echo "bench-multihost: PyTorch could not be installed; its systems are left out"
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/bench_multihost/run.py $(ARGS)

# long fault-injection run: random SIGTERM/SIGKILL of random ranks, resume, compare (see scripts/soak.py)
soak: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/soak.py

clean:
	rm -rf $(VENV) $(OPENMPI_VENV) build *.egg-info disttrain.egg-info .pytest_cache runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
