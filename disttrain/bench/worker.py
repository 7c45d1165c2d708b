"""One measured run of one system on one rank: `mpiexec -n N python -m disttrain.bench.worker ...`.

The runner launches this; it is not meant to be run by hand. Each rank sets its BLAS threads, builds
the system, trains `warmup` steps, waits once at a barrier (outside the measured region), trains
`steps` measured steps, times raw collectives of the same size, and writes `<out>.rank<r>.json`:
per-step phase and collective timestamps, losses, peak RSS, optimizer-state bytes, threads and BLAS.
For the cnn workload it then trains BREAKDOWN_STEPS more steps with each convolution and pooling
call timed (`op_breakdown`): instrumented steps, kept apart from the measured ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import sys

import numpy as np

from . import SYSTEMS
from .recorder import StepRecorder
from .workload import Workload, local_batches

BREAKDOWN_STEPS = 10


def current_rss_bytes() -> int:
    """Resident set size now (VmRSS), in bytes; 0 where /proc is not available."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (getrusage ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def blas_info() -> list:
    """The thread pools loaded in this process (BLAS, OpenMP) as threadpoolctl sees them."""
    from threadpoolctl import threadpool_info
    keys = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "prefix")
    return [{key: pool.get(key) for key in keys} for pool in threadpool_info()]


def build(system, workload, rank, ranks, recorder, options):
    if system.module == "library":
        from . import library
        return library.make(system.variant, workload, rank, ranks, recorder, options)
    if system.module == "handwritten":
        from . import handwritten
        return handwritten.make(workload, rank, ranks, recorder, options)
    from . import torch_ddp
    return torch_ddp.make(system.variant, workload, rank, ranks, recorder, options)


def run(args) -> tuple:
    """Build and measure the system; returns (the system, this rank's result as a dict)."""
    rank = int(os.environ.get("PMI_RANK", "0"))
    ranks = int(os.environ.get("PMI_SIZE", "1"))
    if ranks != args.ranks:
        raise RuntimeError(f"launched as {ranks} ranks, the runner asked for {args.ranks}")
    system = SYSTEMS[args.system]
    workload = Workload.from_dict(json.loads(args.workload))
    options = {"threads": args.threads, "port": args.port, "bucket_mb": args.bucket_mb,
               "torch_fused_adam": args.torch_fused_adam, "timeout": args.timeout}

    from threadpoolctl import threadpool_limits
    limits = [threadpool_limits(limits=args.threads)]
    rss_start = current_rss_bytes()
    recorder = StepRecorder([])
    instance = build(system, workload, rank, ranks, recorder, options)
    limits.append(threadpool_limits(limits=args.threads))  # pools the system loaded (torch's OpenMP)
    rss_setup = current_rss_bytes()
    batches = local_batches(workload, rank, ranks)

    profiler = None
    losses = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            instance.barrier()  # line the ranks up once; the measured steps themselves have no barrier
            recorder.clear()
            if args.profile:
                import cProfile
                profiler = cProfile.Profile()
                profiler.enable()
        x, y = batches[i % len(batches)]
        recorder.start()
        loss = instance.step(x, y)
        recorder.end()
        losses.append(loss)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(f"{args.profile}.rank{rank}.prof")
    recorded = recorder.to_dict()
    recorder.steps = []  # the breakdown steps below record into a fresh list

    op_breakdown = []
    if workload.model == "cnn":
        for i in range(BREAKDOWN_STEPS):
            x, y = batches[i % len(batches)]
            recorder.start()
            op_breakdown.append(instance.breakdown_step(x, y))
            recorder.end()

    raw = instance.raw_collectives()
    return instance, {
        "system": system.name, "rank": rank, "ranks": ranks, "workload": workload.to_dict(),
        "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
        "blas": blas_info(), "recorder": recorded, "losses": losses, "op_breakdown": op_breakdown,
        "optimizer_state_bytes": instance.state_bytes(),
        "rss_start_bytes": rss_start, "rss_after_setup_bytes": rss_setup, "peak_rss_bytes": peak_rss_bytes(),
        "raw_collectives": raw, "describe": instance.describe(),
        "hostname": socket.gethostname(), "pid": os.getpid(), "python": platform.python_version(),
        "numpy": np.__version__, "profiled": bool(args.profile),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m disttrain.bench.worker",
                                     description="one measured run of one benchmark system (launched by the runner)")
    parser.add_argument("--system", required=True, choices=sorted(SYSTEMS))
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--workload", required=True, help="the Workload as JSON")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True, help="BLAS/OpenMP threads of this rank")
    parser.add_argument("--out", required=True, help="path prefix; this rank writes <out>.rank<r>.json")
    parser.add_argument("--port", type=int, default=0, help="TCP port of the torch process group")
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--torch-fused-adam", action="store_true")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--profile", default="", help="cProfile the measured steps into <profile>.rank<r>.prof")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    instance, result = run(args)
    path = f"{args.out}.rank{result['rank']}.json"
    with open(path + ".tmp", "w") as out:
        json.dump(result, out)
    os.replace(path + ".tmp", path)
    if hasattr(instance, "close"):  # after the result is safe: a teardown crash costs no measurement
        instance.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
