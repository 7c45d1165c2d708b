"""Worker for test_gpt_mpi.py: train a small tied-embedding GPT on text windows on this world size.

Usage: python gpt_equivalence.py OUT_DIR. With the library's low-level API (DataParallel with
reduce-scatter, ZeRO-1 ShardedOptimizer(AdamW), the text set's RandomSampler; the same calls the
trainer makes), it trains STEPS steps of global batch 10 (not divisible by 3 or 4) from one seed,
checks after every step that parameters are bit-identical on all ranks, saves a checkpoint at step
CHECKPOINT_STEP, and writes (rank 0) every step's global loss, the final parameters and the
validation loss (its fixed windows split across ranks) to OUT_DIR/run-N.npz. Then it resumes from the
1-process run's checkpoint (a different world size: the optimizer state is resharded), trains to
STEPS again and writes those final parameters to OUT_DIR/resumed-N.npy.
"""

import os
import sys
import zlib

import numpy as np

from disttrain import checkpoint, ops, optim
from disttrain.config import load_config
from disttrain.datasets import load_data
from disttrain.distributed import DataParallel, ShardedOptimizer, init
from disttrain.tensor import Tensor, no_grad
from disttrain.transformer import GPT

STEPS, CHECKPOINT_STEP, BATCH, BLOCK = 8, 4, 10, 16


def build(comm):
    model = GPT(vocab=256, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, rng=np.random.default_rng(11))
    ddp = DataParallel(model, comm)  # reduce-scatter once the sharded optimizer adopts the parameters
    optimizer = ShardedOptimizer(optim.AdamW, ddp.parameters(), comm, lr=3e-3, weight_decay=0.1)
    return ddp, optimizer


def train_step(ddp, optimizer, train, indices, total, comm) -> float:
    x, y = train[indices]
    loss = ops.cross_entropy(ddp(Tensor.wrap(x)), y)
    loss.backward(np.float32(len(indices) / total))
    ddp.sync_gradients(grad_scale=1.0)
    optimizer.step()
    optimizer.reset_grad()
    stats = comm.allreduce(np.array([float(loss.data) * len(indices), len(indices)]), "sum")
    sums = comm.allreduce(np.array([zlib.crc32(ddp.flat.flat_params.tobytes())] * 2, np.float64) * [1, -1], "max")
    if sums[0] != -sums[1]:
        raise RuntimeError("parameters differ across ranks")
    return stats[0] / stats[1]


def validation_loss(ddp, val, comm) -> float:
    from disttrain.data import split_evenly
    start, stop = split_evenly(len(val), comm.size, comm.rank)
    with no_grad():
        x, y = val[np.arange(start, stop)]
        local = float(ops.cross_entropy(ddp(x), y).data) * len(x) if len(x) else 0.0
    stats = comm.allreduce(np.array([local, stop - start], np.float64), "sum")
    return stats[0] / stats[1]


def train(ddp, optimizer, train_set, sampler, comm, first_step, checkpoint_dir=None) -> list:
    losses, step = [], first_step
    for indices, total in sampler.batches(BATCH):
        if step == STEPS:
            break
        losses.append(train_step(ddp, optimizer, train_set, indices, total, comm))
        step += 1
        if checkpoint_dir and step == CHECKPOINT_STEP:
            checkpoint.save(checkpoint_dir, step, ddp, optimizer, comm, {"sampler": sampler.state_dict()})
    return losses


def main(out_dir: str) -> None:
    comm = init()
    section = load_config(None, ['data.name="text"', "data.eval_windows=23"])["data"]
    train_set, val, _ = load_data(section, comm, block_size=BLOCK)
    ddp, optimizer = build(comm)
    sampler = train_set.sampler(comm.size, comm.rank, seed=5)
    losses = train(ddp, optimizer, train_set, sampler, comm, 0, os.path.join(out_dir, f"ckpt-{comm.size}"))
    val_loss = validation_loss(ddp, val, comm)
    if comm.rank == 0:
        np.savez(os.path.join(out_dir, f"run-{comm.size}.npz"), losses=np.array(losses), val_loss=val_loss,
                 params=ddp.flat.flat_params[:ddp.layout.total])
    ddp, optimizer = build(comm)  # a fresh start, then resume from the 1-process run's checkpoint
    info = checkpoint.load(os.path.join(out_dir, "ckpt-1"), ddp, optimizer, comm)
    sampler = train_set.sampler(comm.size, comm.rank, seed=0)
    sampler.load_state_dict(info["extra"]["sampler"])
    train(ddp, optimizer, train_set, sampler, comm, info["step"])
    if comm.rank == 0:
        np.save(os.path.join(out_dir, f"resumed-{comm.size}.npy"), ddp.flat.flat_params[:ddp.layout.total])


if __name__ == "__main__":
    main(sys.argv[1])
