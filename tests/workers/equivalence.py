"""Worker for test_equivalence.py: train every case of the equivalence matrix on this world size.

Usage: python equivalence.py OUT_DIR. For each case it trains a small MLP (the cnn cases: the built-in
CNN on 8x8 images) on 203 synthetic samples (not divisible by 2, 3 or 4) with global batch 32, logging
every step's global loss to OUT_DIR/CASE/metrics.jsonl and checking every step that parameters are bit-identical on all ranks;
rank 0 then writes the final flat parameters to OUT_DIR/CASE/params-N.npy.
"""

import os
import sys

import numpy as np

import disttrain as dt
from disttrain.datasets.synthetic import make
from disttrain.data import ArrayDataset
from disttrain.distributed import init
from disttrain.models import cnn, mlp
from disttrain.trainer import Trainer

CASES = {
    "adam-reduce_scatter": ({"name": "adam", "lr": 0.01}, {}),
    "adam-allreduce": ({"name": "adam", "lr": 0.01, "strategy": "allreduce"}, {}),
    "adam-replicated": ({"name": "adam", "lr": 0.01, "strategy": "allreduce", "sharded": False}, {}),
    "sgd-momentum-reduce_scatter": ({"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}, {}),
    "sgd-momentum-allreduce": ({"name": "sgd", "lr": 0.1, "momentum": 0.9, "strategy": "allreduce"}, {}),
    "adam-accumulate-3": ({"name": "adam", "lr": 0.01}, {"accumulate": 3}),
    "adamw-clip-cosine": ({"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
                          {"clip_norm": 0.5, "schedule": "cosine", "warmup_steps": 3}),
    "adam-small-buckets": ({"name": "adam", "lr": 0.01, "bucket_mb": 0.002}, {}),
    "cnn-adam-reduce_scatter": ({"name": "adam", "lr": 0.01}, {}),
    "cnn-sgd-momentum-accumulate-2": ({"name": "sgd", "lr": 0.05, "momentum": 0.9, "strategy": "allreduce"},
                                      {"accumulate": 2}),
}


def main(out_dir: str) -> None:
    comm = init()
    x, y = make(203, 12, 5, "classification", 0.1, seed=7)
    images, image_labels = make(203, 64, 5, "classification", 0.1, seed=8)
    data = ArrayDataset(x, y, "synthetic")
    image_data = ArrayDataset(images.reshape(-1, 1, 8, 8), image_labels, "synthetic images")
    for case, (optimizer, training) in CASES.items():
        dt.manual_seed(3)
        if case.startswith("cnn"):
            model = cnn((1, 8, 8), 5, channels=(4, 8), hidden=[16])
        else:
            model = mlp((12,), 5, hidden=[16, 16], activation="tanh")
        run_dir = os.path.join(out_dir, case)
        train_data = image_data if case.startswith("cnn") else data
        trainer = Trainer(model, train_data, dt.nn.SoftmaxLoss(), None, comm, optimizer,
                          {"epochs": 3, "batch_size": 32, "seed": 5, "log_every": 1, "run_dir": run_dir,
                           "check_replicas_every": 1, "progress": "none", **training},
                          {"every_epochs": 0})
        trainer.fit()
        if comm.rank == 0:
            np.save(os.path.join(run_dir, f"params-{comm.size}.npy"), trainer.ddp.flat.flat_params[:trainer.ddp.layout.total])
            os.rename(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, f"metrics-{comm.size}.jsonl"))


if __name__ == "__main__":
    main(sys.argv[1])
