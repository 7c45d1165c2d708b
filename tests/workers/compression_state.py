"""Worker for test_compression_resume.py: save or load a checkpoint of a PowerSGD run and dump every
rank's compression state as loaded or saved.

Usage: python compression_state.py save|load COMPRESSION CHECKPOINT_DIR OUT_DIR. `save` trains 3 steps
of a small MLP with `COMPRESSION` and checkpoints it; `load` builds the same run with `COMPRESSION`
and restores the checkpoint. Each rank then writes OUT_DIR/{save|load}-{world size}-{rank}.npz with
its state arrays as "state:param" keys (none for a run without state).
"""

import os
import sys

import numpy as np

import disttrain as dt
from disttrain import checkpoint as ckpt
from disttrain.data import split_evenly
from disttrain.distributed import DataParallel, ShardedOptimizer, init
from disttrain.models import mlp
from disttrain.optim import Adam

BUCKET_MB = 1200 * 4 / 2**20  # two buckets at 2 and 3 ranks, every weight whole inside one


def main(action: str, compression: str, directory: str, out_dir: str) -> None:
    comm = init()
    dt.manual_seed(3)
    ddp = DataParallel(mlp((12,), 5, hidden=[32, 24]), comm, bucket_mb=BUCKET_MB, compression=compression,
                       powersgd_rank=2)
    opt = ShardedOptimizer(Adam, ddp.parameters(), comm, data_parallel=ddp, lr=0.01)
    if action == "save":
        loss_fn = dt.nn.SoftmaxLoss()
        lo, hi = split_evenly(48, comm.size, comm.rank)
        for step in range(3):
            rng = np.random.default_rng(step)
            x, y = rng.standard_normal((48, 12)).astype(np.float32), rng.integers(0, 5, 48)
            loss_fn(ddp(dt.Tensor(x[lo:hi])), y[lo:hi]).backward(np.float32((hi - lo) / 48))
            opt.step()
            opt.reset_grad()
        ckpt.save(directory, 3, ddp, opt, comm)
    else:
        ckpt.load(directory, ddp, opt, comm)
    state = ddp.compressor.state_dict()["params"] if ddp.compressor is not None else {}
    arrays = {f"{key}:{name}": value for name, per_state in state.items() for key, value in per_state.items()}
    np.savez(os.path.join(out_dir, f"{action}-{comm.size}-{comm.rank}.npz"), **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
