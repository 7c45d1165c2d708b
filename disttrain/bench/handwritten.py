"""The hand-written reference: the same MLP in plain numpy + MPI, written for speed, no framework.

This is the limit disttrain is measured against: the same BLAS calls, no autograd graph, every
buffer allocated once. Parameters are views of one flat float32 buffer and gradients views of a
second one, which backward writes with `out=` matmuls. Softmax cross-entropy forward and backward
are fused; the gradient is scaled by 1/global_batch inside it, so a SUM across ranks is already the
gradient of the mean loss over the global batch.

At N ranks: one in-place Reduce_scatter_block of the whole gradient buffer (rank r receives the summed
slice r), Adam on that slice only (ZeRO-1: state for 1/N of the parameters), one in-place Allgather of
the parameter buffer, each through disttrain's MPIComm (one call over mpi4py's buffer API, so that
mpi4py is imported in one module of the package only; its cost per call is about a microsecond). At
1 rank: Adam on the whole buffer, no collective. The Adam update is the same
math, in the same order of operations and the same 32768-element chunks, as disttrain.optim.Adam.
"""

from __future__ import annotations

import numpy as np

from .workload import Workload, initial_parameters

ALIGN_ELEMENTS = 16
ADAM_CHUNK = 32768  # as disttrain.optim.CHUNK_ELEMENTS: 128 KiB of float32


class HandwrittenMLP:
    """The reference system at `ranks` ranks (`comm` is disttrain's MPIComm, or None at 1 rank)."""

    def __init__(self, workload: Workload, rank: int, ranks: int, recorder, comm=None):
        if ranks > 1 and comm is None:
            raise ValueError("the hand-written system needs an MPI communicator at more than one rank")
        self.workload, self.rank, self.ranks, self.recorder = workload, rank, ranks, recorder
        self.comm = comm
        layers = workload.layers
        b = workload.local_batch(ranks)

        total = workload.param_count
        quantum = ranks * ALIGN_ELEMENTS
        self.padded_total = -(-total // quantum) * quantum
        self.flat_params = np.zeros(self.padded_total, np.float32)
        self.flat_grads = np.zeros(self.padded_total, np.float32)
        self.weights, self.biases, self.weight_grads, self.bias_grads = [], [], [], []
        offset = 0
        for weight, bias in initial_parameters(workload):
            for value, params, grads in ((weight, self.weights, self.weight_grads),
                                         (bias, self.biases, self.bias_grads)):
                view = self.flat_params[offset:offset + value.size].reshape(value.shape)
                view[...] = value
                params.append(view)
                grads.append(self.flat_grads[offset:offset + value.size].reshape(value.shape))
                offset += value.size

        shard = self.padded_total // ranks
        self.lo, self.hi = rank * shard, (rank + 1) * shard
        # in-place reduce-scatter leaves this rank's summed shard at the front of flat_grads
        self.shard_grads = self.flat_grads[:shard]
        self.exp_avg = np.zeros(shard, np.float32)
        self.exp_avg_sq = np.zeros(shard, np.float32)
        self.adam_step = 0
        self.scratch = (np.empty(ADAM_CHUNK, np.float32), np.empty(ADAM_CHUNK, np.float32))

        # activations (after ReLU for hidden layers) and their gradients, allocated once
        self.activations = [None] + [np.empty((b, n), np.float32) for n in layers[1:]]
        self.activation_grads = [None] + [np.empty((b, n), np.float32) for n in layers[1:-1]]
        self.probs = self.activations[-1]  # logits are turned into probabilities in place
        self.row_max = np.empty((b, 1), np.float32)
        self.row_sum = np.empty((b, 1), np.float32)
        self.rows = np.arange(b)
        self.grad_scale = np.float32(1.0 / workload.global_batch)

        phases = ["forward", "backward", "optimizer"] if ranks == 1 else \
                 ["forward", "backward", "sync", "optimizer", "gather"]
        recorder.phases = phases

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One training step on this rank's rows; returns this rank's mean loss."""
        rec = self.recorder
        loss = self.forward(x, y)
        rec.mark()
        self.backward(x, y)
        rec.mark()
        if self.ranks == 1:
            self.adam(self.flat_params, self.flat_grads)
            rec.mark()
        else:
            rec.call("reduce_scatter", self.comm.reduce_scatter, self.flat_grads)  # in place
            rec.mark()
            self.adam(self.flat_params[self.lo:self.hi], self.shard_grads)
            rec.mark()
            rec.call("allgather", self.comm.allgather, self.flat_params)
            rec.mark()
        return loss

    def forward(self, x, y) -> float:
        a = x
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            out = self.activations[i + 1]
            np.matmul(a, weight.T, out=out)
            out += bias
            if i < last:
                np.maximum(out, 0, out=out)
            a = out
        probs = self.probs  # holds the logits now
        np.max(probs, axis=1, keepdims=True, out=self.row_max)
        probs -= self.row_max
        picked = probs[self.rows, y]  # shifted logit of each row's label (a copy)
        np.exp(probs, out=probs)
        np.sum(probs, axis=1, keepdims=True, out=self.row_sum)
        loss = float(np.log(self.row_sum).sum() - picked.sum()) / len(y)
        probs /= self.row_sum
        return loss

    def backward(self, x, y) -> None:
        grad = self.probs
        grad[self.rows, y] -= 1.0
        grad *= self.grad_scale
        for i in range(len(self.weights) - 1, -1, -1):
            a_prev = self.activations[i] if i > 0 else x
            np.matmul(grad.T, a_prev, out=self.weight_grads[i])
            np.sum(grad, axis=0, out=self.bias_grads[i])
            if i > 0:
                grad_prev = self.activation_grads[i]
                np.matmul(grad, self.weights[i], out=grad_prev)
                grad_prev *= a_prev > 0  # ReLU: the activation is positive exactly where its input was
                grad = grad_prev

    def adam(self, params: np.ndarray, grads: np.ndarray) -> None:
        """disttrain.optim.Adam's update (no weight decay), chunked, on this rank's slice."""
        w = self.workload
        self.adam_step += 1
        lr, b1, b2, eps = w.lr, w.beta1, w.beta2, w.eps
        correction1, correction2 = 1.0 - b1 ** self.adam_step, 1.0 - b2 ** self.adam_step
        scratch_a, scratch_b = self.scratch
        for lo in range(0, params.size, ADAM_CHUNK):
            hi = min(lo + ADAM_CHUNK, params.size)
            p, g = params[lo:hi], grads[lo:hi]
            m, v = self.exp_avg[lo:hi], self.exp_avg_sq[lo:hi]
            a, b = scratch_a[:hi - lo], scratch_b[:hi - lo]
            m *= b1
            np.multiply(g, 1.0 - b1, out=b)
            m += b
            v *= b2
            np.multiply(g, g, out=b)
            b *= 1.0 - b2
            v += b
            np.divide(v, correction2, out=b)
            np.sqrt(b, out=b)
            b += eps
            np.divide(m, correction1, out=a)
            a *= lr
            a /= b
            p -= a

    def state_bytes(self) -> int:
        return self.exp_avg.nbytes + self.exp_avg_sq.nbytes

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.barrier()

    def raw_collectives(self) -> dict | None:
        if self.comm is None or self.ranks == 1:
            return None
        from .collectives import raw_mpi_collectives
        return raw_mpi_collectives(self.comm, self.padded_total)

    def describe(self) -> dict:
        return {"flat_elements": self.padded_total, "owned_elements": self.hi - self.lo}


def make(workload: Workload, rank: int, ranks: int, recorder, options: dict) -> HandwrittenMLP:
    """The hand-written system; at more than one rank it initialises MPI (disttrain's MPIComm: a thin
    layer over mpi4py's buffer calls, with the abort-on-exception hook)."""
    comm = None
    if ranks > 1:
        from ..distributed import init

        comm = init()
        if comm.size != ranks or comm.rank != rank:
            raise RuntimeError(f"MPI world is rank {comm.rank} of {comm.size}, launcher said {rank} of {ranks}")
    return HandwrittenMLP(workload, rank, ranks, recorder, comm)
