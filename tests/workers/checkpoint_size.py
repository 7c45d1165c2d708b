"""Run under mpiexec: for several models and optimizers, the Trainer's estimate of a checkpoint's size
beside the size of the checkpoint it then writes (every file of it). argv: OUT_DIR.
Rank 0 writes OUT_DIR/sizes.json: [[case, estimate, actual], ...]."""

import json
import os
import sys

import numpy as np

import disttrain as dt
from disttrain import models
from disttrain.data import ArrayDataset
from disttrain.distributed import init
from disttrain.trainer import Trainer
from disttrain.training import persistence

CASES = {  # name: (model factory, input shape, optimizer settings)
    "tiny mlp, adam": (lambda: models.mlp((6,), 3, hidden=(8,)), (6,), {"name": "adam"}),
    "digits-size mlp, sgd momentum": (lambda: models.mlp((64,), 10, hidden=(128,)), (64,), {"name": "sgd", "momentum": 0.9}),
    "digits-size mlp, plain sgd": (lambda: models.mlp((64,), 10, hidden=(128,)), (64,), {"name": "sgd"}),
    "wide mlp, adamw": (lambda: models.mlp((256,), 10, hidden=(512, 512)), (256,), {"name": "adamw"}),
    "cnn, adam": (lambda: models.cnn((8, 8), 10), (8, 8), {"name": "adam"}),
    "mlp, replicated adam": (lambda: models.mlp((64,), 10, hidden=(64,)), (64,), {"name": "adam", "sharded": False}),
}

out_dir = sys.argv[1]
comm = init()
rng = np.random.default_rng(0)
results = []
for name, (factory, shape, optimizer) in CASES.items():
    dt.manual_seed(0)
    x = rng.standard_normal((64, *shape)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    run_dir = os.path.join(out_dir, name.replace(" ", "-").replace(",", ""))
    trainer = Trainer(factory(), ArrayDataset(x, y), dt.nn.SoftmaxLoss(), comm=comm, optimizer=optimizer,
                      training={"epochs": 1, "max_steps": 2, "batch_size": 16, "progress": "none", "run_dir": run_dir},
                      checkpoint={"every_steps": 2, "every_epochs": 0})
    estimate = persistence.checkpoint_bytes(trainer.parts, trainer.config)
    trainer.fit()
    step_dir = os.path.join(run_dir, "checkpoints", "step-00000002")
    actual = sum(os.path.getsize(os.path.join(step_dir, f)) for f in os.listdir(step_dir)) if comm.rank == 0 else 0
    results.append([name, estimate, actual])
if comm.rank == 0:
    with open(os.path.join(out_dir, "sizes.json"), "w") as handle:
        json.dump(results, handle)
