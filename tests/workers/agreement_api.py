"""Run under mpiexec: Trainers whose ranks disagree, and the cost of the check when they agree.

argv: OUT_DIR CASE, CASE one of
  lr      rank 1 passes another learning rate
  data    rank 1 has one training sample fewer
  test    rank 1 has one test sample fewer
  equal   every rank the same: count the collectives check_agreement runs
Each rank writes OUT_DIR/rank-R.txt: the error text, or "trained" / "allreduce A, objects O".
"""

import os
import sys

import numpy as np

import disttrain as dt
from disttrain.data import ArrayDataset
from disttrain.distributed import init
from disttrain.trainer import RunMismatchError, Trainer
from disttrain.training import agreement

out_dir, case = sys.argv[1], sys.argv[2]
comm = init()
rng = np.random.default_rng(0)
x, y = rng.standard_normal((64, 5)).astype(np.float32), rng.integers(0, 3, 64)
rows = 63 if case == "data" and comm.rank == 1 else 64
test_rows = 31 if case == "test" and comm.rank == 1 else 32
lr = 0.02 if case == "lr" and comm.rank == 1 else 0.01


def outcome() -> str:
    if case == "equal":
        calls = {"allreduce": 0, "allgather_object": 0}
        for name in calls:
            original = getattr(comm, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                calls[_name] += 1
                return _original(*args, **kwargs)
            setattr(comm, name, counted)
        agreement.check_agreement(comm, agreement.run_facts({"optimizer": {"lr": 0.01}}, ArrayDataset(x, y)))
        return f"allreduce {calls['allreduce']}, objects {calls['allgather_object']}"
    dt.manual_seed(0)
    model = dt.nn.Sequential(dt.nn.Linear(5, 3))
    try:
        Trainer(model, ArrayDataset(x[:rows], y[:rows]), dt.nn.SoftmaxLoss(), ArrayDataset(x[:test_rows], y[:test_rows]),
                comm=comm,
                optimizer={"lr": lr}, training={"epochs": 1, "batch_size": 16, "progress": "none",
                                                "run_dir": os.path.join(out_dir, "run")},
                checkpoint={"every_epochs": 0}).fit()
        return "trained"
    except RunMismatchError as error:
        return str(error)


with open(os.path.join(out_dir, f"rank-{comm.rank}.txt"), "w") as handle:
    handle.write(outcome())
