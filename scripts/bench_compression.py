"""Micro-benchmark of gradient compression on one host: the 16-bit encode/decode per element, and one
bucket's combination across ranks for each compression mode against exact float32.

    mpiexec -n 2 .venv/bin/python scripts/bench_compression.py [--rounds 7] [--layer 1024]

The bucket is the gradient of an MLP 784-L-L-10 (L = --layer; 1024 gives 1.86 M floats, 7.5 MB) as
one bucket. Systems run in interleaved rounds; each figure is the median over rounds of the slowest
rank's time. "wire MB" is what one rank sends for the bucket (payload only), from the buffer sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from disttrain.distributed import FlatLayout, half, init
from disttrain.distributed.compression import make_compressor
from disttrain.threads import apply_threads, choose_threads


def mlp_layout(layer: int, size: int) -> FlatLayout:
    shapes = [("w1", (layer, 784)), ("b1", (layer,)), ("w2", (layer, layer)), ("b2", (layer,)),
              ("w3", (10, layer)), ("b3", (10,))]
    return FlatLayout(shapes, size, 1 << 30)  # one bucket


def codec_timings(n: int, rounds: int) -> list:
    """(what, ns per element) for encode/decode of n float32 values, this process only."""
    x = (np.random.default_rng(0).standard_normal(n) * 1e-3).astype(np.float32)
    bits, back = np.empty(n, np.uint16), np.empty(n, np.float32)
    cases = [("bf16 encode", lambda: half.encode(x, bits, "bf16")),
             ("bf16 decode+add", lambda: half.decode(bits, back, "bf16", 0, True)),
             ("fp16 exponent", lambda: half.fp16_exponent(x)),
             ("fp16 encode", lambda: half.encode(x, bits, "fp16", 5)),
             ("fp16 decode+add", lambda: half.decode(bits, back, "fp16", 5, True)),
             ("float32 copy (reference)", lambda: np.copyto(back, x))]
    results = []
    for what, work in cases:
        work()
        best = min(_timed(work) for _ in range(rounds))
        results.append((what, best / n * 1e9))
    return results


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def bucket_systems(comm, layout, rank: int) -> dict:
    """{name: (combine(flat_grads), wire bytes per rank)} for every mode and strategy."""
    bucket_comm = comm.dup()
    n, size = layout.padded_total, comm.size
    share = (size - 1) / size
    systems = {"exact reduce_scatter": (lambda g: bucket_comm.reduce_scatter(g), 4 * n * share),
               "exact allreduce": (lambda g: bucket_comm.allreduce(g), 8 * n * share)}
    for method in ("bf16", "fp16", "powersgd"):
        compressor = make_compressor(method, layout, rank)
        for scatter in (True, False):
            strategy = "reduce_scatter" if scatter else "allreduce"
            if method == "powersgd":
                p = compressor.buckets[0].packed.size + compressor.buckets[0].packed_q.size
                wire = 8 * p * share  # two allreduces of the packed factors
            else:
                wire = 2 * n * share * (1 if scatter else 2)
            systems[f"{method} {strategy}"] = (
                lambda g, c=compressor, s=scatter: c.combine(bucket_comm, g, 0, s), wire)
    return systems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layer", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=4, help="PowerSGD rank")
    args = parser.parse_args()
    comm = init()
    apply_threads(choose_threads(comm.node_topology()["local_size"])[0])  # as the Trainer does: no oversubscription
    layout = mlp_layout(args.layer, comm.size)
    comm.print(f"bucket: {layout.padded_total:,} floats ({layout.padded_total * 4 / 2**20:.1f} MiB), "
               f"{comm.size} ranks, 16-bit kernels: {half.backend()}")
    for what, ns in codec_timings(layout.padded_total, args.rounds):
        comm.print(f"  {what:26s} {ns:6.2f} ns/element")
    source = np.random.default_rng(comm.rank).standard_normal(layout.padded_total).astype(np.float32) * 1e-3
    flat = np.empty_like(source)
    systems = bucket_systems(comm, layout, args.rank)
    times = {name: [] for name in systems}
    for _ in range(args.rounds + 1):  # the first round warms up (numba, MPI buffers) and is dropped
        for name, (combine, _) in systems.items():
            np.copyto(flat, source)
            comm.barrier()
            elapsed = np.array([_timed(lambda: combine(flat))])
            times[name].append(comm.allreduce(elapsed, "max")[0])
    exact = statistics.median(times["exact reduce_scatter"][1:])
    comm.print(f"{'system':28s} {'median ms':>10s} {'vs exact RS':>12s} {'wire MB':>9s}")
    for name, (_, wire) in systems.items():
        median = statistics.median(times[name][1:])
        comm.print(f"{name:28s} {median * 1e3:10.2f} {median / exact:11.2f}x {wire / 1e6:9.2f}")


if __name__ == "__main__":
    main()
