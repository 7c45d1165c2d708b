"""Bad rows that only the last rank's part of one global batch holds, found at training time.

Usage: mpiexec -n N python faults_shard_rows.py OUT_DIR nan|label. The data set (built in memory, so no
load-time check sees it) is clean except for one row that the last rank reads at step 2: a NaN feature
or a label outside the model's classes. Each rank writes OUT_DIR/rank-R.txt with the class and message
of the error it raised (or `ok`), and the step it stopped at.
"""

import os
import sys

import numpy as np

from disttrain import nn
from disttrain.data import ArrayDataset, split_evenly
from disttrain.distributed import init
from disttrain.models import mlp
from disttrain.trainer import Trainer

out, kind = sys.argv[1], sys.argv[2]
comm = init()
batch = 32
rng = np.random.default_rng(0)
features = rng.standard_normal((128, 8), dtype=np.float32)
labels = rng.integers(0, 3, 128)
# without shuffling, step 2 is rows [32, 64); the last rank takes the last part of them
start, _ = split_evenly(batch, comm.size, comm.size - 1)
bad_row = batch + start
if kind == "nan":
    features[bad_row, 3] = np.nan
else:
    labels[bad_row] = 7
nn.manual_seed(0)
trainer = Trainer(mlp((8,), 3, hidden=(16,)), ArrayDataset(features, labels, "in memory"), nn.SoftmaxLoss(),
                  comm=comm, optimizer={"name": "adam", "lr": 0.01},
                  training={"epochs": 1, "batch_size": batch, "shuffle": False, "run_dir": out, "progress": "none"},
                  checkpoint={"every_epochs": 0})
try:
    trainer.fit()
    result = "ok"
except Exception as error:  # every rank must raise the same error: that is what is checked
    result = f"{type(error).__name__}: {error}"
with open(os.path.join(out, f"rank-{comm.rank}.txt"), "w") as handle:
    handle.write(f"{result}\nstopped after step {trainer.step}")
