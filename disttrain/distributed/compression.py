"""Compressed gradient combination: other implementations of DataParallel's per-bucket collective,
with fewer bytes on the wire. `make_compressor` picks one by name; "none" is DataParallel's own exact
float32 reduce-scatter or allreduce.

Every compressor keeps the bucket contract of the exact path. `combine(comm, flat_grads, bucket,
scatter)` is COLLECTIVE over `comm` (the bucket communicator) and, for bucket [lo, hi) of flat_grads
split into `size` equal chunks, leaves the combined SUM over ranks of this rank's chunk at
flat_grads[lo:lo + chunk] (scatter=True: the reduce-scatter contract; the rest of the bucket is then
scratch), or the combined sum of the whole bucket in flat_grads[lo:hi] on every rank (scatter=False:
every rank holds the same bits). DataParallel scales the result afterwards. Compressors run only when
the world holds more than one rank: a world of one sends nothing, and its gradients stay exact.

`state_dict()` / `load_state_dict(saved, rank, size)` carry per-rank state across a checkpoint:
{"method", "options", "params": {parameter name: {state name: float32 array}}}.
"""

from __future__ import annotations

import numpy as np

from . import half

METHODS = ("none", "bf16", "fp16", "powersgd")
HEADER = 2  # uint16 slots in front of each 16-bit block: its fp16 scale exponent (int16), one spare


def check_options(method, powersgd_rank) -> None:
    """Raise ValueError naming the argument and what is allowed, unless both are valid."""
    if method not in METHODS:
        raise ValueError(f"compression must be one of {METHODS}, got {method!r}")
    if isinstance(powersgd_rank, bool) or not isinstance(powersgd_rank, (int, np.integer)) or powersgd_rank < 1:
        raise ValueError(f"powersgd_rank must be an integer >= 1, got {powersgd_rank!r}")


def make_compressor(method: str, layout, powersgd_rank: int = 4):
    """The compressor for `method` (one of METHODS) over a FlatLayout, or None for "none".
    Raises ValueError naming the allowed values."""
    check_options(method, powersgd_rank)
    if method in half.FORMATS:
        return HalfPrecision(method, layout)
    if method == "powersgd":
        from .powersgd import PowerSGD

        return PowerSGD(layout, int(powersgd_rank))
    return None


class HalfPrecision:
    """Gradients travel as 16-bit `fmt` ("bf16" or "fp16", see half.py) and are summed in float32.

    Reduce: every rank encodes the chunks other ranks own and one alltoall delivers chunk r of every
    rank to rank r, which decodes them and sums the ranks' contributions in rank order in float32 (its
    own chunk joins unencoded). That is the reduce-scatter result, in half the bytes. For the allreduce
    contract the owner then encodes its sum once more and an allgather hands every rank every owner's
    16-bit sum, which each rank decodes to the same float32 bits. fp16 chunks carry a power-of-two
    scale exponent each (half.fp16_exponent), so no finite gradient overflows. Stateless.
    """

    def __init__(self, fmt: str, layout):
        self.method, self.layout = fmt, layout
        self._wires = {}  # bucket length -> (send, recv): uint16 (size, chunk + HEADER), reused

    def combine(self, comm, flat_grads: np.ndarray, bucket: int, scatter: bool) -> None:
        """COLLECTIVE over `comm`: the bucket contract (module docstring), 16 bits on the wire."""
        lo, hi = self.layout.buckets[bucket]
        size, rank = comm.size, comm.rank
        chunks = flat_grads[lo:hi].reshape(size, -1)
        send, recv = self._wire(hi - lo, size)
        for owner in range(size):
            if owner != rank:
                self._encode(chunks[owner], send[owner])
        comm.alltoall(send, recv)
        total = chunks[0]  # the sum lands at the bucket's start (the reduce-scatter contract)
        for owner in range(size):  # rank order: the same sum on any run
            if owner == rank:
                if owner > 0:
                    total += chunks[rank]
            else:
                self._decode(recv[owner], total, accumulate=owner > 0)
        if scatter:
            return
        self._encode(total, send[rank])
        comm.allgather(send.reshape(-1))
        for owner in range(size):
            self._decode(send[owner], chunks[owner], accumulate=False)

    def _encode(self, values: np.ndarray, row: np.ndarray) -> None:
        exponent = half.fp16_exponent(values) if self.method == "fp16" else 0
        row[:HEADER].view(np.int16)[0] = exponent
        half.encode(values, row[HEADER:], self.method, exponent)

    def _decode(self, row: np.ndarray, out: np.ndarray, accumulate: bool) -> None:
        exponent = int(row[:HEADER].view(np.int16)[0])
        half.decode(row[HEADER:], out, self.method, exponent, accumulate)

    def _wire(self, length: int, size: int) -> tuple:
        if length not in self._wires:
            shape = (size, length // size + HEADER)
            self._wires[length] = (np.zeros(shape, np.uint16), np.zeros(shape, np.uint16))
        return self._wires[length]

    def state_dict(self) -> dict:
        """Nothing carries over between steps: {"method", "options": {}, "params": {}}."""
        return {"method": self.method, "options": {}, "params": {}}

    def load_state_dict(self, saved, rank: int, size: int) -> None:
        """Stateless: nothing to restore."""
