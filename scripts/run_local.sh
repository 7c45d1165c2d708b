#!/usr/bin/env bash
# Train on this machine with N MPI ranks, using the venv's MPICH:
#
#     scripts/run_local.sh N CONFIG.toml [extra `disttrain train` arguments, e.g. --set training.epochs=5]
#
# Runs `mpiexec -n N disttrain train CONFIG args...` in place of this shell (exec), so Ctrl-C, SIGTERM and
# SIGUSR1 reach mpiexec, which passes them on to every rank: the trainer checkpoints and exits 0 (130 after
# Ctrl-C), and the same command with --resume continues. A second Ctrl-C ends the run at once, unsaved.
# Environment knobs:
#   DISTTRAIN_VENV     the venv with disttrain + mpi4py + mpich   (default: the repository's .venv)
#   DISTTRAIN_PROGRAM  the command to launch                      (default: $DISTTRAIN_VENV/bin/disttrain)
#   MPIEXEC_TIMEOUT    hydra kills the whole run after this many seconds (default 86400: one day), so a
#                      forgotten hung run cannot hold the machine forever
set -euo pipefail

if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/run_local.sh N CONFIG.toml [disttrain train arguments...]   (N: number of ranks)" >&2
    exit 2
fi
ranks=$1
config=$2
shift 2

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DISTTRAIN_VENV:-$repo/.venv}
if [ ! -x "$venv/bin/mpiexec" ]; then
    echo "run_local.sh: no venv with mpiexec at $venv (run 'make install', or set DISTTRAIN_VENV)" >&2
    exit 2
fi
export PATH="$venv/bin:$PATH"  # hydra looks up hydra_pmi_proxy on PATH
export MPIEXEC_TIMEOUT=${MPIEXEC_TIMEOUT:-86400}
program=("$venv/bin/disttrain")
[ -n "${DISTTRAIN_PROGRAM:-}" ] && read -r -a program <<< "$DISTTRAIN_PROGRAM"  # a command line, split on spaces

exec "$venv/bin/mpiexec" -n "$ranks" "${program[@]}" train "$config" "$@"
