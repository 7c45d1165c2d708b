"""Train an MLP on synthetic data for a few steps and report its median step-time breakdown; run under
mpiexec (e.g. on fake hosts).

    mpiexec -n 2 python scripts/scaling/train_steps.py --hidden 1024,1024 --steps 30 --run-dir RUN

The workload is the benchmark's: 784 -> hidden... -> 10, ReLU, softmax cross-entropy, float32, global
batch 512, Adam, ZeRO-1 with reduce-scatter (optimizer.sharded, the default), one BLAS thread per rank,
gradient communication not overlapped with backward (so that compute_s is forward + backward alone).
It goes through disttrain's own Trainer (the loop `disttrain train` runs) with the communicator chosen
here: the world's (flat) or, with --hierarchical, HierarchicalComm around it. Rank 0 prints one JSON
line: medians over the steps after --warmup of step_s, compute_s (forward + backward), comm_s (gradient
reduce-scatter + the step's small stats allreduce + parameter allgather) and optimizer_s, as the
trainer logs them in metrics.jsonl (rank 0's), the slowest rank's compute_s and the least comm_s over
ranks per step (medians), and the flat layout (parameters, padded elements, bucket sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from disttrain import config as config_module  # noqa: E402
from disttrain.training import build_run  # noqa: E402
from disttrain.distributed import init  # noqa: E402
from disttrain.distributed.hierarchical import HierarchicalComm  # noqa: E402
from disttrain.trainer import Trainer  # noqa: E402

FIELDS = ("step_s", "compute_s", "comm_s", "optimizer_s")


class RecordingTrainer(Trainer):
    """The Trainer, also keeping every rank's (step_s, compute_s, comm_s, optimizer_s) per step (metrics.jsonl
    has rank 0's only): with one clock for all fake hosts, the ranks' figures can be compared."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def after_step(self, record: dict) -> None:
        self.records.append(tuple(record[field] for field in FIELDS))
        super().after_step(record)


def main(argv=None) -> int:
    """Parse arguments, train, print the summary on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", default="1024,1024", help="hidden widths, comma-separated")
    parser.add_argument("--batch", type=int, default=512, help="global batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    parser.add_argument("--hierarchical", action="store_true", help="synchronise through HierarchicalComm")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)

    world = init()
    comm = HierarchicalComm(world) if args.hierarchical else world
    config = config_module.validate({
        "model": {"name": "mlp", "hidden": [int(width) for width in args.hidden.split(",")]},
        "data": {"name": "synthetic", "samples": args.batch * (args.steps + 1), "features": 784, "classes": 10,
                 "test_fraction": 1 / (args.steps + 1)},
        # overlap off: the model needs forward+backward apart from the gradient collectives (with overlap
        # they would run inside backward); fit_model.predict_step adds the overlap on top of these parts
        "optimizer": {"name": "adam", "lr": 1e-3, "sharded": True, "strategy": "reduce_scatter", "overlap": False},
        "training": {"epochs": 1, "max_steps": args.steps, "batch_size": args.batch, "log_every": 1,
                     "threads": args.threads, "progress": "none", "run_dir": args.run_dir},
        "checkpoint": {"every_steps": 0, "every_epochs": 0},
    })
    config_module.check_consistency(config)
    model, train, _, loss_fn, info = build_run(config, world)
    trainer = RecordingTrainer(model, train, loss_fn, None, comm, config["optimizer"], config["training"],
                               config["checkpoint"], config=config, task=info["task"])
    trainer.fit()
    per_rank = world.allgather_object(trainer.records[args.warmup:])
    if world.rank == 0:
        with open(os.path.join(args.run_dir, "metrics.jsonl")) as handle:
            records = [r for r in map(json.loads, handle) if r["kind"] == "train"][args.warmup:]
        steps = list(zip(*per_rank))  # steps[i][r]: rank r's (step_s, compute_s, comm_s, optimizer_s) at step i
        layout = trainer.ddp.layout
        summary = {"world_size": world.size, "nodes": trainer.topology["nodes"],
                   "ranks_per_node": trainer.topology["local_size"], "hierarchical": args.hierarchical, "overlap": False,
                   "hidden": config["model"]["hidden"], "batch": args.batch, "steps_measured": len(records),
                   "parameters": sum(p.data.size for p in trainer.ddp.parameters()),
                   "padded_elements": layout.padded_total, "bucket_elements": [hi - lo for lo, hi in layout.buckets],
                   **{field: statistics.median(r[field] for r in records) for field in FIELDS},
                   # the slowest rank's forward+backward sets when the reduce-scatter can finish; the rank
                   # that arrives last waits least in it, so its comm time is the collectives' own
                   "slowest_compute_s": statistics.median(max(rank[1] for rank in step) for step in steps),
                   "least_comm_s": statistics.median(min(rank[2] for rank in step) for step in steps)}
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
