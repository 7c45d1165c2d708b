"""A stand-in for `disttrain train` with the same command line and outputs, for the batch-script tests.

    slurm_standin.py train CONFIG.toml [--set section.key=value ...] [--resume]

Contract (the subset of the real CLI's that the scripts rely on):
- reads `[training] run_dir` and `[training] max_steps` from CONFIG (overridable with --set);
- every rank joins MPI_COMM_WORLD (so a wrong launcher shows up as world size 1);
- rank 0 appends one JSON object per step to RUN_DIR/metrics.jsonl (step, world_size, slurm_ntasks) and
  writes RUN_DIR/checkpoints/step-XXXXXXXX/state.json plus the RUN_DIR/checkpoints/latest pointer at the
  end; with --resume it starts after the step named by `latest`, if there is one;
- on SIGTERM or SIGUSR1 (on any rank: the decision is agreed collectively after each step) it writes a
  checkpoint, prints how to resume and exits 0;
- `[training] step_seconds` (stand-in only) sleeps after each step, so a test can signal it mid-run.
"""

import json
import os
import signal
import sys
import time

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from mpi4py import MPI


def parse(argv):
    if len(argv) < 2 or argv[0] != "train":
        sys.exit("usage: slurm_standin.py train CONFIG.toml [--set section.key=value ...] [--resume]")
    with open(argv[1], "rb") as handle:
        config = tomllib.load(handle)
    training = {"run_dir": "runs/standin", "max_steps": 5, "step_seconds": 0.0, **config.get("training", {})}
    resume, rest = False, argv[2:]
    while rest:
        flag = rest.pop(0)
        if flag == "--resume":
            resume = True
        elif flag == "--set" and rest:
            name, value = rest.pop(0).split("=", 1)
            section, key = name.split(".", 1)
            if section != "training":
                sys.exit(f"stand-in: only training.* can be set, got {name}")
            training[key] = tomllib.loads(f"v = {value}")["v"] if key != "run_dir" else value
        else:
            sys.exit(f"stand-in: unexpected argument {flag!r}")
    return training, resume


def save(run_dir, step, world):
    step_dir = os.path.join(run_dir, "checkpoints", f"step-{step:08d}")
    os.makedirs(step_dir, exist_ok=True)
    with open(os.path.join(step_dir, "state.json"), "w") as handle:
        json.dump({"step": step, "world_size": world}, handle)
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    with open(pointer + ".tmp", "w") as handle:
        handle.write(f"step-{step:08d}\n")
    os.replace(pointer + ".tmp", pointer)


def main():
    training, resume = parse(sys.argv[1:])
    comm = MPI.COMM_WORLD
    run_dir, signalled = training["run_dir"], []
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda number, frame: signalled.append(number))
    step = 0
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    if resume and os.path.exists(pointer):
        with open(pointer) as handle:
            step = int(handle.read().strip().split("-")[1])
    if comm.rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        print(f"stand-in: world size {comm.size}, starting at step {step}", flush=True)
    while step < training["max_steps"]:
        step += 1
        total = comm.allreduce(step, op=MPI.SUM)
        if comm.rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as metrics:
                metrics.write(json.dumps({"step": step, "loss": 1.0 / step, "allreduce": total,
                                          "world_size": comm.size, "pid": os.getpid(),
                                          "slurm_ntasks": os.environ.get("SLURM_NTASKS"),
                                          "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}) + "\n")
        time.sleep(training["step_seconds"])
        if comm.allreduce(len(signalled), op=MPI.SUM):
            received = comm.gather(sorted({signal.Signals(number).name for number in signalled}))
            if comm.rank == 0:
                save(run_dir, step, comm.size)
                print(f"stand-in: signals by rank {received}; saved step {step}; resume with --resume",
                      flush=True)
            return 0
    if comm.rank == 0:
        save(run_dir, step, comm.size)
        print(f"stand-in: finished at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
