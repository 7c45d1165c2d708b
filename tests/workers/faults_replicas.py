"""Parameters that silently differ on one rank are caught by the periodic replica check.

Usage: mpiexec -n N python faults_replicas.py OUT_DIR [corrupt|clean]. With `corrupt`, the last rank
changes one element of parameter '1.weight' after the initial broadcast. Optimizer state is replicated
(sharded = false) so nothing re-synchronises the parameters. Each rank writes OUT_DIR/rank-R.txt:
`ok` or the class and message of the error it raised.
"""

import os
import sys

import numpy as np

from disttrain import nn
from disttrain.data import ArrayDataset
from disttrain.distributed import init
from disttrain.models import mlp
from disttrain.trainer import Trainer

out, mode = sys.argv[1], sys.argv[2]
comm = init()
rng = np.random.default_rng(0)
data = ArrayDataset(rng.standard_normal((128, 8), dtype=np.float32), rng.integers(0, 3, 128), "random")
nn.manual_seed(0)
trainer = Trainer(mlp((8,), 3, hidden=(16,)), data, nn.SoftmaxLoss(), comm=comm,
                  optimizer={"name": "sgd", "lr": 0.1, "sharded": False, "strategy": "allreduce"},
                  training={"epochs": 2, "batch_size": 32, "check_replicas_every": 2, "run_dir": out,
                            "progress": "none"},
                  checkpoint={"every_epochs": 0})
if mode == "corrupt" and comm.rank == comm.size - 1:
    dict(zip(trainer.ddp.flat.names, trainer.ddp.flat.params))["1.weight"].data[0, 0] += 1e-3
try:
    trainer.fit()
    result = "ok"
except Exception as error:  # every rank must raise the same error: that is what is checked
    result = f"{type(error).__name__}: {error}"
with open(os.path.join(out, f"rank-{comm.rank}.txt"), "w") as handle:
    handle.write(result)
