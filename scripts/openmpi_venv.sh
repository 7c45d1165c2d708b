#!/usr/bin/env bash
# Make a venv whose mpi4py is built against the system's Open MPI (Debian's openmpi-bin, 4.1), for the
# Open MPI tests (`make test-openmpi`):
#
#     scripts/openmpi_venv.sh [VENV]          (default .venv-openmpi; run from the repository)
#
# Installs openmpi-bin and libopenmpi-dev with apt-get when mpirun.openmpi or mpicc.openmpi is missing
# (needs root), creates VENV, builds mpi4py from source with Open MPI's compiler wrapper
# (`pip install --no-binary mpi4py mpi4py`, ~3.5 min of CPU the first time; pip keeps the built wheel
# in its cache), and installs disttrain editable with its test extras. Each step is skipped when
# already done, so a second run takes seconds.
set -euo pipefail
venv=${1:-.venv-openmpi}
python=${PYTHON:-python3}

if ! command -v mpirun.openmpi >/dev/null || ! command -v mpicc.openmpi >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "openmpi_venv.sh: Open MPI is not installed, and installing it needs root and apt-get" >&2
        exit 1
    fi
    install=(apt-get -o DPkg::Lock::Timeout=120 install -y -q --no-install-recommends openmpi-bin libopenmpi-dev)
    DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null; }
fi

test -x "$venv/bin/python" || "$python" -m venv "$venv"
if ! "$venv/bin/python" -c "from mpi4py import MPI; assert 'Open MPI' in MPI.Get_library_version()" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # the venv must not find MPICH's wrapper first (the main venv's bin/ may be on PATH)
    MPICC=$(command -v mpicc.openmpi) "$venv/bin/python" -m pip install --quiet --no-binary mpi4py mpi4py
fi
"$venv/bin/python" -m pip install --quiet -e '.[test]'
"$venv/bin/python" -c "from mpi4py import MPI; print('openmpi_venv.sh:', MPI.Get_library_version().splitlines()[0])"
