"""PowerSGD (Vogels, Karimireddy and Jaggi, NeurIPS 2019): each weight gradient M (n x m) travels as
two thin factors, one power iteration per step, with warm start and error feedback.

Per bucket, on every rank (w = this rank, r = the rank of the approximation):
    M_w   = this rank's gradient + its error feedback E_w
    P     = sum over ranks of M_w Q            (n x r; one allreduce, packed with the exact part)
    P^    = P with orthonormal columns         (Gram-Schmidt, the same bits on every rank)
    Q_w   = M_w^T P^;  E_w = M_w - P^ Q_w^T    (what the projection misses stays on this rank)
    Q     = sum over ranks of Q_w              (m x r; the second allreduce)
    M     = P^ Q^T                             = P^ P^^T (sum of M_w): the combined SUM, low rank
Q is kept for the next step (warm start), starting from a seeded normal draw identical on every rank.
Summed over ranks, what was sent plus the errors kept equals the sum of the gradients plus the errors
carried in: nothing is lost, only delayed.

Compressed: parameters with 2 or more dimensions (viewed as shape[0] x the rest) lying whole inside
the bucket, where r (n + m) < n m. Everything else in the bucket (biases, a parameter that straddles
buckets, padding) is summed exactly in float32 in the first allreduce. For the reduce-scatter
contract this rank's chunk of the combined bucket is then copied to the bucket's start.

A parameter that had no gradient on any rank this step still sends its error feedback (the
optimizer then skips it, and that part of the feedback is dropped). A non-finite gradient anywhere
makes the combined gradient non-finite (the step is then skipped) and zeroes the error feedback.

The combined gradient is the same on every rank as long as the ranks' BLAS computes Gram-Schmidt's
dot products bit for bit (the same library on the same kind of CPU): the sums come from allreduce and
the reconstruction is elementwise (finish). With reduce_scatter the parameters stay identical
regardless, because each chunk's update is computed by its owner alone.
"""

from __future__ import annotations

import zlib

import numpy as np

from ..ops import jit

DEPENDENT = 1e-3  # a row of P that projection onto the rows before it shrinks below this is dependent


class _Matrix:
    """One compressed parameter: `name`, flat `offset`, `rows` x `cols`, this rank's `error` (rows x
    cols) and the warm-start `q` (rank x cols: Q transposed), float32."""

    def __init__(self, name: str, offset: int, rows: int, cols: int, rank: int):
        self.name, self.offset, self.rows, self.cols = name, offset, rows, cols
        self.error = np.zeros((rows, cols), np.float32)
        self.q = initial_q(name, rank, cols)


def initial_q(name: str, rank: int, cols: int) -> np.ndarray:
    """The starting Q^T (rank x cols, float32) of parameter `name`: a normal draw seeded by the name,
    so it is the same on every rank and under any layout."""
    return np.random.default_rng(zlib.crc32(name.encode())).standard_normal((rank, cols)).astype(np.float32)


class _Bucket:
    """What one bucket sends: its matrices, the flat ranges summed exactly, and the two packed
    float32 buffers of the two allreduces ([P^T of each matrix | exact values] and [Q^T of each]), and
    this rank's own Q^T of each matrix."""

    def __init__(self, matrices: list, exact: list, rank: int):
        self.matrices, self.exact = matrices, exact
        p_sizes = [rank * m.rows for m in matrices]
        self.p_total = sum(p_sizes)
        self.packed = np.zeros(self.p_total + sum(b - a for a, b in exact), np.float32)
        self.packed_q = np.zeros(sum(rank * m.cols for m in matrices), np.float32)
        self.local_q = [np.zeros((rank, m.cols), np.float32) for m in matrices]  # Q_w^T before the sum
        self.p, self.q, p_at, q_at = [], [], 0, 0
        for m in matrices:
            self.p.append(self.packed[p_at:p_at + rank * m.rows].reshape(rank, m.rows))
            self.q.append(self.packed_q[q_at:q_at + rank * m.cols].reshape(rank, m.cols))
            p_at, q_at = p_at + rank * m.rows, q_at + rank * m.cols


class PowerSGD:
    """Rank-`rank` PowerSGD over the buckets of a FlatLayout (module docstring). `combine` follows the
    bucket contract of compression.py; state is per rank: each matrix's error feedback and Q."""

    method = "powersgd"

    def __init__(self, layout, rank: int):
        self.layout, self.rank = layout, rank
        self.matrices = {}
        self.buckets = [self._plan(lo, hi) for lo, hi in layout.buckets]

    def _plan(self, lo: int, hi: int) -> _Bucket:
        matrices, exact, at = [], [], lo
        for name, offset, shape in self.layout.entries:
            size = int(np.prod(shape, dtype=np.int64))
            if not (lo <= offset and offset + size <= hi and len(shape) >= 2):
                continue
            rows, cols = shape[0], size // shape[0]
            if self.rank * (rows + cols) >= rows * cols:
                continue  # the factors would be no smaller than the matrix
            matrices.append(_Matrix(name, offset, rows, cols, self.rank))
            self.matrices[name] = matrices[-1]
            if at < offset:
                exact.append((at, offset))
            at = offset + size
        if at < hi:
            exact.append((at, hi))
        return _Bucket(matrices, exact, self.rank)

    def combine(self, comm, flat_grads: np.ndarray, bucket: int, scatter: bool) -> None:
        """COLLECTIVE over `comm` (two allreduces): the bucket contract, 2-D gradients as rank-r factors."""
        plan = self.buckets[bucket]
        grads = [flat_grads[m.offset:m.offset + m.rows * m.cols].reshape(m.rows, m.cols) for m in plan.matrices]
        for m, grad, p in zip(plan.matrices, grads, plan.p):
            grad += m.error
            p[...] = (grad @ m.q.T).T  # P = M Q (n x r first: 3x faster than Q^T M^T into r x n here)
        at = plan.p_total
        for a, b in plan.exact:
            plan.packed[at:at + b - a] = flat_grads[a:b]
            at += b - a
        comm.allreduce(plan.packed)
        for grad, p, q, local in zip(grads, plan.p, plan.q, plan.local_q):
            orthonormalise_rows(p)
            np.matmul(p, grad, out=q)  # this rank's Q^T = P^T M_w, kept for its error feedback
            local[...] = q
        comm.allreduce(plan.packed_q)
        healthy = bool(np.isfinite(plan.packed[:plan.p_total]).all() and np.isfinite(plan.packed_q).all())
        for m, grad, p, q, local in zip(plan.matrices, grads, plan.p, plan.q, plan.local_q):
            finish(grad, m.error, p, local, q)  # E_w = M_w - P Q_w^T, and the combined sum P Q^T
            if healthy:
                keep = q.any(axis=1)  # a zero row would stay zero forever: keep the previous one
                m.q[keep] = q[keep]
            else:  # a non-finite gradient somewhere: the step will be skipped; start the feedback afresh
                m.error.fill(0.0)
        at = plan.p_total
        for a, b in plan.exact:
            flat_grads[a:b] = plan.packed[at:at + b - a]
            at += b - a
        if scatter and comm.rank > 0:
            lo, hi = self.layout.buckets[bucket]
            chunk = (hi - lo) // comm.size
            flat_grads[lo:lo + chunk] = flat_grads[lo + comm.rank * chunk:lo + (comm.rank + 1) * chunk]

    def state_dict(self) -> dict:
        """{"method": "powersgd", "options": {"rank"}, "params": {name: {"error": rows x cols,
        "q": rank x cols}}}: views of the live state (float32)."""
        return {"method": self.method, "options": {"rank": self.rank},
                "params": {name: {"error": m.error, "q": m.q} for name, m in self.matrices.items()}}

    def load_state_dict(self, saved, rank: int, size: int) -> None:
        """Restore from `saved` = {"method", "options", "world_size", "ranks": [per saved rank: {name:
        {"error", "q"}}]} (arrays may load lazily), or None. Same world size: rank w takes rank w's
        state. Another world size: Q from saved rank 0; rank 0 takes the sum over saved ranks of the
        error feedback (what the combined gradient still owes), other ranks start at zero. A parameter
        without saved state, a Q of another rank r, or state of another method start afresh."""
        for m in self.matrices.values():
            m.error.fill(0.0)
            m.q[...] = initial_q(m.name, self.rank, m.cols)
        if not saved or saved.get("method") != self.method:
            return
        ranks = saved["ranks"]
        same_world = saved["world_size"] == size and len(ranks) == size
        for name, m in self.matrices.items():
            source = ranks[rank] if same_world else ranks[0]
            if name in source and source[name]["q"].shape == m.q.shape:
                m.q[...] = source[name]["q"]
            if same_world and name in source:
                m.error[...] = np.asarray(source[name]["error"]).reshape(m.error.shape)
            elif not same_world and rank == 0:
                for part in ranks:  # rank order
                    if name in part:
                        m.error += np.asarray(part[name]["error"], np.float32).reshape(m.error.shape)


def orthonormalise_rows(p: np.ndarray) -> None:
    """In place, Gram-Schmidt over the rows of p (float32, r x n): orthonormal rows spanning what p's
    rows span. A row is projected off the rows before it twice (once leaves float32 rounding noise
    that is far from orthogonal); a row that shrinks below DEPENDENT of its size doing so lay in their
    span (a gradient of rank below r) and becomes zero. Zero rows stay zero, non-finite rows stay
    non-finite (so that the step's gradient reports them)."""
    for i in range(p.shape[0]):
        row = p[i]
        before = float(np.abs(row).max()) if row.size else 0.0
        if not (before > 0 and np.isfinite(before)):
            continue
        for _ in range(2):
            for j in range(i):
                row -= np.dot(p[j], row) * p[j]
        after = float(np.abs(row).max())
        if not after > DEPENDENT * before:
            row.fill(0.0)
            continue
        row /= np.float32(after)  # first to order 1, so that the squares neither underflow nor overflow
        row /= np.sqrt(np.dot(row, row))


ROW_CHUNK_ELEMENTS = 32768  # the numpy path of finish() works through this many elements of rows at once
NUMBA_MIN_ELEMENTS = 1 << 14  # smaller matrices never pay numba's import (see fused.py); same bits either way
_kernels = None  # None: not looked up yet; False: numba unavailable; else the compiled kernel


def finish(grad: np.ndarray, error: np.ndarray, p: np.ndarray, q_local: np.ndarray, q: np.ndarray) -> None:
    """In place, for float32 grad and error (n x m), p (r x n), q_local and q (r x m):
        error = grad - p^T q_local      (this rank's error feedback)
        grad  = p^T q                   (the combined gradient)
    each product summed over k = 0..r-1 in order, rounding after every multiply and add. One pass with
    numba (about 2.5x faster than BLAS's three, which also round differently), else numpy in row
    chunks; both give the same bits, and the same on any CPU: elementwise IEEE operations only."""
    kernel = _numba_kernel() if grad.size >= NUMBA_MIN_ELEMENTS else False
    if kernel:
        kernel(grad, error, p, q_local, q)
        return
    step = max(1, ROW_CHUNK_ELEMENTS // max(grad.shape[1], 1))
    for lo in range(0, grad.shape[0], step):
        rows = slice(lo, min(lo + step, grad.shape[0]))
        missed, combined = _outer_sum(p[:, rows], q_local), _outer_sum(p[:, rows], q)
        np.subtract(grad[rows], missed, out=error[rows])
        grad[rows] = combined


def _outer_sum(p_rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    total = np.multiply.outer(p_rows[0], q[0])
    for k in range(1, p_rows.shape[0]):
        total += np.multiply.outer(p_rows[k], q[k])
    return total


def _numba_kernel():
    global _kernels
    if _kernels is None:
        _kernels = jit.compiled(_compile)
    return _kernels


def _compile():
    import numba

    # no fastmath: every multiply and add rounds as numpy's do (no fused multiply-add, no reordering)
    @numba.njit(cache=True, error_model="numpy", nogil=True)
    def finish_kernel(grad, error, p, q_local, q):
        rank, rows = p.shape
        cols = grad.shape[1]
        missed = np.empty(cols, np.float32)
        combined = np.empty(cols, np.float32)
        for i in range(rows):
            c = p[0, i]
            first_local, first = q_local[0], q[0]
            for j in range(cols):
                missed[j] = c * first_local[j]
                combined[j] = c * first[j]
            for k in range(1, rank):
                c = p[k, i]
                row_local, row = q_local[k], q[k]
                for j in range(cols):
                    missed[j] += c * row_local[j]
                    combined[j] += c * row[j]
            grad_row, error_row = grad[i], error[i]
            for j in range(cols):
                error_row[j] = grad_row[j] - missed[j]
                grad_row[j] = combined[j]

    return finish_kernel
